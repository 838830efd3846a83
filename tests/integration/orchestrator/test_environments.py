"""Deployment environments enforced by the orchestrator, on SQLite and PostgreSQL, over real HTTP and
WebSockets with simulated agents: branch and tag rules, reviewers (eligibility, self-review, counting),
rejection, the wait timer, one deployment at a time, variables in `job.dispatch`, and the admin API."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kici.engine.events import Event
from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.holds.environment import EnvironmentGate
from kici.orchestrator.holds.gates import Approver, GateKind
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store import secrets as secret_store
from kici.orchestrator.store.tokens import create_admin_token
from tests.conftest import kici_env

from .dispatch_harness import Orchestrator, SimAgent, serve_orchestrator, workflow

PROD = [{"value": "production"}]
ADMIN_1 = Approver(kind="token", name="t-admin-1", role="admin")
ADMIN_2 = Approver(kind="token", name="t-admin-2", role="admin")
AUDITOR = Approver(kind="token", name="t-auditor", role="auditor")


def deploy_workflow(environment: list[dict[str, Any]] = PROD, *, notify: bool = False) -> Any:
    jobs = [{"name": "build"}, {"name": "deploy", "needs": [{"name": "build"}], "environments": environment}]
    if notify:
        jobs.append({"name": "notify", "needs": [{"name": "deploy"}]})
    return workflow(jobs)


async def create_env(orch: Orchestrator, name: str = "production", **policy: Any) -> dict[str, Any]:
    reply = await orch.admin("POST", "/environments", json={"name": name, **policy})
    assert reply.status_code == 201, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def start(orch: Orchestrator, wf: Any, *, ref: str | None = "refs/heads/main", actor: str | None = None,
                pull_request_from: str | None = None) -> str:
    """A run of `wf` at `ref` (a branch or a tag), its event's author `actor`; or of a pull request whose
    head branch is `pull_request_from` (no ref)."""
    if pull_request_from is not None:
        ref = None
        event = Event(type="pr", action="opened", branch=pull_request_from, source_branch=pull_request_from,
                      target_branch="main", sha="a" * 40, repo="acme/app", source_repo="mallory/app", actor=actor)
    else:
        assert ref is not None
        branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
        tag = ref.removeprefix("refs/tags/") if ref.startswith("refs/tags/") else None
        event = Event(type="tag" if tag else "push", branch=branch, tag=tag, sha="a" * 40, repo="acme/app",
                      actor=actor)
    async with orch.database.transaction() as conn:
        created = await run_store.create_run(
            conn,
            run_store.NewRun(org_id="default", workflow=wf, event=event, repo="acme/app", ref=ref, sha="a" * 40,
                             lock_content_hash="l" * 64, delivery_id=None, source_id=orch.source_id),
            queue_max_depth=100, queue_timeout_ms=0,
        )
    await orch.services.dispatcher.runs_created([created.run_id])
    return created.run_id


async def finish(agent: SimAgent, dispatch: dict[str, Any], state: str = "success") -> None:
    await agent.status(dispatch, "running")
    await agent.status(dispatch, state)


async def build_then_deploy_waits(orch: Orchestrator, agent: SimAgent, run_id: str, count: int) -> dict[str, Any]:
    """Finish the run's `build` (the `count`-th dispatch) and return its `deploy` job once it waits."""
    dispatches = await agent.wait_for("job.dispatch", count)
    [build] = [d for d in dispatches if d["run_id"] == run_id and d["job"] == "build"]
    await finish(agent, build)
    job = await orch.wait_job(run_id, "deploy", "waiting", "queued", "failed")
    return {"status": job.status, "wait_reason": job.wait_reason, "error": job.error, "id": job.id}


async def decide(database: Database, verb: str, run_id: str, approver: Approver, reason: str | None = None) -> Any:
    gate = EnvironmentGate()
    async with database.transaction() as conn:
        now = schema.utcnow()
        if verb == "approve":
            return await gate.approve(conn, run_id, approver, now=now)
        return await gate.reject(conn, run_id, approver, reason, now=now)


async def test_branch_and_tag_rules(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        await create_env(orch, branches=["main", "release/*"], tags=["v*"])

        async def deployed(run_id: str, count: int) -> None:
            [*_, deploy] = await agent.wait_for("job.dispatch", count)
            assert deploy["run_id"] == run_id and deploy["job"] == "deploy"
            await finish(agent, deploy)
            await orch.wait_run(run_id, "success")

        allowed = await start(orch, deploy_workflow())
        job = await build_then_deploy_waits(orch, agent, allowed, 1)
        assert job["status"] == "queued", job
        await deployed(allowed, 2)
        release = await start(orch, deploy_workflow(), ref="refs/heads/release/1.x")
        assert (await build_then_deploy_waits(orch, agent, release, 3))["status"] == "queued"
        await deployed(release, 4)

        refused = await start(orch, deploy_workflow(notify=True), ref="refs/heads/feature/x")
        job = await build_then_deploy_waits(orch, agent, refused, 5)
        assert job["status"] == "failed"
        assert job["error"] == "branch 'feature/x' is not allowed for environment 'production'"
        run = await orch.wait_run(refused, "failed")
        assert run.failure_reason == "job deploy: branch 'feature/x' is not allowed for environment 'production'"
        assert (await orch.jobs(refused))["notify"].status == "skipped"

        tagged = await start(orch, deploy_workflow(), ref="refs/tags/v1.2.0")
        assert (await build_then_deploy_waits(orch, agent, tagged, 6))["status"] == "queued"
        await deployed(tagged, 7)
        bad_tag = await start(orch, deploy_workflow(), ref="refs/tags/nightly")
        job = await build_then_deploy_waits(orch, agent, bad_tag, 8)
        assert job["error"] == "tag 'nightly' is not allowed for environment 'production'"

        unknown = await start(orch, deploy_workflow([{"value": "staging"}]))
        job = await build_then_deploy_waits(orch, agent, unknown, 9)
        assert job["status"] == "failed" and job["error"] == "environment 'staging' does not exist"
        # a pull request (here from a fork's branch named `main`) never matches a branch rule
        from_fork = await start(orch, deploy_workflow(), pull_request_from="main")
        job = await build_then_deploy_waits(orch, agent, from_fork, 10)
        assert job["error"] == "a pull request's run is not allowed for environment 'production' (it allows only " \
                               "branches and tags)"
        # only the allowed deployments were dispatched
        deploys = [d["run_id"] for d in agent.received("job.dispatch") if d["job"] == "deploy"]
        assert deploys == [allowed, release, tagged]


async def test_reviewers_then_wait_timer(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        await create_env(orch, required_approvals=2, reviewer_roles=["admin", "MEMBER"], wait_timer_s=1,
                         prevent_self_review=True, variables={"DEPLOY_URL": "https://prod.example"})
        run_id = await start(orch, deploy_workflow(notify=True), actor="alice")
        job = await build_then_deploy_waits(orch, agent, run_id, 1)
        assert job["status"] == "waiting" and job["wait_reason"] == "environment: production, needs 2 approvals"
        # the API shows it, and the held list (the gate's pending) names it with its approvals
        detail = (await orch.admin("GET", f"/runs/{run_id}")).json()
        shown = {j["name"]: j for j in detail["jobs"]}["deploy"]
        assert shown["status"] == "waiting" and shown["wait_reason"] == "environment: production, needs 2 approvals"
        assert shown["environment"] == "production"
        async with database.read() as conn:
            [pending] = await EnvironmentGate().pending(conn, org_id="default")
        assert pending.kind == GateKind.ENVIRONMENT and pending.job_id == job["id"] and pending.run_id == run_id
        assert pending.environment == "production" and pending.approvals_required == 2 and pending.approvals == []

        # while a gate is pending the environment cannot be deleted
        reply = await orch.admin("DELETE", "/environments/production")
        assert reply.status_code == 409 and "1 job(s) waiting" in reply.json()["error"]

        # ineligible: an auditor token, a GitHub contributor, the run's own author
        outcome = await decide(database, "approve", run_id, AUDITOR)
        assert outcome.decided == outcome.recorded == 0
        assert outcome.refused is not None and "token:t-auditor may not approve" in outcome.refused
        outcome = await decide(database, "approve", run_id, Approver(kind="github", name="mallory", role="CONTRIBUTOR"))
        assert outcome.refused is not None and "github:mallory may not approve" in outcome.refused
        outcome = await decide(database, "approve", run_id, Approver(kind="github", name="alice", role="MEMBER"))
        assert outcome.refused is not None and "prevents self-review" in outcome.refused

        # one approval: still waiting, one to go; the same approver twice counts once
        outcome = await decide(database, "approve", run_id, ADMIN_1)
        assert outcome.recorded == 1 and outcome.decided == 0 and outcome.refused is None
        assert (await orch.jobs(run_id))["deploy"].wait_reason == "environment: production, needs 1 approval"
        outcome = await decide(database, "approve", run_id, ADMIN_1)
        assert outcome.recorded == 0 and outcome.refused is not None and "already approved" in outcome.refused

        # the second approval starts the wait timer; the job is queued once it has run out
        before = dt.datetime.now(dt.UTC)
        outcome = await decide(database, "approve", run_id, Approver(kind="github", name="bob", role="MEMBER"))
        assert outcome.decided == 1 and outcome.released_job_ids == []
        waiting = (await orch.jobs(run_id))["deploy"]
        assert waiting.status == "waiting"
        assert waiting.wait_reason is not None
        assert waiting.wait_reason.startswith("environment: production, wait timer until ")
        [deploy] = [d for d in await agent.wait_for("job.dispatch", 2) if d["job"] == "deploy"]
        assert dt.datetime.now(dt.UTC) - before >= dt.timedelta(seconds=1)
        assert deploy["run_id"] == run_id
        assert deploy["env"]["DEPLOY_URL"] == "https://prod.example"  # the environment's variables
        async with database.read() as conn:
            assert await EnvironmentGate().pending(conn, org_id="default") == []
            row = (await conn.execute(sa.select(schema.environment_gates))).one()
        assert row.status == "passed"
        assert [a["approver"] for a in row.approvals] == ["token:t-admin-1", "github:bob"]
        await finish(agent, deploy)
        [notify] = [d for d in await agent.wait_for("job.dispatch", 3) if d["job"] == "notify"]
        assert "DEPLOY_URL" not in notify["env"]  # only the environment's own jobs get its variables
        await finish(agent, notify)
        await orch.wait_run(run_id, "success")


async def test_reject_cancels_the_job_and_settles_the_run(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        await create_env(orch, required_approvals=1)
        run_id = await start(orch, deploy_workflow(notify=True))
        job = await build_then_deploy_waits(orch, agent, run_id, 1)
        assert job["wait_reason"] == "environment: production, needs 1 approval"

        outcome = await decide(database, "reject", run_id, AUDITOR, "not today")
        assert outcome.decided == 0 and outcome.refused is not None  # an auditor may not decide
        outcome = await decide(database, "reject", run_id, ADMIN_1, "not today")
        assert outcome.decided == 1 and outcome.refused is None
        run = await orch.wait_run(run_id, "cancelled")
        jobs = await orch.jobs(run_id)
        assert jobs["deploy"].status == "cancelled"
        assert jobs["deploy"].error == "deployment to environment 'production' rejected by token:t-admin-1: not today"
        assert jobs["notify"].status == "skipped"
        assert run.status == "cancelled"
        # decided: nothing left for approvals, and the environment can go
        outcome = await decide(database, "approve", run_id, ADMIN_2)
        assert outcome.decided == outcome.recorded == 0
        assert (await orch.admin("DELETE", "/environments/production")).status_code == 200
        assert [d["job"] for d in agent.received("job.dispatch")] == ["build"]


async def test_a_run_held_for_trust_is_left_to_the_trust_gate(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        await create_env(orch, required_approvals=1)
        run_id = await start(orch, deploy_workflow())
        assert (await build_then_deploy_waits(orch, agent, run_id, 1))["status"] == "waiting"
        held = sa.update(schema.runs).where(schema.runs.c.id == run_id)
        async with database.transaction() as conn:
            await conn.execute(held.values(status="held"))
        for verb in ("approve", "reject"):
            outcome = await decide(database, verb, run_id, ADMIN_1)
            assert outcome.decided == outcome.recorded == 0 and outcome.released_job_ids == []
        assert (await orch.jobs(run_id))["deploy"].status == "waiting"
        async with database.transaction() as conn:
            await conn.execute(held.values(status="running"))
        outcome = await decide(database, "approve", run_id, ADMIN_1)
        assert outcome.decided == 1 and len(outcome.released_job_ids) == 1
        [_, deploy] = await agent.wait_for("job.dispatch", 2)
        assert deploy["job"] == "deploy" and deploy["job_id"] == outcome.released_job_ids[0]


async def test_the_token_that_started_a_manual_run_may_not_approve_it(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        async with database.transaction() as conn:
            deployer = await create_admin_token(conn, name="deployer", role=AdminRole.ADMIN)
        await create_env(orch, required_approvals=1, prevent_self_review=True)
        run_id = await start(orch, deploy_workflow(), actor="admin token 'deployer'")  # as a manual run records it
        assert (await build_then_deploy_waits(orch, agent, run_id, 1))["status"] == "waiting"
        own = Approver(kind="token", name=deployer.token.id, role="admin")
        outcome = await decide(database, "approve", run_id, own)
        assert outcome.decided == 0 and outcome.refused is not None and "prevents self-review" in outcome.refused
        outcome = await decide(database, "approve", run_id, ADMIN_1)
        assert outcome.decided == 1


async def test_approved_while_the_run_waits_for_its_workflow_group(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        await create_env(orch, required_approvals=1)
        wf = workflow([{"name": "deploy", "environments": PROD}], concurrency={"group": "ci"})
        first = await start(orch, wf)
        second = await start(orch, wf)  # waits for the workflow group; its deployment asks for approval already
        for run_id in (first, second):
            job = await orch.wait_job(run_id, "deploy", "waiting")
            assert job.wait_reason == "environment: production, needs 1 approval"
        # approved while its run still waits: the job waits with the run's reason, nothing is dispatched
        assert (await decide(database, "approve", second, ADMIN_1)).decided == 1
        assert (await orch.jobs(second))["deploy"].wait_reason == "concurrency: ci"
        assert (await decide(database, "approve", first, ADMIN_1)).decided == 1
        [deploy] = await agent.wait_for("job.dispatch")
        assert deploy["run_id"] == first
        await finish(agent, deploy)
        await orch.wait_run(first, "success")
        # the run admitted, its approved job goes through without asking again
        [_, deploy] = await agent.wait_for("job.dispatch", 2)
        assert deploy["run_id"] == second


async def test_one_deployment_at_a_time(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=6) as agent:
        await agent.connect()
        await create_env(orch)
        wf = workflow([{"name": "deploy", "environments": PROD}])
        first = await start(orch, wf)
        [first_deploy] = await agent.wait_for("job.dispatch")
        second = await start(orch, wf)
        job = await orch.wait_job(second, "deploy", "waiting")
        assert job.wait_reason == "environment: production, waiting for the deployment in progress"
        assert len(agent.received("job.dispatch")) == 1

        await finish(agent, first_deploy)
        await orch.wait_run(first, "success")
        [_, second_deploy] = await agent.wait_for("job.dispatch", 2)
        assert second_deploy["run_id"] == second


async def test_environment_from_a_lambda_is_resolved_once_per_run(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        await create_env(orch, "staging", variables={"TARGET": "staging"})
        expr = {"_type": "inline", "expression": 'lambda event: "production" if event.branch == "main" else "staging"'}
        wf = workflow([{"name": "deploy", "environments": [{"value": expr, "dynamic": True}]}])
        run_id = await start(orch, wf, ref="refs/heads/dev")
        [dispatch] = await agent.wait_for("job.dispatch")
        assert dispatch["env"]["TARGET"] == "staging"
        assert (await orch.jobs(run_id))["deploy"].status == "queued"
        async with database.read() as conn:
            stored = (await conn.execute(sa.select(schema.jobs.c.environment).where(
                schema.jobs.c.run_id == run_id))).scalar_one()
        assert stored == "staging"
        # an environment job may not also name a concurrency group: refused before anything is written
        both = workflow([{"name": "deploy", "environments": PROD, "concurrencyGroup": "x"}])
        with pytest.raises(ValueError, match="cannot be combined with concurrency_group"):
            await start(orch, both)


async def test_admin_api(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        created = await create_env(orch, branches=["main"], tags=["v*"], required_approvals=1,
                                   reviewer_users=["github:carol"], wait_timer_s=300, variables={"A": "1"})
        assert created["reviewers"] == ["github:carol"] and created["secrets"] == [] and created["pending"] == 0
        again = await orch.admin("POST", "/environments", json={"name": "production"})
        assert again.status_code == 409

        for body, field in (
            ({"name": "bad name"}, "name"),
            ({"name": "x", "required_approvals": -1}, "required_approvals"),
            ({"name": "x", "reviewer_roles": ["boss"]}, "reviewer_roles"),
            ({"name": "x", "reviewer_users": ["carol"]}, "reviewer_users"),
            ({"name": "x", "variables": {"KICI_RUN_ID": "x"}}, "variables"),
            ({"name": "x", "wait_timer_s": 10**9}, "wait_timer_s"),
        ):
            reply = await orch.admin("POST", "/environments", json=body)
            assert reply.status_code == 422 and field in reply.json()["error"], (body, reply.text)
        assert [e["name"] for e in (await orch.admin("GET", "/environments")).json()] == ["production"]

        reply = await orch.admin("PUT", "/environments/production", json={"wait_timer_s": 0, "tags": []})
        assert reply.status_code == 200, reply.text
        changed = reply.json()
        assert changed["wait_timer_s"] == 0 and changed["tags"] == [] and changed["branches"] == ["main"]
        assert (await orch.admin("PUT", "/environments/production", json={"tags": [""]})).status_code == 422
        assert (await orch.admin("PUT", "/environments/nope", json={"tags": []})).status_code == 404
        assert (await orch.admin("PUT", "/environments/production", json={})).status_code == 422

        # its secrets are scoped secrets `env:production`: `show` names them, never their values
        async with database.transaction() as conn:
            for name, scope in (("DEPLOY_KEY", "env:production"), ("API_KEY", "env:production"),
                                ("OTHER", "env:staging"), ("ORG_WIDE", "org")):
                await secret_store.set_secret(conn, Keyring(os.urandom(32)), name=name, scope=scope, value="v")
        shown = (await orch.admin("GET", "/environments/production")).json()
        assert shown["secrets"] == ["API_KEY", "DEPLOY_KEY"] and "v" not in json.dumps(shown["secrets"])

        assert (await orch.admin("DELETE", "/environments/production")).status_code == 200
        assert (await orch.admin("GET", "/environments/production")).status_code == 404
        async with database.read() as conn:
            rows = (await conn.execute(
                sa.select(schema.audit_log.c.action, schema.audit_log.c.target, schema.audit_log.c.actor)
                .where(schema.audit_log.c.action.like("environment.%"))
                .order_by(schema.audit_log.c.created_at)
            )).all()
        assert [(r.action, r.target) for r in rows] == [
            ("environment.create", "environment:production"),
            ("environment.update", "environment:production"),
            ("environment.delete", "environment:production"),
        ]
        assert all(r.actor is not None and r.actor.startswith("token:") for r in rows)


async def kici_admin(orch: Orchestrator, *args: str) -> tuple[int, str, str]:
    """`kici-admin ARGS` in a real subprocess against the live orchestrator."""
    env = kici_env({"KICI_ADMIN_URL": orch.base_url, "KICI_ADMIN_TOKEN": orch.admin_token})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kici.admin", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        code, out, err = await kici_admin(
            orch, "environment", "create", "production", "--branch", "main", "--tag", "v*", "--reviewers", "1",
            "--reviewer-role", "admin", "--reviewer", "github:carol", "--wait-timer", "1h30m", "--var", "A=1",
            "--var", "B=two words", "--json",
        )
        assert code == 0, err
        created = json.loads(out)
        assert created["branches"] == ["main"] and created["tags"] == ["v*"] and created["required_approvals"] == 1
        assert created["reviewer_roles"] == ["admin"] and created["reviewer_users"] == ["github:carol"]
        assert created["wait_timer_s"] == 5400 and created["variables"] == {"A": "1", "B": "two words"}

        code, out, err = await kici_admin(orch, "environment", "set-policy", "production", "--wait-timer", "0",
                                          "--clear", "tags", "--json")
        assert code == 0, err
        changed = json.loads(out)
        assert changed["wait_timer_s"] == 0 and changed["tags"] == [] and changed["branches"] == ["main"]
        assert changed["required_approvals"] == 1 and changed["variables"] == {"A": "1", "B": "two words"}

        code, out, _ = await kici_admin(orch, "environment", "list")
        assert code == 0 and "production" in out and "main" in out
        code, _, err = await kici_admin(orch, "environment", "set-policy", "production", "--wait-timer", "soon")
        assert code == 2 and "expected a duration" in err

        # a job waiting for approval: `show` counts it, `delete` is refused (exit 1, the API's 409 message)
        run_id = await start(orch, deploy_workflow())
        assert (await build_then_deploy_waits(orch, agent, run_id, 1))["status"] == "waiting"
        code, out, _ = await kici_admin(orch, "environment", "show", "production")
        assert code == 0 and re.search(r"^Waiting jobs:\s+1$", out, re.MULTILINE), out
        code, _, err = await kici_admin(orch, "environment", "delete", "production")
        assert code == 1 and "1 job(s) waiting at its gate" in err
        code, out, _ = await kici_admin(orch, "runs", "show", run_id)
        assert code == 0 and "environment: production, needs 1 approval" in out

        await decide(database, "reject", run_id, ADMIN_1)
        await orch.wait_run(run_id, "cancelled")
        code, out, err = await kici_admin(orch, "environment", "delete", "production")
        assert code == 0 and "Deleted environment production." in out, err
