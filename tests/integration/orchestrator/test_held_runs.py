"""Held runs in the runs store and through a real orchestrator, on SQLite and PostgreSQL: created held
(roots `held`, dependents `pending`, nothing enqueued, no concurrency group joined), released into a busy
workflow or job concurrency group (the roots wait their turn there, FIFO, as a new run's would), ended by
reject and expiry, cancelled like any run, and their workflow timeout counted from the approval."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from kici.engine.events import Event
from kici.engine.lockfile import Workflow
from kici.engine.states import JobEvent
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.holds.gates import Approver
from kici.orchestrator.holds.service import AuditContext
from kici.orchestrator.holds.trust import expire_hold
from kici.orchestrator.store import runs as run_store

from .dispatch_harness import Orchestrator, SimAgent, serve_orchestrator, workflow

GROUP = {"group": "deploy"}
OWNER = AuditContext("default", {"actor": "token:test"})
APPROVER = Approver(kind="token", name="test", role="owner")


async def create_held(orch: Orchestrator, wf: Workflow, *, expiry: dt.timedelta | None = None) -> str:
    settings = orch.app.state.kici.settings
    async with orch.database.transaction() as conn:
        created = await run_store.create_run(
            conn,
            run_store.NewRun(
                org_id="default", workflow=wf, event=Event(type="pr", branch="f", sha="b" * 40, repo="acme/app"),
                repo="acme/app", ref="refs/pull/2/head", sha="b" * 40, lock_content_hash="l" * 64,
                delivery_id=None, source_id=orch.source_id, trust="untrusted", secrets_allowed=False,
                hold_reason="pull request #2 from fork m/app by m (NONE): held for approval", hold_expiry=expiry,
            ),
            queue_max_depth=settings.queue_max_depth, queue_timeout_ms=settings.queue_timeout_ms,
        )
    assert created.run_status == "held" and created.queued == []
    return created.run_id


async def statuses(orch: Orchestrator, run_id: str) -> dict[str, str]:
    return {name: job.status for name, job in (await orch.jobs(run_id)).items()}


async def queue_rows(orch: Orchestrator, run_id: str) -> int:
    async with orch.database.read() as conn:
        query = sa.select(sa.func.count()).select_from(schema.dispatch_queue).where(
            schema.dispatch_queue.c.run_id == run_id)
        return int((await conn.execute(query)).scalar_one())


async def finish(agent: SimAgent, dispatch: dict[str, Any]) -> None:
    await agent.status(dispatch, "running")
    await agent.status(dispatch, "success")


async def test_created_held_nothing_enqueued_and_settle_leaves_it(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        wf = workflow([{"name": "build"}, {"name": "test", "needs": [{"name": "build"}]}], concurrency=GROUP)
        run_id = await create_held(orch, wf, expiry=dt.timedelta(hours=1))
        assert await statuses(orch, run_id) == {"build": "held", "test": "pending"}
        assert await queue_rows(orch, run_id) == 0
        run = await orch.run(run_id)
        assert run.concurrency_group_id is None and run.hold_expires_at is not None
        assert run.hold_expires_at - run.created_at == dt.timedelta(hours=1)
        async with database.transaction() as conn:
            settled = await run_store.settle_run(conn, run_id)
        assert settled.run_status == "held" and settled.newly_queued == []
        assert await statuses(orch, run_id) == {"build": "held", "test": "pending"}
        # a held run can be cancelled like any other
        async with database.transaction() as conn:
            result = await run_store.cancel_run(conn, run_id, by="token:x", force=False)
        assert result.status == "cancelled" and (await orch.run(run_id)).status == "cancelled"


async def test_an_approved_run_waits_its_turn_in_a_busy_workflow_group(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        wf = workflow([{"name": "deploy"}, {"name": "notify", "needs": [{"name": "deploy"}]}], concurrency=GROUP)
        held = await create_held(orch, wf)
        trusted = await orch.create_run(wf)  # created after the held run, but the group's first member
        [first] = await agent.wait_for("job.dispatch")
        assert first["run_id"] == trusted.run_id
        decision = await orch.services.held.approve(held, APPROVER, OWNER)
        assert decision.released_job_ids == []  # the group is busy: the root waits in it
        detail = await orch.run(held)
        assert detail.status == "pending" and detail.trust == "approved" and detail.wait_reason == "concurrency: deploy"
        assert await statuses(orch, held) == {"deploy": "waiting", "notify": "pending"}
        await finish(agent, first)
        [*_, notify] = await agent.wait_for("job.dispatch", 2)
        await finish(agent, notify)
        await orch.wait_run(trusted.run_id, "success")
        [*_, released] = await agent.wait_for("job.dispatch", 3)
        assert released["run_id"] == held
        await finish(agent, released)
        [*_, last] = await agent.wait_for("job.dispatch", 4)
        await finish(agent, last)
        await orch.wait_run(held, "success")


async def test_an_approved_root_with_a_busy_job_group_waits(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        wf = workflow([{"name": "migrate", "concurrencyGroup": "db"}])
        held = await create_held(orch, wf)
        trusted = await orch.create_run(wf)
        [first] = await agent.wait_for("job.dispatch")
        assert first["run_id"] == trusted.run_id
        await orch.services.held.approve(held, APPROVER, OWNER)
        assert await statuses(orch, held) == {"migrate": "waiting"}
        await finish(agent, first)
        [*_, second] = await agent.wait_for("job.dispatch", 2)
        assert second["run_id"] == held


async def test_expiry_and_rejection_end_the_run(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, sweep_interval_ms=60_000) as orch:
        wf = workflow([{"name": "build"}, {"name": "test", "needs": [{"name": "build"}]}])
        expiring = await create_held(orch, wf, expiry=dt.timedelta(hours=72))
        run = await orch.run(expiring)
        assert run.hold_expires_at is not None
        async with database.transaction() as conn:
            assert not await expire_hold(conn, expiring, now=run.hold_expires_at - dt.timedelta(seconds=1))
            assert await run_store.find_expired_holds(conn, now=run.hold_expires_at) == [expiring]
            assert await expire_hold(conn, expiring, now=run.hold_expires_at)
        ended = await orch.run(expiring)
        assert ended.status == "cancelled" and ended.failure_reason == "hold expired after 72h"
        assert ended.cancelled_by == "system" and await statuses(orch, expiring) == {"build": "cancelled",
                                                                                      "test": "cancelled"}
        rejected = await create_held(orch, wf)
        async with database.transaction() as conn:
            await run_store.end_held_run(conn, rejected, event=JobEvent.REJECT, by="token:t", reason="no")
            try:
                await run_store.end_held_run(conn, rejected, event=JobEvent.REJECT, by="token:t", reason="no")
            except run_store.RunNotHeld as exc:
                assert exc.status == "cancelled"
            else:
                raise AssertionError("a decided run was rejected twice")
        assert (await orch.run(rejected)).failure_reason == "no"


async def test_the_workflow_timeout_counts_from_the_approval(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, sweep_interval_ms=60_000) as orch:
        wf = workflow([{"name": "build"}], timeout=60_000)
        held = await create_held(orch, wf)
        async with database.transaction() as conn:  # held for two hours
            await conn.execute(schema.runs.update().where(schema.runs.c.id == held).values(
                created_at=utcnow() - dt.timedelta(hours=2)))
        await orch.services.held.approve(held, APPROVER, OWNER)
        async with database.read() as conn:
            assert await run_store.find_overdue_runs(conn, now=utcnow()) == []
            later = utcnow() + dt.timedelta(seconds=61)
            assert await run_store.find_overdue_runs(conn, now=later) == [held]


async def test_approving_a_held_run_does_not_approve_its_deployment(database: Database, tmp_path: Path) -> None:
    """Trust and environment gates decide different things: the approval that releases a held run's root
    job sends it to its environment's gate (waiting for that environment's own approval), not to the
    queue; a second approval through the same held command passes the gate; a refused environment fails
    the job before any step, as it would unheld."""
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        reply = await orch.admin("POST", "/environments", json={"name": "production", "required_approvals": 1})
        assert reply.status_code == 201, reply.text
        wf = workflow([{"name": "deploy", "environments": [{"value": "production"}]}])
        held = await create_held(orch, wf)
        assert {g.kind.value for g in await orch.services.held.list(org_id="default")} == {"trust"}

        first = await orch.services.held.approve(held, APPROVER, OWNER)
        assert first.released_job_ids == []
        job = (await orch.jobs(held))["deploy"]
        assert (job.status, job.wait_reason) == ("waiting", "environment: production, needs 1 approval")
        assert await queue_rows(orch, held) == 0 and agent.received("job.dispatch") == []
        pending = await orch.services.held.list(org_id="default", run_id=held)
        assert [(g.kind.value, g.environment) for g in pending] == [("environment", "production")]

        second = await orch.services.held.approve(held, APPROVER, OWNER)
        assert second.released_job_ids == [job.id]
        [dispatch] = await agent.wait_for("job.dispatch")
        assert dispatch["run_id"] == held
        await finish(agent, dispatch)
        await orch.wait_run(held, "success")

        # an environment that does not exist: the approved root fails before any step
        missing = await create_held(orch, workflow([{"name": "deploy", "environments": [{"value": "nowhere"}]}]))
        await orch.services.held.approve(missing, APPROVER, OWNER)
        job = (await orch.jobs(missing))["deploy"]
        assert (job.status, job.error) == ("failed", "environment 'nowhere' does not exist")
        await orch.wait_run(missing, "failed")
