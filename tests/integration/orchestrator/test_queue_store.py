"""The dispatch queue on real SQLite and PostgreSQL: label routing, oldest-first claims, acks and requeues,
expiry, agent-disconnect recovery, and exactly-once claims under concurrent claimers (tasks and processes)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.store import queue as q
from kici.orchestrator.store import runs as store
from kici.orchestrator.store.queue import AgentSlot, Claim, claim_next

from .conftest import orchestrator_env
from .test_runs_store import create, job, report, run_of, statuses, workflow

ACK_MS = 10_000


async def claim(db: Database, agent_id: str, labels: list[str], taints: list[str] | None = None) -> Claim | None:
    return await claim_next(db, AgentSlot(agent_id, labels, taints or []), ack_timeout_ms=ACK_MS)


async def queue_row(db: Database, job_id: str) -> sa.Row[tuple[object, ...]]:
    async with db.read() as conn:
        query = sa.select(schema.dispatch_queue).where(schema.dispatch_queue.c.job_id == job_id)
        return (await conn.execute(query)).one()


def later(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)


async def test_claim_routes_by_labels_excludes_and_taints_oldest_first(database: Database) -> None:
    plain = await create(database, workflow(job("plain")))
    docker = await create(database, workflow(job("docker", runs_on=["linux", "docker"])))
    no_slow = await create(database, workflow(job("fast", runs_on=["linux"], exclude=["slow"])))
    gpu = await create(database, workflow(job("gpu", runs_on=["gpu"])))
    regex = await create(database, workflow(job("arm", regex="arm(64)?")))
    async with database.read() as conn:
        assert await q.queue_depth(conn) == 5
        listed = await q.list_queue(conn)
    assert [r.job_name for r in listed] == ["plain", "docker", "fast", "gpu", "arm"]
    assert listed[1].runs_on_labels == ["linux", "docker"] and listed[2].exclude_labels == ["slow"]

    # a tainted gpu agent only takes jobs that ask for `gpu` by name
    got = await claim(database, "gpu-1", ["gpu", "linux", "docker"], taints=["gpu"])
    assert got is not None and got.job_id == gpu.job_ids["gpu"] and got.attempt == 1 and got.run_id == gpu.run_id
    # a slow linux agent: not `fast` (excluded), not `docker` (label missing): the oldest it can run is plain
    got = await claim(database, "slow-1", ["linux", "slow"])
    assert got is not None and got.job_id == plain.job_ids["plain"]
    assert await claim(database, "slow-1", ["linux", "slow"]) is None
    got = await claim(database, "arm-1", ["arm64"])
    assert got is not None and got.job_id == regex.job_ids["arm"]
    got = await claim(database, "big-1", ["linux", "docker", "x64"])
    assert got is not None and got.job_id == docker.job_ids["docker"]
    got = await claim(database, "big-1", ["linux", "docker", "x64"])
    assert got is not None and got.job_id == no_slow.job_ids["fast"]
    assert await claim(database, "big-1", ["linux", "docker", "x64"]) is None

    row = await queue_row(database, docker.job_ids["docker"])
    assert (row.status, row.agent_id, row.dispatch_attempts) == ("dispatched", "big-1", 1)
    assert row.ack_deadline is not None and row.dispatched_at is not None
    async with database.read() as conn:
        assert await q.queue_depth(conn) == 0
        claimed = await store.get_job(conn, docker.job_ids["docker"])
        assert [r.status for r in await q.list_queue(conn)] == ["dispatched"] * 5
    assert claimed is not None and (claimed.status, claimed.agent_id) == ("queued", "big-1")


async def test_regex_jobs_beyond_the_first_batch_are_found(database: Database) -> None:
    await create(database, workflow(job("other", matrix=list(range(q.CLAIM_BATCH + 5)), regex="other")))
    wanted = await create(database, workflow(job("mine", regex="mine-.*")))
    got = await claim(database, "a", ["mine-1"])
    assert got is not None and got.job_id == wanted.job_ids["mine"]


async def test_expired_rows_are_not_claimed_and_expire_to_timed_out_stale(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b", needs=["a"])), timeout_ms=1)
    await asyncio.sleep(0.01)
    assert await claim(database, "agent-1", []) is None
    async with database.transaction() as conn:
        assert await q.expire_queue(conn, now=later(0)) == [created.job_ids["a"]]
        assert await q.expire_queue(conn, now=later(0)) == []
    assert await statuses(database, created.run_id) == {"a": "timed_out_stale", "b": "skipped"}
    assert (await queue_row(database, created.job_ids["a"])).status == "expired"
    run = await run_of(database, created.run_id)
    assert run.status == "failed" and run.finished_at is not None


async def test_ack_reject_and_requeue_after_the_deadline_then_fail(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b", needs=["a"])))
    a = created.job_ids["a"]
    got = await claim(database, "agent-1", [])
    assert got is not None and got.job_id == a
    async with database.transaction() as conn:
        assert not await q.ack(conn, a, "agent-2")
        assert await q.ack(conn, a, "agent-1")
        assert not await q.ack(conn, a, "agent-1")  # duplicate
        # acknowledged: the deadline sweep leaves it alone
        assert await q.find_expired_acks(conn, now=later(60)) == []
        assert await q.requeue_expired_acks(conn, now=later(60), max_attempts=3) == ([], [])
        assert not await q.reject(conn, a, "agent-2")
        assert await q.reject(conn, a, "agent-1")
        assert not await q.reject(conn, a, "agent-1")
    row = await queue_row(database, a)
    assert (row.status, row.agent_id, row.ack_deadline) == ("pending", None, None)

    for attempt in (2, 3):
        got = await claim(database, f"agent-{attempt}", [])
        assert got is not None and got.job_id == a and got.attempt == attempt
        async with database.transaction() as conn:
            assert await q.requeue_expired_acks(conn, now=later(1), max_attempts=3) == ([], [])  # not yet due
            assert await q.find_expired_acks(conn, now=later(60)) == [(a, f"agent-{attempt}")]
            expected = ([a], []) if attempt == 2 else ([], [a])
            assert await q.requeue_expired_acks(conn, now=later(60), max_attempts=3) == expected
        if attempt == 2:
            async with database.read() as conn:
                found = await store.get_job(conn, a)
            assert found is not None and (found.status, found.agent_id) == ("queued", None)
            assert not await report(database, a, "running", "agent-2")  # the agent lost it
    async with database.read() as conn:
        failed = await store.get_job(conn, a)
    assert failed is not None and failed.error == "dispatch not acknowledged after 3 attempts"
    assert await statuses(database, created.run_id) == {"a": "failed", "b": "skipped"}
    assert (await queue_row(database, a)).status == "failed"
    assert (await run_of(database, created.run_id)).status == "failed"


async def test_busy_or_draining_rejections_never_fail_the_job(database: Database) -> None:
    created = await create(database, workflow(job("a")))
    a = created.job_ids["a"]
    for attempt in range(1, 6):
        got = await claim(database, "agent-1", [])
        assert got is not None and got.job_id == a and got.attempt == attempt  # each hand-out numbered
        async with database.transaction() as conn:
            assert await q.reject(conn, a, "agent-1", max_attempts=2, transient=True) == "requeued"
    assert await statuses(database, created.run_id) == {"a": "queued"}
    got = await claim(database, "agent-1", [])
    assert got is not None and got.attempt == 6
    async with database.transaction() as conn:  # a refusal about the job itself ends it past the limit
        assert await q.reject(conn, a, "agent-1", max_attempts=2) == "failed"
    assert await statuses(database, created.run_id) == {"a": "failed"}


async def test_running_report_acknowledges_the_dispatch(database: Database) -> None:
    created = await create(database, workflow(job("a")))
    got = await claim(database, "agent-1", [])
    assert got is not None
    assert not await report(database, got.job_id, "running", "agent-2")
    assert await report(database, got.job_id, "running", "agent-1")
    assert (await queue_row(database, got.job_id)).ack_deadline is None
    assert (await run_of(database, created.run_id)).status == "running"
    assert await report(database, got.job_id, "success", "agent-1")
    assert (await queue_row(database, got.job_id)).status == "completed"
    assert (await run_of(database, created.run_id)).status == "success"


async def test_reclaim_by_the_holding_agent_counts_as_its_ack_and_heartbeat(database: Database) -> None:
    """An agent reconnects (to a restarted orchestrator) holding a job whose ack died with the previous
    process: its ack deadline is long past. Reclaiming clears it — the ack-deadline sweep used to requeue
    the job a moment later and hand it to another agent, so its steps ran twice — and a running job's stale
    clock restarts at the reclaim."""
    created = await create(database, workflow(job("a"), job("b")))
    ids = created.job_ids
    for _ in range(2):
        assert await claim(database, "agent-1", []) is not None
    assert await report(database, ids["b"], "running", "agent-1")
    async with database.transaction() as conn:
        await conn.execute(schema.jobs.update().where(schema.jobs.c.id == ids["b"])
                           .values(last_heartbeat_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)))
        assert await q.find_expired_acks(conn, now=later(60)) == [(ids["a"], "agent-1")]
        assert set(await q.reclaim(conn, "agent-1", [ids["a"], ids["b"]])) == {ids["a"], ids["b"]}
        assert await q.find_expired_acks(conn, now=later(60)) == []
        assert await q.requeue_expired_acks(conn, now=later(60), max_attempts=3) == ([], [])
        assert await store.find_stale_jobs(conn, now=later(1), stale_after_ms=60_000) == []
    assert (await queue_row(database, ids["a"])).status == "dispatched"
    assert await report(database, ids["a"], "running", "agent-1")
    assert await report(database, ids["a"], "success", "agent-1")


async def test_disconnect_recover_reclaim_or_fail_after_the_window(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b"), job("c"), job("d")))
    ids = created.job_ids
    claims = [await claim(database, "agent-1", []) for _ in range(4)]
    assert [c.job_id for c in claims if c] == [ids["a"], ids["b"], ids["c"], ids["d"]]
    for name in ("a", "b"):
        assert await report(database, ids[name], "running", "agent-1")
    deadline = later(120)
    async with database.transaction() as conn:
        released = await q.release_agent_jobs(conn, "agent-1", recovery_deadline=deadline)
    assert set(released) == set(ids.values())
    assert await statuses(database, created.run_id) == {"a": "recovering", "b": "recovering", "c": "queued",
                                                       "d": "queued"}
    assert {(await queue_row(database, i)).status for i in ids.values()} == {"recovering"}

    # it comes back in time with a and c in flight: those resume, b (started) fails, d (never started) requeues
    async with database.transaction() as conn:
        assert set(await q.reclaim(conn, "agent-1", [ids["a"], ids["c"]])) == {ids["a"], ids["c"]}
    assert await statuses(database, created.run_id) == {"a": "running", "b": "failed", "c": "queued",
                                                       "d": "queued"}
    assert (await queue_row(database, ids["d"])).status == "pending"
    assert (await queue_row(database, ids["a"])).status == "dispatched"
    assert await report(database, ids["a"], "success", "agent-1")

    # it drops again and never returns: the window ends; c, dispatched but never started, goes back to the
    # queue (nothing of it ran) rather than failing
    async with database.transaction() as conn:
        assert await q.release_agent_jobs(conn, "agent-1", recovery_deadline=later(120)) == [ids["c"]]
        assert await q.settle_unrecovered(conn, now=later(60)) == ([], [])
        assert await q.settle_unrecovered(conn, now=later(180)) == ([], [ids["c"]])
    async with database.read() as conn:
        c = await store.get_job(conn, ids["c"])
    assert c is not None and (c.status, c.error, c.agent_id) == ("queued", None, None)
    assert (await queue_row(database, ids["c"])).status == "pending"
    for name in ("c", "d"):
        got = await claim(database, "agent-2", [])
        assert got is not None and got.job_id == ids[name]
        await report(database, ids[name], "running", "agent-2")
        await report(database, ids[name], "success", "agent-2")
    run = await run_of(database, created.run_id)
    assert run.status == "failed" and run.finished_at is not None  # b failed

    # a started job whose agent never comes back fails when the window ends
    started = await create(database, workflow(job("e")))
    got = await claim(database, "agent-3", [])
    assert got is not None and got.job_id == started.job_ids["e"]
    assert await report(database, got.job_id, "running", "agent-3")
    async with database.transaction() as conn:
        assert await q.release_agent_jobs(conn, "agent-3", recovery_deadline=later(120)) == [got.job_id]
        assert await q.settle_unrecovered(conn, now=later(180)) == ([got.job_id], [])
    async with database.read() as conn:
        e = await store.get_job(conn, got.job_id)
    assert e is not None and (e.status, e.error) == ("failed", "recovery timeout exceeded")


async def test_cancel_expires_pending_rows_so_nothing_claims_them(database: Database) -> None:
    created = await create(database, workflow(job("a"), job("b")))
    async with database.transaction() as conn:
        await store.cancel_run(conn, created.run_id, by="alice", force=False)
    assert await claim(database, "agent-1", []) is None


# -- the race ---------------------------------------------------------------------------------------------

JOBS = 320
# two matrix jobs of 160: a matrix expands to at most 256 jobs
RACE_WORKFLOW = workflow(*(job(f"t{i}", matrix=list(range(JOBS // 2)), runs_on=["linux"]) for i in range(2)))


async def _drain(db: Database, agent: str, out: list[str]) -> None:
    while (got := await claim(db, agent, ["linux"])) is not None:
        out.append(got.job_id)


async def _all_job_ids(db: Database, run_id: str) -> set[str]:
    async with db.read() as conn:
        return {j.id for j in await store.list_jobs(conn, run_id)}


async def test_concurrent_claimers_take_every_job_exactly_once(database: Database) -> None:
    created = await create(database, RACE_WORKFLOW)
    assert len(created.queued) == JOBS
    results: list[list[str]] = [[] for _ in range(8)]
    await asyncio.gather(*(_drain(database, f"agent-{i}", results[i]) for i in range(8)))
    claimed = [job_id for result in results for job_id in result]
    duplicates = [job_id for job_id, n in Counter(claimed).items() if n > 1]
    assert duplicates == [] and set(claimed) == await _all_job_ids(database, created.run_id)
    assert sum(1 for r in results if r) >= 2, "the claimers did not overlap at all"
    async with database.read() as conn:
        assert await q.queue_depth(conn) == 0
        agents = dict(
            (r.job_id, r.agent_id) for r in await conn.execute(sa.select(schema.dispatch_queue))
        )
    for index, result in enumerate(results):
        assert all(agents[job_id] == f"agent-{index}" for job_id in result)


CLAIMER = """
import asyncio, json, sys, time
from pathlib import Path
from kici.orchestrator.db.database import Database
from kici.orchestrator.store.queue import AgentSlot, claim_next

async def drain(db, agent, out):
    while (got := await claim_next(db, AgentSlot(agent, ["linux"]), ack_timeout_ms=10_000)) is not None:
        out.append(got.job_id)

async def main(url, name):
    db = Database.connect(url)
    results = [[] for _ in range(4)]
    try:
        await db.ping()
        print("ready", flush=True)
        go = Path(sys.argv[3])
        while not go.exists():
            await asyncio.sleep(0.01)
        await asyncio.gather(*(drain(db, f"{name}-{i}", results[i]) for i in range(4)))
    finally:
        await db.close()
    print(json.dumps([j for r in results for j in r]), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_claimers_in_two_processes_take_every_job_exactly_once(
    database: Database, database_url: str, tmp_path: Path
) -> None:
    created = await create(database, RACE_WORKFLOW)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, database_url, f"p{i}", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=orchestrator_env(tmp_path),
        )
        for i in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
        go.touch()
        outputs = [await asyncio.to_thread(proc.communicate, timeout=240) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    per_process = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    claimed = [job_id for ids in per_process for job_id in ids]
    assert [job_id for job_id, n in Counter(claimed).items() if n > 1] == []
    assert set(claimed) == await _all_job_ids(database, created.run_id)
    async with database.read() as conn:
        assert await q.queue_depth(conn) == 0


async def test_claimers_racing_for_one_job_dispatch_it_once(database: Database) -> None:
    for round_ in range(10):
        created = await create(database, workflow(job("only")), delivery=f"d-{round_}")
        got = await asyncio.gather(*(claim(database, f"agent-{i}", []) for i in range(8)))
        winners = [g for g in got if g is not None]
        assert len(winners) == 1 and winners[0].job_id == created.job_ids["only"]


async def test_siblings_finishing_concurrently_finish_the_run(database: Database) -> None:
    """Each report settles the run under the run's lock: the last of several concurrent reports sees the
    others and finishes the run (without the lock, each could see the others still running)."""
    for round_ in range(3):
        created = await create(database, workflow(job("t", matrix=list(range(8))), job("after", needs=["t"])),
                               delivery=f"d-{round_}")
        children = [created.job_ids[f"t ({i})"] for i in range(8)]
        for index in range(8):
            got = await claim(database, f"agent-{index}", [])
            assert got is not None
            assert await report(database, got.job_id, "running", f"agent-{index}")
        async with database.read() as conn:
            owners = {j.id: j.agent_id for j in await store.list_jobs(conn, created.run_id)}
        results = await asyncio.gather(
            *(report(database, job_id, "success", owners[job_id]) for job_id in children)
        )
        assert all(results)
        assert (await statuses(database, created.run_id))["after"] == "queued"
        got = await claim(database, "agent-x", [])
        assert got is not None and got.job_id == created.job_ids["after"]
        assert await report(database, got.job_id, "running", "agent-x")
        assert await report(database, got.job_id, "success", "agent-x")
        assert (await run_of(database, created.run_id)).status == "success"


async def test_cancel_racing_with_claimers_tells_every_agent_that_got_a_job(database: Database) -> None:
    """A job claimed before the cancel is listed with its agent (so it gets `job.cancel`); after the cancel
    nothing more can be claimed. No claimed job is forgotten."""
    created = await create(database, workflow(job("t", matrix=list(range(60)))))
    claimed: list[list[str]] = [[] for _ in range(4)]
    started = asyncio.Event()

    async def drain(index: int) -> None:
        while (got := await claim(database, f"agent-{index}", [])) is not None:
            claimed[index].append(got.job_id)
            if sum(map(len, claimed)) >= 5:
                started.set()
            await asyncio.sleep(0)

    async def cancel() -> store.CancelResult:
        await started.wait()  # the cancel lands while the claimers are draining
        async with database.transaction() as conn:
            return await store.cancel_run(conn, created.run_id, by="alice", force=False)

    cancelling = asyncio.create_task(cancel())
    await asyncio.gather(*(drain(i) for i in range(4)))
    result = await cancelling
    told = dict(result.running)
    for index, ids in enumerate(claimed):
        for job_id in ids:
            assert told.get(job_id) == f"agent-{index}"
    assert set(told) == {job_id for ids in claimed for job_id in ids}
    assert set((await statuses(database, created.run_id)).values()) == {"cancelled"}
    assert (await run_of(database, created.run_id)).status == "cancelled"
    assert await claim(database, "late", []) is None


async def test_a_row_another_claimer_holds_is_skipped_not_waited_for(database: Database) -> None:
    """PostgreSQL: while another transaction (another node's claim) holds a queue row's lock, a claim of that
    row answers None at once instead of waiting behind it; once the lock is gone the row can be claimed."""
    if not database.is_postgresql:
        pytest.skip("row locks are PostgreSQL's; SQLite has one writer at a time")
    created = await create(database, workflow(job("only")), delivery="skip-locked")
    async with database.read() as conn:
        [row] = await q.pending_rows(conn, limit=10)
    assert row.job_id == created.job_ids["only"]
    slot = AgentSlot("agent-b", [])
    holder = database.engine.connect()
    await holder.start()
    try:
        locking = await holder.begin()
        await holder.execute(sa.text("SELECT id FROM dispatch_queue WHERE id = :id FOR UPDATE"), {"id": row.queue_id})
        async with asyncio.timeout(5):  # before the fix: blocked until the holder's transaction ended
            async with database.transaction() as conn:
                assert await q.claim_row_in(conn, row, slot, ack_timeout_ms=ACK_MS) is None
        await locking.rollback()
    finally:
        await holder.close()
    async with database.transaction() as conn:
        claimed = await q.claim_row_in(conn, row, slot, ack_timeout_ms=ACK_MS)
    assert claimed is not None and claimed.job_id == created.job_ids["only"]
