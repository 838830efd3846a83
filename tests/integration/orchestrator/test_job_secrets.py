"""Secrets declared by jobs (`job(..., secrets=[...])`), resolved at dispatch and sent in `job.dispatch`:
scope precedence env > repo > org, only the declared names, a missing or unreadable secret failing the job
before any step, nothing for runs of untrusted code, a delivery record (names and scopes, never values)
shown by the runs API and `kici-admin runs show`, and a key rotation with a run in flight. Simulated
agents over real WebSockets, on SQLite and PostgreSQL (the real agent: tests/e2e/test_job_secrets_e2e.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import jobs as jobs_table
from kici.orchestrator.db.schema import runs as runs_table
from kici.orchestrator.db.schema import secret_deliveries
from kici.orchestrator.db.schema import steps as steps_table
from kici.orchestrator.key_rotation import rotate_key
from kici.orchestrator.store import queue as queue_store
from kici.orchestrator.store import secrets as secret_store
from tests.conftest import kici_env

from .dispatch_harness import Orchestrator, SimAgent, serve_orchestrator, until, workflow

K1, K2 = os.urandom(32), os.urandom(32)
VALUES = {
    ("PYPI_TOKEN", "org"): "pypi-org-value-0001",
    ("PYPI_TOKEN", "repo:acme/app"): "pypi-repo-value-0002",
    ("DEPLOY_KEY", "org"): "deploy-org-value-0003",
    ("DEPLOY_KEY", "repo:acme/app"): "deploy-repo-value-0004",
    ("DEPLOY_KEY", "env:production"): "deploy-env-value-0005",
    ("ONLY_ORG", "org"): "only-org-value-0006",
    ("UNDECLARED", "org"): "undeclared-value-0007",
    ("PYPI_TOKEN", "repo:acme/other"): "other-repo-value-0008",
    ("DEPLOY_KEY", "env:staging"): "staging-value-0009",
}


async def _store(database: Database, keys: Keyring, values: dict[tuple[str, str], str] = VALUES) -> None:
    async with database.transaction() as conn:
        for (name, scope), value in values.items():
            await secret_store.set_secret(conn, keys, name=name, scope=scope, value=value)


def _deploy(name: str = "deploy", *, secrets: list[str] | None, environment: str | None = None,
            **extra: Any) -> dict[str, Any]:
    job: dict[str, Any] = {"name": name, **extra}
    if secrets is not None:
        job["secrets"] = secrets
    if environment is not None:  # (the environment must exist: the tests that use one create it)
        job["environments"] = [{"value": environment}]
    return job


async def _deliveries(database: Database) -> list[dict[str, Any]]:
    async with database.read() as conn:
        rows = (await conn.execute(sa.select(secret_deliveries).order_by(secret_deliveries.c.created_at))).all()
    return [dict(r._mapping) for r in rows]


async def _steps(database: Database, job_id: str) -> int:
    async with database.read() as conn:
        return int((await conn.execute(
            sa.select(sa.func.count()).select_from(steps_table).where(steps_table.c.job_id == job_id)
        )).scalar_one())


async def test_declared_secrets_by_precedence_and_only_those(database: Database, tmp_path: Path) -> None:
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, \
            SimAgent(orch, "a1", [], max_concurrency=3) as agent:
        agent.auto = "success"
        await agent.connect()
        made = await orch.admin("POST", "/environments", json={"name": "production"})  # no approvals: deploys at once
        assert made.status_code == 201, made.text
        created = await orch.create_run(workflow([
            _deploy("deploy", secrets=["DEPLOY_KEY", "PYPI_TOKEN", "ONLY_ORG"], environment="production"),
            _deploy("publish", secrets=["DEPLOY_KEY", "PYPI_TOKEN"]),
            _deploy("test", secrets=None),
        ]))
        dispatches = {d["job"]: d for d in await agent.wait_for("job.dispatch", 3)}
        await orch.wait_run(created.run_id, "success")
        # env > repo > org, per name; and nothing that was not declared
        assert dispatches["deploy"]["secrets"] == {"DEPLOY_KEY": "deploy-env-value-0005",
                                                   "PYPI_TOKEN": "pypi-repo-value-0002",
                                                   "ONLY_ORG": "only-org-value-0006"}
        assert dispatches["publish"]["secrets"] == {"DEPLOY_KEY": "deploy-repo-value-0004",
                                                    "PYPI_TOKEN": "pypi-repo-value-0002"}
        assert dispatches["test"].get("secrets", {}) == {}
        rows = await _deliveries(database)
        by_job = {r["job_id"]: r for r in rows}
        assert len(rows) == 2 and created.job_ids["test"] not in by_job
        assert by_job[created.job_ids["deploy"]]["secrets"] == {
            "DEPLOY_KEY": "env:production", "PYPI_TOKEN": "repo:acme/app", "ONLY_ORG": "org"}
        assert by_job[created.job_ids["publish"]]["attempt"] == 1
        assert by_job[created.job_ids["publish"]]["run_id"] == created.run_id
        assert not any(v in json.dumps(rows, default=str) for v in VALUES.values())  # never a value

        shown = (await orch.admin("GET", f"/runs/{created.run_id}")).json()
        jobs = {j["name"]: j for j in shown["jobs"]}
        [delivery] = jobs["deploy"]["secret_deliveries"]
        assert delivery["attempt"] == 1 and delivery["secrets"] == [
            {"name": "DEPLOY_KEY", "scope": "env:production"}, {"name": "ONLY_ORG", "scope": "org"},
            {"name": "PYPI_TOKEN", "scope": "repo:acme/app"}]
        assert jobs["test"]["secret_deliveries"] == []
        assert not any(v in json.dumps(shown) for v in VALUES.values())

        # kici-admin runs show: one line per job that received secrets
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kici.admin", "runs", "show", created.run_id,
            env=kici_env({"KICI_ADMIN_URL": orch.base_url, "KICI_ADMIN_TOKEN": orch.admin_token}),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert "secrets: DEPLOY_KEY (env:production), ONLY_ORG (org), PYPI_TOKEN (repo:acme/app)" in text
        assert "secrets: DEPLOY_KEY (repo:acme/app), PYPI_TOKEN (repo:acme/app)" in text
        assert text.count("secrets:") == 2
        assert not any(v in text for v in VALUES.values())


async def test_a_missing_secret_fails_the_job_before_any_step(database: Database, tmp_path: Path) -> None:
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, \
            SimAgent(orch, "a1", [], max_concurrency=2) as agent:
        agent.auto = "success"
        await agent.connect()
        assert (await orch.admin("POST", "/environments", json={"name": "production"})).status_code == 201
        created = await orch.create_run(workflow([
            _deploy("deploy", secrets=["PYPI_TOKEN", "NOPE_TOKEN", "ALSO_MISSING"], environment="production"),
            _deploy("after", secrets=None, needs=[{"name": "deploy"}]),
        ]))
        run = await orch.wait_run(created.run_id, "failed")
        jobs = await orch.jobs(created.run_id)
        assert jobs["deploy"].status == "failed" and jobs["deploy"].failure_category == "secrets"
        assert jobs["deploy"].error == (
            "secret NOPE_TOKEN not found (looked in env:production, repo:acme/app, org); "
            "secret ALSO_MISSING not found (looked in env:production, repo:acme/app, org)")
        assert jobs["after"].status == "skipped"
        assert agent.received("job.dispatch") == [] and await _steps(database, created.job_ids["deploy"]) == 0
        assert await _deliveries(database) == []
        assert run.status == "failed"


async def test_untrusted_runs_get_no_secrets(database: Database, tmp_path: Path) -> None:
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, \
            SimAgent(orch, "a1", [], max_concurrency=2) as agent:
        agent.auto = "success"
        created = await orch.create_run(workflow([_deploy("deploy", secrets=["PYPI_TOKEN"]),
                                                  _deploy("test", secrets=None)]))
        async with database.transaction() as conn:  # what the trust policy decides for a fork's PR
            await conn.execute(runs_table.update().where(runs_table.c.id == created.run_id)
                               .values(secrets_allowed=False, trust="untrusted"))
        await agent.connect()
        await orch.wait_run(created.run_id, "failed")
        jobs = await orch.jobs(created.run_id)
        assert jobs["deploy"].status == "failed" and jobs["deploy"].failure_category == "secrets"
        assert jobs["deploy"].error is not None
        assert "PYPI_TOKEN withheld" in jobs["deploy"].error and "untrusted code" in jobs["deploy"].error
        assert jobs["test"].status == "success"  # a job that declares nothing runs as before
        [dispatch] = agent.received("job.dispatch")
        assert dispatch["job"] == "test" and dispatch.get("secrets", {}) == {}
        assert await _steps(database, created.job_ids["deploy"]) == 0
        assert await _deliveries(database) == []


async def test_an_unreadable_value_fails_the_job_naming_the_secret(database: Database, tmp_path: Path) -> None:
    await _store(database, Keyring(K2), {("PYPI_TOKEN", "repo:acme/app"): "sealed-under-another-key"})
    await _store(database, Keyring(K1), {("PYPI_TOKEN", "org"): "org-value-opens-fine"})
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, SimAgent(orch, "a1", []) as agent:
        agent.auto = "success"
        await agent.connect()
        created = await orch.create_run(workflow([_deploy("deploy", secrets=["PYPI_TOKEN"])]))
        await orch.wait_run(created.run_id, "failed")
        job = (await orch.jobs(created.run_id))["deploy"]
        # never the org value in its place, never an empty one: the job fails, naming the secret and scope
        assert job.error is not None and job.error.startswith("secret PYPI_TOKEN (repo:acme/app) cannot be opened")
        assert agent.received("job.dispatch") == [] and await _deliveries(database) == []


async def test_rotation_with_a_run_in_flight_still_delivers(database: Database, tmp_path: Path) -> None:
    await _store(database, Keyring(K1))
    # the operator restarted with KICI_SECRET_KEY=K2 and KICI_SECRET_KEY_OLD=K1, then runs rotate-key
    async with serve_orchestrator(database, tmp_path, secret_key=K2, old_secret_key=K1) as orch, \
            SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        created = await orch.create_run(workflow([
            _deploy("first", secrets=["PYPI_TOKEN"]),
            _deploy("second", secrets=["DEPLOY_KEY"], needs=[{"name": "first"}]),
        ]))
        [first] = await agent.wait_for("job.dispatch")
        assert first["secrets"] == {"PYPI_TOKEN": "pypi-repo-value-0002"}  # opened with the old key
        await agent.status(first, "running")
        result = await rotate_key(database, Keyring(K2, K1), batch_size=3)  # mid-run, in batches
        assert result.remaining == 0 and result.secrets_resealed == len(VALUES)
        await agent.status(first, "success")
        [_, second] = await agent.wait_for("job.dispatch", 2)
        assert second["secrets"] == {"DEPLOY_KEY": "deploy-repo-value-0004"}
        await agent.status(second, "running")
        await agent.status(second, "success")
        await orch.wait_run(created.run_id, "success")
    # after the rotation the current key alone opens everything
    async with database.read() as conn:
        resolved = await secret_store.resolve_secrets(conn, Keyring(K2), names=["PYPI_TOKEN"], scopes=["org"])
    assert resolved.values == {"PYPI_TOKEN": "pypi-org-value-0001"}


async def test_a_redispatched_job_records_each_delivery(database: Database, tmp_path: Path) -> None:
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch:
        first = SimAgent(orch, "a1", [])
        second = SimAgent(orch, "a2", [])
        try:
            await first.connect()
            created = await orch.create_run(workflow([_deploy("deploy", secrets=["ONLY_ORG"])]))
            [dispatch] = await first.wait_for("job.dispatch")
            await first.send({"type": "job.reject", "run_id": dispatch["run_id"], "job_id": dispatch["job_id"],
                              "reason": "busy"})
            second.auto = "success"
            await second.connect()
            await orch.wait_run(created.run_id, "success")
            [again] = second.received("job.dispatch")
            assert again["secrets"] == {"ONLY_ORG": "only-org-value-0006"} and again["attempt"] == 2
        finally:
            await first.close()
            await second.close()
        rows = await _deliveries(database)
        assert [(r["attempt"], r["secrets"]) for r in rows] == [(1, {"ONLY_ORG": "org"}), (2, {"ONLY_ORG": "org"})]


async def test_jobs_without_declarations_read_no_secret_rows(database: Database, tmp_path: Path) -> None:
    """No extra statement for jobs that declare nothing: counted on the connection's statements."""
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, SimAgent(orch, "a1", []) as agent:
        agent.auto = "success"
        await agent.connect()
        statements: list[str] = []

        def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        engine = database.engine.sync_engine
        sa.event.listen(engine, "before_cursor_execute", seen)
        try:
            created = await orch.create_run(workflow([_deploy("test", secrets=None)]))
            await orch.wait_run(created.run_id, "success")
        finally:
            sa.event.remove(engine, "before_cursor_execute", seen)
        assert statements and not any("scoped_secrets" in s or "secret_deliveries" in s for s in statements)


async def _job_row(orch: Orchestrator, job_id: str) -> Any:
    async with orch.database.read() as conn:
        return (await conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id))).one()


async def test_secrets_are_not_in_the_event_log_or_job_rows(database: Database, tmp_path: Path) -> None:
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, SimAgent(orch, "a1", []) as agent:
        agent.auto = "success"
        await agent.connect()
        created = await orch.create_run(workflow([_deploy("deploy", secrets=["PYPI_TOKEN", "DEPLOY_KEY"])]))
        await orch.wait_run(created.run_id, "success")

        async def written() -> bool:
            return len(await _deliveries(database)) == 1
        await until(written, what="the delivery row")
        row = await _job_row(orch, created.job_ids["deploy"])
        assert not any(v in json.dumps(dict(row._mapping), default=str) for v in VALUES.values())


async def test_secrets_not_resolved_at_claim_are_resolved_at_hand_out(database: Database, tmp_path: Path) -> None:
    """The claim resolves a job's secrets when its run is cached; when it was not (evicted between the
    pre-read and the claim), the hand-out resolves and records them in a transaction of its own."""
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, SimAgent(orch, "a1", []) as agent:
        dispatcher = orch.services.dispatcher

        async def claim_only(conn: Any, *, row: Any, agent: Any, ack_timeout_ms: int) -> tuple[Any, None]:
            return await queue_store.claim_row_in(conn, row, agent, ack_timeout_ms=ack_timeout_ms), None

        dispatcher._claim_in = claim_only  # type: ignore[method-assign]
        agent.auto = "success"
        await agent.connect()
        created = await orch.create_run(workflow([_deploy("deploy", secrets=["PYPI_TOKEN"]),
                                                  _deploy("broken", secrets=["NOPE"])]))
        await orch.wait_run(created.run_id, "failed")
        [dispatch] = agent.received("job.dispatch")
        assert dispatch["secrets"] == {"PYPI_TOKEN": "pypi-repo-value-0002"}
        assert [r["secrets"] for r in await _deliveries(database)] == [{"PYPI_TOKEN": "repo:acme/app"}]
        broken = (await orch.jobs(created.run_id))["broken"]
        assert broken.error == "secret NOPE not found (looked in repo:acme/app, org)"


async def test_an_environment_chosen_by_a_lambda_gives_its_env_scope(database: Database, tmp_path: Path) -> None:
    """The `env:` scope is the job's environment as resolved when its run was created — for a
    `lambda event: …`, known only from the job's row, not from the lock file."""
    await _store(database, Keyring(K1))
    async with serve_orchestrator(database, tmp_path, secret_key=K1) as orch, \
            SimAgent(orch, "a1", [], max_concurrency=2) as agent:
        agent.auto = "success"
        await agent.connect()
        assert (await orch.admin("POST", "/environments", json={"name": "staging"})).status_code == 201
        expr = {"_type": "inline", "expression": 'lambda event: "production" if event.branch == "main" else "staging"'}
        job = {"name": "deploy", "secrets": ["DEPLOY_KEY"], "environments": [{"value": expr, "dynamic": True}]}
        created = await orch.create_run(workflow([job]), branch="dev")
        [dispatch] = await agent.wait_for("job.dispatch")
        assert dispatch["secrets"] == {"DEPLOY_KEY": "staging-value-0009"}
        await orch.wait_run(created.run_id, "success")
        [row] = await _deliveries(database)
        assert row["secrets"] == {"DEPLOY_KEY": "env:staging"}
