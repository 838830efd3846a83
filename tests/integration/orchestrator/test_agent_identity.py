"""Agent identity (issue 9, defect 2): an agent id belongs to the agent token that first registered it.

Real orchestrator app over real WebSockets (simulated agents from `dispatch_harness`), real SQLite or
PostgreSQL. Before the fix, any valid agent token could register a disconnected agent's id, reclaim its
running job and finish it `success` with forged logs and outputs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from kici.engine.events import Event
from kici.engine.protocol import PROTOCOL_VERSION
from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import audit as audit_store
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.sources import create_source
from kici.orchestrator.store.tokens import create_admin_token, create_agent_token, revoke_agent_token

from .dispatch_harness import (
    FAST_TIMEOUTS,
    Orchestrator,
    SimAgent,
    exact,
    serve_app,
    serve_orchestrator,
    until,
    workflow,
)
from .test_providers_github import APP_ID, FakeGitHub, fake_github  # noqa: F401

pytestmark = pytest.mark.timeout(60)


async def _handshake(orch: Orchestrator, token: str, agent_id: str, labels: list[str],
                     in_flight: list[tuple[str, str]], **extra: Any) -> tuple[list[dict[str, Any]], int | None, str]:
    """Authenticate with `token`, register as `agent_id`; everything received until the close."""
    received: list[dict[str, Any]] = []
    async with connect(orch.ws_url, open_timeout=5, close_timeout=2) as ws:
        await ws.send(json.dumps({"type": "auth.request", "token": token, "protocolVersion": PROTOCOL_VERSION}))
        received.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        assert received[0]["type"] == "auth.success", received
        await ws.send(json.dumps({
            "type": "agent.register", "message_id": "m-1", "agent_id": agent_id, "labels": labels,
            "in_flight_jobs": [{"run_id": r, "job_id": j} for r, j in in_flight], **extra,
        }))
        try:
            async with asyncio.timeout(5):
                while True:
                    message = json.loads(await ws.recv())
                    received.append(message)
                    if message["type"] == "register.ack":  # the forger got in: show what it could do
                        for run_id, job_id in in_flight:
                            await ws.send(json.dumps({"type": "job.status", "run_id": run_id, "job_id": job_id,
                                                      "state": "success", "timestamp": 1.0,
                                                      "outputs": {"forged": "yes"}}))
                        await asyncio.sleep(0.5)
                        await ws.close()
        except ConnectionClosed:
            pass
        return received, ws.close_code, ws.close_reason or ""


async def _denials(orch: Orchestrator) -> list[audit_store.AuditRecord]:
    async with orch.database.read() as conn:
        rows = await audit_store.list_audit(conn, outcome="denied")
    return [r for r in rows if r.action == "agent.register"]


async def test_another_token_cannot_take_a_disconnected_agents_id_or_its_job(
    database: Database, tmp_path: Path
) -> None:
    async with serve_orchestrator(database, tmp_path, agent_max_reconnect_delay_ms=20_000) as orch:
        owner = SimAgent(orch, "builder-1", ["linux"])
        await owner.connect()
        created = await orch.create_run(workflow([{"name": "build", "runs_on": exact("linux")}]))
        [dispatch] = await owner.wait_for("job.dispatch")
        await owner.status(dispatch, "running")
        await orch.wait_job(created.run_id, "build", "running")
        await owner.close()
        await orch.wait_job(created.run_id, "build", "recovering")

        async with database.transaction() as conn:
            other = await create_agent_token(conn, name="attacker", labels=["linux"])
        received, code, reason = await _handshake(
            orch, other.plaintext, "builder-1", ["linux"], [(created.run_id, dispatch["job_id"])]
        )
        assert code == 4010, (code, reason, received)
        assert received[-1]["type"] == "auth.failure"
        assert "bound to another agent token" in received[-1]["reason"]
        assert not [m for m in received if m["type"] == "register.ack"]
        job = (await orch.jobs(created.run_id))["build"]
        assert job.status == "recovering" and job.outputs is None
        [denial] = await _denials(orch)
        assert denial.token_id == other.token.id and "builder-1" in (denial.reason or "")
        async with database.read() as conn:
            row = await agent_store.get_agent(conn, "builder-1")
        assert row is not None and not row.connected and row.agent_token_id != other.token.id

        # the rightful agent comes back, takes its job back and finishes it
        again = SimAgent(orch, "builder-1", ["linux"])
        ack = await again.connect(in_flight=[(created.run_id, dispatch["job_id"])])
        assert ack["reclaimed_jobs"] == [dispatch["job_id"]]
        await again.status(dispatch, "success")
        await orch.wait_run(created.run_id, "success")
        await again.close()


async def test_another_token_is_refused_while_the_agent_is_connected_too(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        owner = SimAgent(orch, "builder-1", ["linux"])
        await owner.connect()
        async with database.transaction() as conn:
            other = await create_agent_token(conn, name="attacker", labels=["linux"])
        received, code, _ = await _handshake(orch, other.plaintext, "builder-1", ["linux"], [])
        assert code == 4010 and received[-1]["type"] == "auth.failure"
        assert len(await _denials(orch)) == 1
        assert owner.close_code is None  # the rightful connection is untouched
        await owner.close()


async def test_reclaim_rechecks_the_jobs_labels(database: Database, tmp_path: Path) -> None:
    """The same token, but the agent came back without the label the job asked for: not reclaimed."""
    async with serve_orchestrator(database, tmp_path, agent_max_reconnect_delay_ms=20_000) as orch:
        agent = SimAgent(orch, "gpu-1", ["gpu"], token_labels=["gpu", "linux"])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "train", "runs_on": exact("gpu")}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(created.run_id, "train", "running")
        await agent.close()
        await orch.wait_job(created.run_id, "train", "recovering")
        again = SimAgent(orch, "gpu-1", ["linux"], token_labels=["gpu", "linux"])
        ack = await again.connect(in_flight=[(created.run_id, dispatch["job_id"])])
        assert ack["reclaimed_jobs"] == []
        job = await orch.wait_job(created.run_id, "train", "failed")
        assert "labels" in (job.error or "")
        await again.close()


async def test_revoking_a_token_disconnects_its_agents_and_settles_their_jobs(
    database: Database, tmp_path: Path
) -> None:
    async with serve_orchestrator(database, tmp_path, agent_max_reconnect_delay_ms=20_000) as orch:
        agent = SimAgent(orch, "builder-1", ["linux"], max_concurrency=2)
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build", "runs_on": exact("linux")},
                                                  {"name": "lint", "runs_on": exact("linux")}]))
        dispatches = await agent.wait_for("job.dispatch", count=2)
        started, unstarted = dispatches
        await agent.status(started, "running")
        await orch.wait_job(created.run_id, started["display_name"], "running")
        async with database.read() as conn:
            token_id = (await agent_store.get_agent(conn, "builder-1")).agent_token_id  # type: ignore[union-attr]
        response = await orch.admin("DELETE", f"/agent-tokens/{token_id}")
        assert response.status_code == 200, response.text
        assert await agent.wait_closed(within=5) == 4010
        assert agent.received("auth.failure")
        jobs = await orch.jobs(created.run_id)
        running = jobs[started["display_name"]]
        assert running.status == "failed" and "revoked" in (running.error or "")
        # the never-started job went back to the queue (no agent can take it: it stays queued)
        assert jobs[unstarted["display_name"]].status == "queued"
        async with database.read() as conn:
            row = await agent_store.get_agent(conn, "builder-1")
        assert row is not None and not row.connected

        # a late frame of the revoked agent changes nothing
        other = SimAgent(orch, "builder-2", ["linux"], token_labels=["linux", "spare"])
        other.auto = "success"
        await other.connect()
        await until(lambda: _status(orch, created.run_id, unstarted["display_name"], "success"),
                    what="the requeued job to finish elsewhere")
        assert (await orch.jobs(created.run_id))[started["display_name"]].status == "failed"
        await other.close()


async def test_a_revocation_made_elsewhere_closes_the_connection_at_the_next_token_check(
    database: Database, tmp_path: Path
) -> None:
    """Another orchestrator process (here: a direct database revocation) revoked the token: this process's
    session notices within `token_recheck_s`."""
    timeouts = dataclasses.replace(FAST_TIMEOUTS, token_recheck_s=0.3)
    async with serve_orchestrator(database, tmp_path, timeouts=timeouts) as orch:
        agent = SimAgent(orch, "builder-1", ["linux"])
        await agent.connect()
        async with database.transaction() as conn:
            token_id = (await agent_store.get_agent(conn, "builder-1")).agent_token_id  # type: ignore[union-attr]
            assert token_id is not None and await revoke_agent_token(conn, token_id)
        assert await agent.wait_closed(within=5) == 4010
        assert agent.received("auth.failure")[0]["reason"] == "agent token revoked"


async def test_root_steps_need_a_token_that_allows_them(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        async with database.transaction() as conn:
            plain = await create_agent_token(conn, name="plain", labels=["linux"])
            rooted = await create_agent_token(conn, name="rooted", labels=["linux"], allow_root_steps=True)
        # root agent, steps as root (reported either way): refused with a reason and an audit row
        refused: list[dict[str, Any]] = [
            {"running_as_uid": 0}, {"running_as_uid": 0, "step_uid": 0}, {"running_as_uid": 1000, "step_uid": 0},
        ]
        for extra in refused:
            received, code, _ = await _handshake(orch, plain.plaintext, "root-box", ["linux"], [], **extra)
            assert code == 4010 and "root" in received[-1]["reason"], (extra, received)
        assert len(await _denials(orch)) == 3
        # root agent whose steps run as an unprivileged user: accepted
        received, _, _ = await _handshake(orch, plain.plaintext, "root-box", ["linux"], [],
                                          running_as_uid=0, step_uid=65534)
        assert received[-1]["type"] == "register.ack"
        # a token that allows root steps: accepted
        received, _, _ = await _handshake(orch, rooted.plaintext, "root-box-2", ["linux"], [],
                                          running_as_uid=0, step_uid=0)
        assert received[-1]["type"] == "register.ack"


async def _status(orch: Orchestrator, run_id: str, name: str, status: str) -> bool:
    return (await orch.jobs(run_id))[name].status == status


async def test_the_clone_token_in_a_dispatch_opens_one_repository_read_only(
    database: Database, tmp_path: Path, fake_github: FakeGitHub  # noqa: F811
) -> None:
    """Defect 4's agent-facing half: what `job.dispatch` carries for a GitHub source is an installation
    token scoped to the run's repository with `contents: read` (checked against the fake GitHub's record
    of what it minted)."""
    key = os.urandom(32)
    fake_github.installations["Codertocat/Hello-World"] = 42
    settings = Settings(data_dir=tmp_path / "data", database_url=database.url, sweep_interval_ms=100,
                        dispatch_poll_ms=200)
    app = create_app(settings, database, secret_key=key)
    app.state.agent_timeouts = FAST_TIMEOUTS
    async with database.transaction() as conn:
        source = await create_source(
            conn, key=key, name="gh", kind="github", config={"app_id": APP_ID, "api_url": fake_github.url},
            secrets={"webhook_secret": "s3cret", "private_key": fake_github.private_key_pem},
        )
        owner = await create_admin_token(conn, name="owner", role=AdminRole.OWNER)
    async with serve_app(app, lifespan="on") as port:
        orch = Orchestrator(app, database, f"http://127.0.0.1:{port}", owner.plaintext, source.id)
        agent = SimAgent(orch, "builder-1", [])
        await agent.connect()
        sha = "c" * 40
        async with database.transaction() as conn:
            created = await run_store.create_run(
                conn,
                run_store.NewRun(
                    org_id="default", workflow=workflow([{"name": "build"}]),
                    event=Event(type="push", branch="main", sha=sha, repo="Codertocat/Hello-World"),
                    repo="Codertocat/Hello-World", ref="refs/heads/main", sha=sha, lock_content_hash="l" * 64,
                    delivery_id=None, source_id=source.id,
                ),
                queue_max_depth=settings.queue_max_depth, queue_timeout_ms=settings.queue_timeout_ms,
            )
        await orch.services.dispatcher.runs_created([created.run_id])
        [dispatch] = await agent.wait_for("job.dispatch")
        assert dispatch["repo_url"].endswith("/Codertocat/Hello-World.git")
        assert fake_github.token_scopes[dispatch["token"]] == {
            "repositories": ["Hello-World"], "permissions": {"contents": "read"},
        }
        await agent.close()
