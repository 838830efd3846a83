"""Runs and jobs on real SQLite and PostgreSQL: creation, the needs scheduler, aggregation, guarded status
reports, cancel, stale jobs and workflow timeouts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa

from kici.engine import lockfile as lf
from kici.engine.events import Event
from kici.engine.needs import run_on_for
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.store import runs as store
from kici.orchestrator.store.agents import register_agent
from kici.orchestrator.store.queue import AgentSlot, claim_next
from kici.orchestrator.store.runs import NewRun, RunFinished, RunNotFound
from kici.orchestrator.store.tokens import create_agent_token

SHA = "c" * 40


def job(
    name: str,
    *,
    needs: Sequence[str | tuple[str, str]] = (),
    runs_on: Sequence[str] = (),
    exclude: Sequence[str] = (),
    matrix: list[Any] | dict[str, list[Any]] | None = None,
    regex: str | None = None,
) -> lf.Job:
    need_models = [
        lf.Need(name=n) if isinstance(n, str) else lf.Need(name=n[0], run_on=run_on_for(n[1])) for n in needs
    ]
    matchers = [lf.LabelMatcher(kind="exact", value=label) for label in runs_on]
    if regex is not None:
        matchers.append(lf.LabelMatcher(kind="regex", source=regex))
    return lf.Job(
        name=name,
        steps=[lf.Step(name="s")],
        needs=need_models,
        runs_on=matchers,
        exclude_labels=[lf.LabelMatcher(kind="exact", value=label) for label in exclude] or None,
        matrix=lf.StaticMatrix(values=matrix) if matrix is not None else None,
    )


def workflow(*jobs: lf.Job, name: str = "ci", timeout: int | None = None) -> lf.Workflow:
    return lf.Workflow(
        name=name,
        source=lf.SourceRef(file=".kici/workflows/ci.py", export="#ci"),
        content_hash="wf-hash",
        compile_schema_version=1,
        triggers=[],
        jobs=list(jobs),
        timeout=timeout,
    )


def new_run(wf: lf.Workflow, *, repo: str = "acme/app", delivery: str = "d-1") -> NewRun:
    return NewRun(
        org_id="default",
        workflow=wf,
        event=Event(type="push", branch="main", ref="refs/heads/main", sha=SHA, repo=repo),
        repo=repo,
        ref="refs/heads/main",
        sha=SHA,
        lock_content_hash="lock-hash",
        delivery_id=delivery,
        source_id=None,
    )


async def create(
    db: Database, wf: lf.Workflow, *, depth: int = 1000, timeout_ms: int = 3_600_000, **kw: Any
) -> store.CreatedRun:
    async with db.transaction() as conn:
        return await store.create_run(conn, new_run(wf, **kw), queue_max_depth=depth, queue_timeout_ms=timeout_ms)


async def statuses(db: Database, run_id: str) -> dict[str, str]:
    async with db.read() as conn:
        return {j.name: j.status for j in await store.list_jobs(conn, run_id)}


async def run_of(db: Database, run_id: str) -> store.RunRecord:
    async with db.read() as conn:
        run = await store.get_run(conn, run_id)
    assert run is not None
    return run


async def report(db: Database, job_id: str, state: store.JobReport, agent: str | None = None, **kw: Any) -> bool:
    async with db.transaction() as conn:
        return await store.record_job_state(conn, job_id, state=state, agent_id=agent, **kw) is not None


async def run_job(db: Database, job_id: str, final: store.JobReport = "success", agent: str = "agent-1") -> None:
    """Hand `job_id` to `agent` (claiming until it comes up), start it and finish it."""
    await start(db, job_id, agent)
    assert await report(db, job_id, final, agent)


async def start(db: Database, job_id: str, agent: str = "agent-1") -> None:
    async with db.transaction() as conn:
        await conn.execute(
            schema.jobs.update().where(schema.jobs.c.id == job_id).values(agent_id=agent)
        )
        await conn.execute(
            schema.dispatch_queue.update()
            .where(schema.dispatch_queue.c.job_id == job_id)
            .values(status="dispatched", agent_id=agent)
        )
    assert await report(db, job_id, "running", agent)


async def queue_rows(db: Database, run_id: str) -> dict[str, str]:
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(schema.jobs.c.name, schema.dispatch_queue.c.status)
            .join(schema.jobs, schema.jobs.c.id == schema.dispatch_queue.c.job_id)
            .where(schema.dispatch_queue.c.run_id == run_id)
        )
        return {r.name: r.status for r in rows}


# -- creation -----------------------------------------------------------------------------------------


async def test_create_run_plans_matrix_and_needs_and_queues_only_roots(database: Database) -> None:
    wf = workflow(
        job("build", matrix=["3.11", "3.12"], runs_on=["linux", "docker"], exclude=["slow"]),
        job("lint"),
        job("test", needs=["build", ("lint", "always")]),
        job("deploy", needs=["test"]),
        timeout=600_000,
    )
    created = await create(database, wf)
    assert set(created.job_ids) == {"build (3.11)", "build (3.12)", "lint", "test", "deploy"}
    roots = {created.job_ids[n] for n in ("build (3.11)", "build (3.12)", "lint")}
    assert set(created.queued) == roots and created.failed == [] and created.run_status == "pending"
    assert await statuses(database, created.run_id) == {
        "build (3.11)": "queued", "build (3.12)": "queued", "lint": "queued", "test": "pending", "deploy": "pending",
    }
    assert await queue_rows(database, created.run_id) == {"build (3.11)": "pending", "build (3.12)": "pending",
                                                          "lint": "pending"}
    async with database.read() as conn:
        edges = {
            (r.job_name, r.upstream_name, tuple(r.run_on))
            for r in await conn.execute(sa.select(schema.job_needs).where(schema.job_needs.c.run_id == created.run_id))
        }
        jobs = {j.name: j for j in await store.list_jobs(conn, created.run_id)}
        queue = {
            r.job_id: r
            for r in await conn.execute(
                sa.select(schema.dispatch_queue).where(schema.dispatch_queue.c.run_id == created.run_id)
            )
        }
    assert edges == {
        ("test", "build", ("success",)),
        ("test", "lint", tuple(run_on_for("always"))),
        ("deploy", "test", ("success",)),
    }
    build = jobs["build (3.12)"]
    assert build.job == "build" and build.matrix == {"value": "3.12"} and build.queued_at is not None
    assert build.runs_on == [{"kind": "exact", "value": "linux"}, {"kind": "exact", "value": "docker"}]
    assert queue[build.id].runs_on_labels == ["linux", "docker"] and queue[build.id].exclude_labels == ["slow"]
    assert queue[build.id].expires_at is not None
    assert not jobs["test"].needs_satisfied and jobs["test"].queued_at is None
    run = await run_of(database, created.run_id)
    assert (run.status, run.workflow, run.timeout_ms) == ("pending", "ci", 600_000)
    assert run.workflow_content_hash == "wf-hash"
    assert run.event["sha"] == SHA and run.lock_content_hash == "lock-hash" and run.delivery_id == "d-1"


async def test_queue_timeout_zero_never_expires(database: Database) -> None:
    created = await create(database, workflow(job("a")), timeout_ms=0)
    async with database.read() as conn:
        expires = (await conn.execute(sa.select(schema.dispatch_queue.c.expires_at))).scalar_one()
    assert expires is None and created.queued


async def test_full_queue_fails_the_job_and_finishes_the_run(database: Database) -> None:
    filler = await create(database, workflow(job("x"), job("y")), depth=2)
    assert len(filler.queued) == 2
    created = await create(database, workflow(job("a"), job("b", needs=["a"])), depth=2, delivery="d-2")
    assert created.failed == [created.job_ids["a"]] and created.queued == []
    assert created.skipped == [created.job_ids["b"]] and created.run_status == "failed"
    assert await statuses(database, created.run_id) == {"a": "failed", "b": "skipped"}
    async with database.read() as conn:
        a = await store.get_job(conn, created.job_ids["a"])
    assert a is not None and a.error == "queue full"
    run = await run_of(database, created.run_id)
    assert run.status == "failed" and run.finished_at is not None and "queue full" in (run.failure_reason or "")
    assert await queue_rows(database, created.run_id) == {}


async def test_create_failed_run_records_the_reason(database: Database) -> None:
    async with database.transaction() as conn:
        run_id = await store.create_failed_run(
            conn, workflow_name="lock_resolution", event=Event(type="push", sha=SHA), repo="acme/app",
            ref="refs/heads/main", sha=SHA, delivery_id="d-9", source_id=None, reason="bad lock file",
        )
    run = await run_of(database, run_id)
    assert (run.status, run.failure_reason, run.workflow) == ("failed", "bad lock file", "lock_resolution")
    assert run.finished_at is not None and run.event["type"] == "push"


async def test_list_runs_filters_and_pages_newest_first(database: Database) -> None:
    ids = [(await create(database, workflow(job("a"), name=f"w{i % 2}"), repo=f"acme/r{i % 3}")).run_id
           for i in range(6)]
    async with database.read() as conn:
        everything = await store.list_runs(conn)
        assert [r.id for r in everything] == ids[::-1]
        assert [r.id for r in await store.list_runs(conn, workflow="w0")] == [ids[4], ids[2], ids[0]]
        assert [r.id for r in await store.list_runs(conn, repo="acme/r1")] == [ids[4], ids[1]]
        page = await store.list_runs(conn, limit=2)
        assert [r.id for r in page] == ids[5:3:-1]
        rest = await store.list_runs(conn, limit=10, before=page[-1].created_at)
        assert [r.id for r in rest] == ids[3::-1]
        assert await store.list_runs(conn, status="success") == []
        assert len(await store.list_runs(conn, status=["pending", "failed"])) == 6
        assert await store.list_runs(conn, org_id="other") == []
        assert await store.get_run(conn, "nope") is None and await store.get_job(conn, "nope") is None


# -- needs and aggregation -------------------------------------------------------------------------------


async def test_failed_upstream_skips_the_chain_and_fails_the_run(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b", needs=["a"]), job("c", needs=["b"])))
    ids = created.job_ids
    assert created.queued == [ids["a"]]
    assert await queue_rows(database, created.run_id) == {"a": "pending"}  # B is never queued before A ends
    await start(database, ids["a"])
    assert (await run_of(database, created.run_id)).status == "running"
    assert await statuses(database, created.run_id) == {"a": "running", "b": "pending", "c": "pending"}
    assert await report(database, ids["a"], "failed", "agent-1", error="exit 1")
    assert await statuses(database, created.run_id) == {"a": "failed", "b": "skipped", "c": "skipped"}
    run = await run_of(database, created.run_id)
    assert run.status == "failed" and run.finished_at is not None and run.started_at is not None
    assert run.failure_reason == "job a: exit 1"
    assert await queue_rows(database, created.run_id) == {"a": "failed"}


async def test_when_always_runs_after_a_failure(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b", needs=[("a", "always")]), job("c", needs=["b"])))
    ids = created.job_ids
    await run_job(database, ids["a"], "failed")
    assert await statuses(database, created.run_id) == {"a": "failed", "b": "queued", "c": "pending"}
    await run_job(database, ids["b"], "success")
    assert await statuses(database, created.run_id) == {"a": "failed", "b": "success", "c": "queued"}
    assert (await run_of(database, created.run_id)).status == "running"
    await run_job(database, ids["c"], "success")
    assert (await run_of(database, created.run_id)).status == "failed"


async def test_on_failure_job_is_skipped_when_upstream_succeeds(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("notify", needs=[("a", "on-failure")])))
    await run_job(database, created.job_ids["a"], "success")
    assert await statuses(database, created.run_id) == {"a": "success", "notify": "skipped"}
    assert (await run_of(database, created.run_id)).status == "success"  # skipped counts as success


async def test_a_matrix_upstream_needs_every_child(database: Database) -> None:
    created = await create(database, workflow(job("build", matrix=[1, 2, 3]), job("test", needs=["build"])))
    ids = created.job_ids
    await run_job(database, ids["build (1)"])
    await run_job(database, ids["build (2)"])
    async with database.transaction() as conn:  # settling again changes nothing while a child is running
        again = await store.settle_run(conn, created.run_id)
    assert again.newly_queued == [] and again.skipped == [] and again.run_status == "running"
    assert (await statuses(database, created.run_id))["test"] == "pending"
    await run_job(database, ids["build (3)"])
    assert (await statuses(database, created.run_id))["test"] == "queued"

    other = await create(database, workflow(job("build", matrix=[1, 2]), job("test", needs=["build"])))
    await run_job(database, other.job_ids["build (1)"])
    await run_job(database, other.job_ids["build (2)"], "failed")
    assert (await statuses(database, other.run_id))["test"] == "skipped"


async def test_dependents_of_a_full_queue_are_failed_then_the_run_ends(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b", needs=["a"]), job("c", needs=["b"])), depth=1)
    await start(database, created.job_ids["a"])  # its row is dispatched: the queue has room for one again
    filler = await create(database, workflow(job("x")), depth=1, delivery="d-2")
    assert filler.queued
    async with database.transaction() as conn:
        assert await store.record_job_state(
            conn, created.job_ids["a"], state="success", agent_id="agent-1", limits=store.QueueLimits(max_depth=1)
        )
    assert await statuses(database, created.run_id) == {"a": "success", "b": "failed", "c": "skipped"}
    assert (await run_of(database, created.run_id)).status == "failed"


@pytest.mark.parametrize(
    ("finals", "expected"),
    [
        (("success", "skipped"), "success"),
        (("success", "cancelled"), "cancelled"),
        (("cancelled", "stale"), "failed"),
        (("success", "failed"), "failed"),
    ],
)
async def test_run_aggregation(database: Database, finals: tuple[str, str], expected: str) -> None:
    created = await create(database, workflow(job("a"), job("b")))
    for name, final in zip(("a", "b"), finals, strict=True):
        job_id = created.job_ids[name]
        await start(database, job_id)
        if final == "stale":
            async with database.transaction() as conn:
                assert await store.mark_job_stale(conn, job_id, "no heartbeat")
        else:
            assert await report(database, job_id, final, "agent-1")  # type: ignore[arg-type]
        run = await run_of(database, created.run_id)
        assert run.status == (expected if name == "b" else "running")
    assert (await run_of(database, created.run_id)).finished_at is not None


# -- guarded reports ------------------------------------------------------------------------------------


async def test_late_foreign_and_duplicate_reports_are_ignored(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b")))
    a, b = created.job_ids["a"], created.job_ids["b"]
    assert not await report(database, a, "success", "agent-1")  # queued, never started
    assert not await report(database, "no-such-job", "running", "agent-1")
    await start(database, a, "agent-1")
    assert not await report(database, a, "running", "agent-1")  # duplicate
    assert not await report(database, a, "success", "agent-2")  # foreign agent
    assert await report(database, a, "success", "agent-1", outputs={"v": "1"})
    for state in ("success", "failed", "cancelled", "skipped", "running"):
        assert not await report(database, a, state, "agent-1")
        assert not await report(database, a, state, None)
    await start(database, b, "agent-1")
    async with database.transaction() as conn:
        assert await store.mark_job_stale(conn, b, "no heartbeat for 120s")
        assert not await store.mark_job_stale(conn, b, "again")
    assert not await report(database, b, "success", "agent-1")  # late success after the stale mark
    async with database.read() as conn:
        jobs = {j.name: j for j in await store.list_jobs(conn, created.run_id)}
    assert (jobs["a"].status, jobs["a"].outputs, jobs["a"].agent_id) == ("success", {"v": "1"}, "agent-1")
    assert (jobs["b"].status, jobs["b"].error) == ("timed_out_stale", "no heartbeat for 120s")
    assert jobs["a"].started_at is not None and jobs["a"].finished_at is not None
    run = await run_of(database, created.run_id)
    assert run.status == "failed"
    with pytest.raises(ValueError, match="unknown job state"):
        await report(database, a, "exploded", "agent-1")  # type: ignore[arg-type]


async def test_steps_are_upserted_for_the_owning_agent(database: Database) -> None:
    created = await create(database, workflow(job("a")))
    a = created.job_ids["a"]
    await start(database, a)
    async with database.transaction() as conn:
        assert await store.record_step(conn, a, 0, "checkout", "running", agent_id="agent-1")
        assert await store.record_step(conn, a, 0, "checkout", "success", duration_ms=120, agent_id="agent-1")
        assert await store.record_step(conn, a, 1, "test", "failed", error="boom")
        assert not await store.record_step(conn, a, 2, "x", "running", agent_id="agent-2")
        assert not await store.record_step(conn, "nope", 0, "x", "running")
        found = await store.list_steps(conn, a)
    assert [(s.step_index, s.name, s.status, s.duration_ms, s.error) for s in found] == [
        (0, "checkout", "success", 120, None),
        (1, "test", "failed", None, "boom"),
    ]
    assert found[0].started_at is not None and found[0].finished_at is not None


# -- cancel ----------------------------------------------------------------------------------------------


async def test_cancel_a_run_with_only_queued_jobs_is_immediate(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b"), job("c", needs=["a"])))
    async with database.transaction() as conn:
        result = await store.cancel_run(conn, created.run_id, by="alice", force=False)
    assert result.status == "cancelled" and result.running == [] and result.run_status == "cancelled"
    assert set(result.cancelled_jobs) == set(created.job_ids.values())
    assert set((await statuses(database, created.run_id)).values()) == {"cancelled"}
    assert set((await queue_rows(database, created.run_id)).values()) == {"expired"}
    run = await run_of(database, created.run_id)
    assert (run.status, run.cancelled_by, run.failure_reason) == ("cancelled", "alice", "cancelled by alice")
    assert run.finished_at is not None
    with pytest.raises(RunFinished):
        async with database.transaction() as conn:
            await store.cancel_run(conn, created.run_id, by="alice", force=True)
    with pytest.raises(RunNotFound):
        async with database.transaction() as conn:
            await store.cancel_run(conn, "no-such-run", by="alice", force=False)


async def test_cancel_a_running_run_waits_for_the_agent(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b"), job("c", needs=["a"])))
    ids = created.job_ids
    await start(database, ids["a"], "agent-1")
    async with database.transaction() as conn:  # b is handed to agent-2 but not started
        await conn.execute(schema.jobs.update().where(schema.jobs.c.id == ids["b"]).values(agent_id="agent-2"))
    async with database.transaction() as conn:
        result = await store.cancel_run(conn, created.run_id, by="bob", force=True, reason="workflow_timeout")
    assert result.status == "cancelling" and result.run_status == "cancelling"
    assert set(result.running) == {(ids["a"], "agent-1"), (ids["b"], "agent-2")}
    assert set(result.cancelled_jobs) == {ids["b"], ids["c"]}
    assert await statuses(database, created.run_id) == {"a": "running", "b": "cancelled", "c": "cancelled"}
    run = await run_of(database, created.run_id)
    assert (run.status, run.cancelled_by, run.failure_reason) == ("cancelling", "bob", "workflow_timeout")
    async with database.transaction() as conn:  # a repeated request is allowed while cancelling
        again = await store.cancel_run(conn, created.run_id, by="bob", force=True)
    assert again.status == "cancelling" and again.running == [(ids["a"], "agent-1")]
    assert await report(database, ids["a"], "cancelled", "agent-1")
    run = await run_of(database, created.run_id)
    assert run.status == "cancelled" and run.finished_at is not None


# -- stale jobs and timeouts -----------------------------------------------------------------------------


async def test_stale_detection_uses_heartbeat_or_start(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b"), job("c")))
    ids = created.job_ids
    for name in ("a", "b"):
        await start(database, ids[name], "agent-1")
    now = dt.datetime.now(dt.UTC)
    async with database.transaction() as conn:
        assert await store.touch_heartbeat(conn, ids["a"], "agent-1", now + dt.timedelta(seconds=100))
        assert not await store.touch_heartbeat(conn, ids["a"], "agent-2", now)  # foreign
        assert not await store.touch_heartbeat(conn, ids["c"], "agent-1", now)  # not running
        # b never sent a heartbeat: its start counts
        assert await store.find_stale_jobs(conn, now=now + dt.timedelta(seconds=60), stale_after_ms=120_000) == []
        stale = await store.find_stale_jobs(conn, now=now + dt.timedelta(seconds=200), stale_after_ms=120_000)
        assert stale == [ids["b"]]
        later = await store.find_stale_jobs(conn, now=now + dt.timedelta(seconds=300), stale_after_ms=120_000)
        assert set(later) == {ids["a"], ids["b"]}
        for job_id in later:
            assert await store.mark_job_stale(conn, job_id, "no heartbeat")
    assert await statuses(database, created.run_id) == {"a": "timed_out_stale", "b": "timed_out_stale", "c": "queued"}
    assert await queue_rows(database, created.run_id) == {"a": "failed", "b": "failed", "c": "pending"}


async def test_stale_clocks_start_no_earlier_than_the_orchestrator(database: Database) -> None:
    """Heartbeats that nobody could receive (no orchestrator running) do not count against an agent: with
    the orchestrator started 30 s ago, a job silent for ten minutes is not stale yet under a 60 s
    threshold; it is once the orchestrator itself has been up longer than the threshold."""
    created = await create(database, workflow(job("a")))
    await start(database, created.job_ids["a"], "agent-1")
    now = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    restarted = now - dt.timedelta(seconds=30)
    async with database.read() as conn:
        assert await store.find_stale_jobs(conn, now=now, stale_after_ms=60_000) == [created.job_ids["a"]]
        assert await store.find_stale_jobs(conn, now=now, stale_after_ms=60_000, clock_floor=restarted) == []
        later = now + dt.timedelta(seconds=31)
        assert await store.find_stale_jobs(conn, now=later, stale_after_ms=60_000, clock_floor=restarted) == [
            created.job_ids["a"]
        ]


async def test_stale_clocks_stop_when_the_agents_node_was_last_known_alive(database: Database) -> None:
    """Heartbeats sent through a dead node reached nobody: a job's silence counts only up to the last lease
    renewal of the node holding its agent (lease 3 s, threshold 60 s). A node that died 10 s after the
    last heartbeat leaves the job to its takeover (`recovering`), however long ago that was; one that was
    alive for the whole threshold heard nothing, so the job is stale; an agent held by no node (no cluster
    identity) or a sweep without a lease setting counts as before."""
    created = await create(database, workflow(job("a")))
    job_id = created.job_ids["a"]
    await start(database, job_id, "agent-1")
    lease = dt.timedelta(seconds=3)
    async with database.transaction() as conn:
        token = await create_agent_token(conn, name="pool", labels=[])
        await register_agent(conn, agent_id="agent-1", org_id="default", agent_token_id=token.token.id,
                             labels=[], max_concurrency=1, version=None, hostname=None, node_id="n1")
        started = (await store.get_job(conn, job_id)).started_at  # type: ignore[union-attr]
        assert started is not None
        await conn.execute(schema.nodes.insert().values(
            id="n1", incarnation="i-1", address=None, version=None, started_at=started - dt.timedelta(hours=1),
            lease_expires_at=started + dt.timedelta(seconds=10) + lease))
    now = started + dt.timedelta(minutes=10)

    async def stale(node_lease: dt.timedelta | None = lease) -> list[str]:
        async with database.read() as conn:
            return await store.find_stale_jobs(conn, now=now, stale_after_ms=60_000, node_lease=node_lease)

    async def update(table: sa.Table, **values: Any) -> None:
        async with database.transaction() as conn:
            await conn.execute(table.update().values(**values))

    assert await stale() == []  # n1 died 10 s after the job's last sign of life
    assert await stale(None) == [job_id]
    await update(schema.nodes, lease_expires_at=started + dt.timedelta(seconds=61) + lease)
    assert await stale() == [job_id]  # alive for the whole threshold: it would have heard a heartbeat
    async with database.transaction() as conn:
        await conn.execute(schema.nodes.delete())
    assert await stale() == []  # n1 declared dead, its agents not released yet
    await update(schema.agents, connected=False)
    assert await stale() == [job_id]  # released: the job is the recovery window's (or stale's) now
    await update(schema.agents, connected=True, node_id=None)
    assert await stale() == [job_id]


async def test_acknowledged_job_that_never_starts_goes_stale(database: Database) -> None:
    created = await create(database, workflow(job("a")))
    claim = await claim_next(database, AgentSlot("agent-1", []), ack_timeout_ms=10_000)
    assert claim is not None
    from kici.orchestrator.store.queue import ack

    async with database.transaction() as conn:
        assert await ack(conn, claim.job_id, "agent-1")
        now = dt.datetime.now(dt.UTC)
        assert await store.find_stale_jobs(conn, now=now, stale_after_ms=60_000) == []
        assert await store.find_stale_jobs(conn, now=now + dt.timedelta(minutes=5), stale_after_ms=60_000) == [
            created.job_ids["a"]
        ]


async def test_overdue_runs(database: Database) -> None:
    timed = await create(database, workflow(job("a"), timeout=60_000))
    await create(database, workflow(job("a")))  # no timeout
    now = dt.datetime.now(dt.UTC)
    async with database.read() as conn:
        assert await store.find_overdue_runs(conn, now=now) == []
        assert await store.find_overdue_runs(conn, now=now + dt.timedelta(minutes=2)) == [timed.run_id]
