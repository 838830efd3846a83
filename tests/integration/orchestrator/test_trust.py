"""Trust policies and held runs end to end, on SQLite and PostgreSQL: GitHub's published pull request and
comment payloads (edited into a fork's PR, an unknown author's PR, an untrusted commenter's comment),
signed as GitHub signs them and posted to a real orchestrator (uvicorn on a free port, dispatcher, sweeper
and reporting worker running), a local fake of GitHub's REST API, and a simulated agent on a real
WebSocket that would take any job dispatched."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.events import get_event_log
from kici.orchestrator.store.sources import Source, create_source
from kici.orchestrator.store.tokens import create_admin_token
from tests.integration.orchestrator.dispatch_harness import FAST_TIMEOUTS, Orchestrator, SimAgent, serve_app
from tests.integration.orchestrator.test_providers_git import compile_into
from tests.integration.orchestrator.test_providers_github import FakeGitHub, fake_github  # noqa: F401
from tests.paths import GITHUB_FIXTURES

SECRET = "It's a Secret to Everybody"
APP_ID = 29310
HELLO = "Codertocat/Hello-World"
HEAD = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
BASE = "f95f852bd8fca8fcc58a9a2d6c842781e32a215e"
NEW_HEAD = "1111111111111111111111111111111111111111"
PR = 2

WORKFLOWS = """
from kici import job, pr, step, workflow

build = job("build", runs_on=["linux"], steps=[step("b", "echo b")])
test = job("test", runs_on=["linux"], needs=[build], steps=[step("t", "echo t")])
checks = workflow("checks", on=[pr()], jobs=[build, test])
"""


COMMENT_WORKFLOWS = """
from kici import comment, job, step, workflow

bench = workflow("bench", on=[comment("created", source="pr")],
                 jobs=[job("bench", runs_on=["linux"], steps=[step("b", "echo b")])])
"""
MASTER = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"


@pytest.fixture(scope="module")
def lock_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return compile_into(tmp_path_factory.mktemp("lock"), WORKFLOWS)


@pytest.fixture(scope="module")
def comment_lock(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return compile_into(tmp_path_factory.mktemp("comment-lock"), COMMENT_WORKFLOWS)


def pr_payload(*, login: str = "Codertocat", association: str = "OWNER", fork: str | None = None,
               sha: str = HEAD, action: str = "opened") -> dict[str, Any]:
    """GitHub's `pull_request.opened` payload, by another author and/or from a fork."""
    payload = json.loads((GITHUB_FIXTURES / "pull_request.opened.json").read_bytes())
    payload["action"] = action
    pr = payload["pull_request"]
    pr["user"]["login"] = login
    pr["author_association"] = association
    pr["head"]["sha"] = sha
    if fork is not None:
        pr["head"]["repo"] = copy.deepcopy(pr["head"]["repo"]) | {"full_name": fork, "fork": True}
    payload["sender"]["login"] = login
    return payload


def comment_payload(body: str, *, login: str, association: str) -> dict[str, Any]:
    """GitHub's `issue_comment.created` payload, moved onto pull request #2."""
    payload = json.loads((GITHUB_FIXTURES / "issue_comment.created.json").read_bytes())
    payload["issue"]["number"] = PR
    payload["issue"]["pull_request"] = {"url": f"https://api.github.com/repos/{HELLO}/pulls/{PR}"}
    payload["comment"]["body"] = body
    payload["comment"]["user"]["login"] = login
    payload["comment"]["author_association"] = association
    payload["sender"]["login"] = login
    return payload


@dataclass
class TrustEnv:
    orch: Orchestrator
    fake: FakeGitHub
    source: Source
    agent: SimAgent

    @property
    def database(self) -> Database:
        return self.orch.database

    async def deliver(self, payload: dict[str, Any], event: str) -> httpx.Response:
        data = json.dumps(payload).encode()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-GitHub-Hook-Installation-Target-ID": str(APP_ID),
            "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest(),
        }
        async with httpx.AsyncClient(base_url=self.orch.base_url, timeout=10) as client:
            response = await client.post("/webhook/default/github", content=data, headers=headers)
        assert response.status_code == 202, response.text
        return response

    async def held_pr(self, **kwargs: Any) -> run_store.RunRecord:
        response = await self.deliver(pr_payload(**kwargs), "pull_request")
        run_ids = response.json()["run_ids"]
        assert len(run_ids) == 1, response.text
        return await self.orch.run(run_ids[0])

    async def audit(self, action: str) -> list[Any]:
        async with self.database.read() as conn:
            query = sa.select(schema.audit_log).where(schema.audit_log.c.action == action)
            return list(await conn.execute(query.order_by(schema.audit_log.c.created_at)))

    def clone_tokens(self) -> list[dict[str, Any]]:
        """Installation tokens minted for an agent (scoped to one repository)."""
        return [r for r in self.fake.token_requests if r.get("repositories")]


@pytest.fixture
async def trust(database: Database, tmp_path: Path, fake_github: FakeGitHub,  # noqa: F811
                lock_bytes: bytes) -> AsyncIterator[TrustEnv]:
    key = os.urandom(32)
    for sha in (HEAD, BASE, NEW_HEAD):
        fake_github.files[(HELLO, sha)] = lock_bytes
    fake_github.installations[HELLO] = 1
    fake_github.compare[(HELLO, BASE, HEAD)] = ["src/app.py"]
    fake_github.compare[(HELLO, BASE, NEW_HEAD)] = ["src/app.py"]
    fake_github.pulls[(HELLO, PR)] = HEAD
    settings = Settings(data_dir=tmp_path / "data", database_url=database.url, sweep_interval_ms=100,
                        dispatch_poll_ms=200)
    app = create_app(settings, database, secret_key=key)
    app.state.agent_timeouts = FAST_TIMEOUTS
    async with database.transaction() as conn:
        owner = await create_admin_token(conn, name="owner", role=AdminRole.OWNER)
        source = await create_source(
            conn, key=key, name="github", kind="github", config={"app_id": APP_ID, "api_url": fake_github.url},
            secrets={"webhook_secret": SECRET, "private_key": fake_github.private_key_pem},
        )
    async with serve_app(app, lifespan="on") as port:
        orch = Orchestrator(app, database, f"http://127.0.0.1:{port}", owner.plaintext, source.id)
        agent = SimAgent(orch, "agent-1", ["linux"])
        agent.auto = "success"
        await agent.connect()
        try:
            yield TrustEnv(orch, fake_github, source, agent)
        finally:
            with contextlib.suppress(Exception):
                await agent.close()


def dispatched_runs(agent: SimAgent) -> list[str]:
    return [m["run_id"] for m in agent.received("job.dispatch")]


# -- held at ingest ---------------------------------------------------------------------------------


async def test_fork_pr_is_held_never_dispatched_then_approved_runs_at_its_sha(trust: TrustEnv) -> None:
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    assert held.status == "held" and held.trust == "untrusted" and held.secrets_allowed is False
    assert held.hold_reason == (f"pull request #{PR} from fork alice/Hello-World by alice (CONTRIBUTOR): "
                                "held for approval")
    assert held.hold_expires_at is not None and held.sha == HEAD
    jobs = await trust.orch.jobs(held.id)
    assert {n: j.status for n, j in jobs.items()} == {"build": "held", "test": "pending"}
    # a trusted PR delivered after it is dispatched at once, and is the agent's first job: the held one,
    # queued before it, never was; and no token was minted for the held one
    assert trust.clone_tokens() == []
    trusted = await trust.held_pr(sha=NEW_HEAD)
    assert trusted.trust == "trusted" and trusted.secrets_allowed is True and trusted.hold_reason is None
    await trust.orch.wait_run(trusted.id, "success")
    assert set(dispatched_runs(trust.agent)) == {trusted.id}
    assert (await trust.orch.run(held.id)).status == "held"

    listed = await trust.orch.admin("GET", "/held")
    assert listed.status_code == 200
    assert [(g["run_id"], g["kind"], g["sha"]) for g in listed.json()] == [(held.id, "trust", HEAD)]
    assert listed.json()[0]["reason"] == held.hold_reason

    approved = await trust.orch.admin("POST", f"/held/{held.id}/approve")
    assert approved.status_code == 200, approved.text
    assert approved.json()["released_job_ids"] == [jobs["build"].id]
    done = await trust.orch.wait_run(held.id, "success")
    assert done.trust == "approved" and done.secrets_allowed is False and done.sha == HEAD
    dispatches = [m for m in trust.agent.received("job.dispatch") if m["run_id"] == held.id]
    assert [m["job_id"] for m in dispatches] == [jobs["build"].id, jobs["test"].id]
    assert {m["sha"] for m in dispatches} == {HEAD}
    assert (await trust.orch.admin("GET", "/held")).json() == []
    rows = await trust.audit("held.approve")
    assert [(r.actor, r.target, r.outcome) for r in rows] == [
        (f"token:{rows[0].token_id}", f"run:{held.id}", "allowed")
    ]
    again = await trust.orch.admin("POST", f"/held/{held.id}/approve")
    assert again.status_code == 409 and "not held" in again.json()["error"]
    assert (await trust.orch.admin("POST", "/held/no-such-run/approve")).status_code == 404


async def test_unknown_author_pr_is_held_and_rejected(trust: TrustEnv) -> None:
    held = await trust.held_pr(login="bob", association="FIRST_TIME_CONTRIBUTOR")
    assert held.status == "held"
    assert held.hold_reason == (f"pull request #{PR} by untrusted author bob (FIRST_TIME_CONTRIBUTOR): "
                                "held for approval")
    rejected = await trust.orch.admin("POST", f"/held/{held.id}/reject", json={"reason": "not today"})
    assert rejected.status_code == 200, rejected.text
    run = await trust.orch.run(held.id)
    assert run.status == "cancelled" and run.failure_reason is not None
    assert run.failure_reason.endswith(": not today") and "rejected by token:" in run.failure_reason
    assert {j.status for j in (await trust.orch.jobs(held.id)).values()} == {"cancelled"}
    assert (await trust.orch.admin("POST", f"/held/{held.id}/reject")).status_code == 409
    assert (await trust.orch.admin("POST", f"/held/{held.id}/approve")).status_code == 409
    assert [r.reason for r in await trust.audit("held.reject")] == ["trust: decided 1; not today"]
    assert dispatched_runs(trust.agent) == []


async def test_trusted_member_pr_runs_at_once(trust: TrustEnv) -> None:
    run = await trust.held_pr(login="carol", association="MEMBER")
    assert run.trust == "trusted" and run.hold_reason is None
    await trust.orch.wait_run(run.id, "success")


async def test_a_change_to_kici_is_called_out_and_the_base_lock_file_is_used(trust: TrustEnv) -> None:
    trust.fake.compare[(HELLO, BASE, HEAD)] = [".kici/workflows/ci.py", "src/app.py"]
    trust.fake.files.pop((HELLO, HEAD))  # the untrusted head's lock file is never read
    held = await trust.held_pr(login="bob", association="NONE")
    assert held.hold_reason is not None
    assert held.hold_reason.endswith("held for approval; changes .kici/: the held run uses the base branch's "
                                     "workflows")


async def test_the_hold_expires(trust: TrustEnv) -> None:
    put = await trust.orch.admin("PUT", "/sources/github/trust", json={"hold_expiry": "1s"})
    assert put.status_code == 200 and put.json()["hold_expiry"] == "1s"
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    run = await trust.orch.wait_run(held.id, "cancelled", within=15)
    assert run.failure_reason == "hold expired after 1s"
    assert {j.status for j in (await trust.orch.jobs(held.id)).values()} == {"cancelled"}
    assert dispatched_runs(trust.agent) == []


async def test_a_new_push_is_held_again_and_an_approval_binds_to_its_sha(trust: TrustEnv) -> None:
    first = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    assert (await trust.orch.admin("POST", f"/held/{first.id}/approve")).status_code == 200
    second = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World",
                                 sha=NEW_HEAD, action="synchronize")
    assert second.status == "held" and second.sha == NEW_HEAD
    await trust.orch.wait_run(first.id, "success")
    assert second.id not in dispatched_runs(trust.agent)
    assert (await trust.orch.run(second.id)).status == "held"


# -- comments ---------------------------------------------------------------------------------------


async def test_kici_approve_comment_from_a_trusted_user_approves_only_the_current_head(trust: TrustEnv) -> None:
    old = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    new = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World", sha=NEW_HEAD,
                              action="synchronize")
    trust.fake.pulls[(HELLO, PR)] = NEW_HEAD
    await trust.deliver(comment_payload("Looks fine.\n/KICI Approve\n", login="maint", association="MEMBER"),
                        "issue_comment")
    await trust.orch.wait_run(new.id, "success")
    assert (await trust.orch.run(new.id)).trust == "approved"
    assert (await trust.orch.run(old.id)).status == "held"
    rows = await trust.audit("held.approve")
    assert [(r.actor, r.target, r.outcome) for r in rows] == [("github:maint", f"run:{new.id}", "allowed")]

    await trust.deliver(comment_payload("/kici reject too old", login="maint", association="OWNER"),
                        "issue_comment")
    assert (await trust.orch.run(old.id)).status == "held"  # the comment decides the current head only


async def test_kici_comment_from_an_untrusted_commenter_is_ignored_with_a_denied_row(trust: TrustEnv) -> None:
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    await trust.deliver(comment_payload("/kici approve", login="alice", association="CONTRIBUTOR"),
                        "issue_comment")
    rows = await trust.audit("held.approve")
    assert [(r.actor, r.target, r.outcome) for r in rows] == [("github:alice", f"pr:{HELLO}#{PR}", "denied")]
    assert "not trusted" in rows[0].reason
    assert (await trust.orch.run(held.id)).status == "held"
    assert dispatched_runs(trust.agent) == []
    # "approve" not at the start of a line is no command at all
    await trust.deliver(comment_payload("please /kici approve", login="maint", association="OWNER"),
                        "issue_comment")
    assert (await trust.orch.run(held.id)).status == "held"


async def test_trusted_users_and_teams_may_decide(trust: TrustEnv) -> None:
    put = await trust.orch.admin("PUT", "/sources/github/trust",
                                 json={"trusted_users": ["dave"], "trusted_teams": ["octo-org/maintainers"]})
    assert put.status_code == 200, put.text
    trust.fake.team_members["octo-org/maintainers"] = {"erin": "active", "frank": "pending"}
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    await trust.deliver(comment_payload("/kici approve", login="frank", association="CONTRIBUTOR"), "issue_comment")
    assert (await trust.orch.run(held.id)).status == "held"  # a pending membership is no membership
    await trust.deliver(comment_payload("/kici reject\n", login="erin", association="CONTRIBUTOR"), "issue_comment")
    run = await trust.orch.run(held.id)
    assert run.status == "cancelled" and run.failure_reason == "rejected by github:erin"
    assert trust.fake.hits["GET /orgs/octo-org/teams/maintainers/memberships/erin"] == 1
    # a trusted user's own PR is trusted; the PR of an unknown author by a team member is too
    own = await trust.held_pr(login="dave", association="CONTRIBUTOR", sha=NEW_HEAD)
    assert own.trust == "trusted"


# -- policies ---------------------------------------------------------------------------------------


async def test_policy_reject_filters_the_delivery_and_allow_runs_without_secrets(trust: TrustEnv) -> None:
    put = await trust.orch.admin("PUT", "/sources/github/trust", json={"fork_pull_requests": "reject"})
    assert put.status_code == 200
    response = await trust.deliver(pr_payload(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World"),
                                   "pull_request")
    assert response.json()["outcome"] == "filtered" and response.json()["run_ids"] == []
    async with trust.database.read() as conn:
        log = await get_event_log(conn, response.json()["delivery_id"])
    assert log is not None and log.reason == (
        f"pull request #{PR} from fork alice/Hello-World by alice (CONTRIBUTOR): rejected by the source's trust policy"
    )
    put = await trust.orch.admin("PUT", "/sources/github/trust", json={"fork_pull_requests": "allow"})
    assert put.status_code == 200
    allowed = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    assert allowed.trust == "untrusted" and allowed.secrets_allowed is False and allowed.hold_reason is None
    await trust.orch.wait_run(allowed.id, "success")


async def test_secrets_for_approved_lets_an_approved_run_have_secrets(trust: TrustEnv) -> None:
    put = await trust.orch.admin("PUT", "/sources/github/trust", json={"secrets_for_approved": True})
    assert put.status_code == 200
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    assert held.secrets_allowed is False
    assert (await trust.orch.admin("POST", f"/held/{held.id}/approve")).status_code == 200
    run = await trust.orch.run(held.id)
    assert run.trust == "approved" and run.secrets_allowed is True


async def test_trust_policy_routes_show_defaults_validate_and_audit(trust: TrustEnv) -> None:
    shown = await trust.orch.admin("GET", "/sources/github/trust")
    assert shown.status_code == 200
    assert shown.json() == {
        "source": "github", "kind": "github", "applies": True, "hold_expiry": "72h",
        "policy": {"fork_pull_requests": "hold", "untrusted_authors": "hold",
                   "trusted_associations": ["OWNER", "MEMBER", "COLLABORATOR"], "trusted_users": [],
                   "trusted_teams": [], "secrets_for_approved": False, "hold_expiry": None},
    }
    for body, words in [
        ({"trusted_associations": ["OWNER", "FRIEND"]}, "unknown association"),
        ({"fork_pull_requests": "maybe"}, "fork_pull_requests"),
        ({"hold_expiry": "soon"}, "duration"),
        ({"trusted_teams": ["maintainers"]}, "org/team-slug"),
        ({"colour": "red"}, "colour"),
    ]:
        bad = await trust.orch.admin("PUT", "/sources/github/trust", json=body)
        assert bad.status_code == 422 and words in bad.text, (body, bad.text)
    assert (await trust.orch.admin("GET", "/sources/github/trust")).json() == shown.json()  # nothing written
    ok = await trust.orch.admin("PUT", "/sources/github/trust",
                                json={"untrusted_authors": "allow", "trusted_associations": ["owner"]})
    assert ok.status_code == 200 and ok.json()["policy"]["trusted_associations"] == ["OWNER"]
    rows = await trust.audit("source.trust")
    assert [(r.target, r.outcome) for r in rows] == [("source:github", "allowed")]
    assert (await trust.orch.admin("GET", "/sources/nope/trust")).status_code == 404


async def test_git_sources_have_no_trust_policy(trust: TrustEnv) -> None:
    async with trust.database.transaction() as conn:
        await create_source(conn, key=None, name="hooks", kind="git", config={"url": "/srv/git/app.git"}, secrets={})
    shown = await trust.orch.admin("GET", "/sources/hooks/trust")
    assert shown.json() == {"source": "hooks", "kind": "git", "applies": False, "policy": None, "hold_expiry": None}
    refused = await trust.orch.admin("PUT", "/sources/hooks/trust", json={})
    assert refused.status_code == 422 and "only github sources" in refused.text


# -- reporting --------------------------------------------------------------------------------------


async def test_a_held_jobs_check_run_asks_for_approval(trust: TrustEnv) -> None:
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")

    def action_required(calls: list[tuple[str, int | None, dict[str, Any]]]) -> bool:
        return any(body.get("conclusion") == "action_required" for _, _, body in calls)

    calls = await asyncio.to_thread(trust.fake.wait_check_calls, action_required)
    body = next(b for _, _, b in calls if b.get("conclusion") == "action_required")
    assert body["name"] == "checks / build" and body["head_sha"] == HEAD
    assert "/kici approve" in body["output"]["summary"] and held.id in body["output"]["summary"]
    assert held.hold_reason is not None and held.hold_reason in body["output"]["summary"]
    held_check = next(i for i, c in trust.fake.check_runs.items() if c.get("conclusion") == "action_required")
    assert (await trust.orch.admin("POST", f"/held/{held.id}/approve")).status_code == 200

    def succeeded(calls: list[tuple[str, int | None, dict[str, Any]]]) -> bool:
        return sum(1 for _, _, b in calls if b.get("conclusion") == "success") >= 2

    calls = await asyncio.to_thread(trust.fake.wait_check_calls, succeeded)
    # GitHub does not reopen a completed check run: the approved job gets a new one of the same name
    builds = [i for i, c in trust.fake.check_runs.items() if c.get("name") == "checks / build"]
    assert len(builds) == 2 and builds[0] == held_check
    assert trust.fake.check_runs[builds[1]]["conclusion"] == "success"
    assert all(i != held_check for method, i, _ in calls if method == "PATCH")


async def test_held_runs_are_listed_oldest_first_and_scoped_to_the_org(trust: TrustEnv) -> None:
    first = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    second = await trust.held_pr(login="bob", association="NONE", sha=NEW_HEAD)
    listed = (await trust.orch.admin("GET", "/held")).json()
    assert [g["run_id"] for g in listed] == [first.id, second.id]
    assert all(g["expires_at"] and g["job_id"] is None and g["workflow"] == "checks" for g in listed)


async def test_a_rerun_keeps_the_trust_of_the_run_it_repeats(trust: TrustEnv) -> None:
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")
    assert (await trust.orch.admin("POST", f"/held/{held.id}/reject")).status_code == 200
    again = await trust.orch.admin("POST", f"/runs/{held.id}/rerun")
    assert again.status_code == 201, again.text
    rerun = await trust.orch.run(again.json()["run"]["id"])
    assert rerun.status == "held" and rerun.trust == "untrusted" and rerun.secrets_allowed is False
    assert rerun.hold_reason == held.hold_reason and rerun.hold_expires_at is not None
    assert (await trust.orch.admin("POST", f"/held/{rerun.id}/approve")).status_code == 200
    await trust.orch.wait_run(rerun.id, "success")
    approved_again = await trust.orch.admin("POST", f"/runs/{rerun.id}/rerun")
    third = await trust.orch.run(approved_again.json()["run"]["id"])
    assert third.trust == "approved" and third.secrets_allowed is False and third.hold_reason is None
    await trust.orch.wait_run(third.id, "success")


async def test_a_comment_trigger_from_an_untrusted_commenter_is_held(trust: TrustEnv, comment_lock: bytes) -> None:
    trust.fake.refs[(HELLO, "master")] = MASTER
    trust.fake.files[(HELLO, MASTER)] = comment_lock
    response = await trust.deliver(comment_payload("run the benchmarks please", login="mallory",
                                                   association="NONE"), "issue_comment")
    [run_id] = response.json()["run_ids"]
    run = await trust.orch.run(run_id)
    assert run.status == "held" and run.workflow == "bench" and run.sha == MASTER
    assert run.hold_reason == f"comment #{PR} by untrusted author mallory (NONE): held for approval"
    trusted = await trust.deliver(comment_payload("run them", login="maint", association="MEMBER"),
                                  "issue_comment")
    [trusted_id] = trusted.json()["run_ids"]
    await trust.orch.wait_run(trusted_id, "success")
    assert (await trust.orch.run(run_id)).status == "held" and run_id not in dispatched_runs(trust.agent)


async def test_a_rejected_held_jobs_check_run_is_replaced_by_a_cancelled_one(trust: TrustEnv) -> None:
    held = await trust.held_pr(login="alice", association="CONTRIBUTOR", fork="alice/Hello-World")

    def action_required(calls: list[tuple[str, int | None, dict[str, Any]]]) -> bool:
        return any(body.get("conclusion") == "action_required" for _, _, body in calls)

    await asyncio.to_thread(trust.fake.wait_check_calls, action_required)
    held_check = next(i for i, c in trust.fake.check_runs.items() if c.get("conclusion") == "action_required")
    assert (await trust.orch.admin("POST", f"/held/{held.id}/reject", json={"reason": "no"})).status_code == 200

    def cancelled(calls: list[tuple[str, int | None, dict[str, Any]]]) -> bool:
        return any(m == "POST" and b.get("conclusion") == "cancelled" and b.get("name") == "checks / build"
                   for m, _, b in calls)

    calls = await asyncio.to_thread(trust.fake.wait_check_calls, cancelled)
    assert all(i != held_check for method, i, _ in calls if method == "PATCH")
