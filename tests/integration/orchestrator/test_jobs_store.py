"""State-guarded job status writes: the engine's table, enforced by the database on both backends."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
import sqlalchemy as sa

from kici.engine.states import TERMINAL_STATES, TRANSITIONS, JobEvent, JobState
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.store.jobs import guard_sources, set_job_status

from .conftest import insert_job, insert_run


async def status_of(conn: Any, job_id: str) -> str:
    return str((await conn.execute(sa.select(schema.jobs.c.status).where(schema.jobs.c.id == job_id))).scalar_one())


async def test_a_job_walks_the_happy_path_and_then_never_changes(database: Database) -> None:
    async with database.transaction() as conn:
        job_id = await insert_job(conn, await insert_run(conn))
        assert await set_job_status(conn, job_id, JobState.QUEUED, JobEvent.ENQUEUE)
        assert not await set_job_status(conn, job_id, JobState.QUEUED, JobEvent.ENQUEUE)  # duplicate
        assert not await set_job_status(conn, job_id, JobState.SUCCESS, JobEvent.SUCCEED)  # not running yet
        assert await status_of(conn, job_id) == "queued"
        assert await set_job_status(conn, job_id, "running", "START", values={"agent_id": "agent-1"})
        assert await set_job_status(conn, job_id, JobState.SUCCESS, JobEvent.SUCCEED)
        row = (await conn.execute(sa.select(schema.jobs).where(schema.jobs.c.id == job_id))).one()
        assert row.status == "success" and row.agent_id == "agent-1" and row.finished_at is not None
        # terminal: a late stale mark, cancel or failure updates nothing
        assert not await set_job_status(conn, job_id, JobState.TIMED_OUT_STALE, JobEvent.STALE)
        assert not await set_job_status(conn, job_id, JobState.CANCELLED, JobEvent.CANCEL)
        assert not await set_job_status(conn, job_id, JobState.FAILED, JobEvent.FAIL)
        assert await status_of(conn, job_id) == "success"


async def test_only_the_owning_agent_moves_its_job(database: Database) -> None:
    async with database.transaction() as conn:
        job_id = await insert_job(conn, await insert_run(conn), status="running", agent_id="agent-1")
        assert not await set_job_status(conn, job_id, JobState.FAILED, JobEvent.FAIL, owned_by="agent-2")
        assert await set_job_status(conn, job_id, JobState.FAILED, JobEvent.FAIL, owned_by="agent-1")


def test_guard_sources_are_the_states_the_event_leaves_towards_the_target() -> None:
    assert guard_sources(JobState.SUCCESS, JobEvent.CANCEL) == frozenset()
    assert guard_sources(JobState.CANCELLED, JobEvent.COMPLETE) == {JobState.CANCELLING}
    assert guard_sources(JobState.RUNNING, JobEvent.START) == {JobState.QUEUED, JobState.RECOVERING}


async def test_impossible_pairs_raise(database: Database) -> None:
    async with database.transaction() as conn:
        job_id = await insert_job(conn, await insert_run(conn))
        with pytest.raises(ValueError, match="never leads to success"):
            await set_job_status(conn, job_id, JobState.SUCCESS, JobEvent.CANCEL)
        with pytest.raises(ValueError, match="may not set"):
            await set_job_status(conn, job_id, JobState.QUEUED, JobEvent.ENQUEUE, values={"status": "running"})


EDGES = sorted({(event, target) for (_, event), target in TRANSITIONS.items()})


async def test_every_state_against_every_edge_matches_the_engine_table(database: Database) -> None:
    """For each state and each (event → target) edge the table has anywhere, the guarded UPDATE moves the
    job exactly when the engine's table has that transition from that state."""
    async with database.transaction() as conn:
        run_id = await insert_run(conn)
        for index, (state, (event, target)) in enumerate(itertools.product(JobState, EDGES)):
            job_id = await insert_job(conn, run_id, name=f"j{index}", status=state.value)
            moved = await set_job_status(conn, job_id, target, event)
            expected = TRANSITIONS.get((state, event)) == target
            assert moved is expected, (state, event, target)
            assert await status_of(conn, job_id) == (target.value if expected else state.value)
            if state in TERMINAL_STATES:
                assert not moved


async def test_racing_writers_move_a_job_once(database: Database) -> None:
    """An agent's `success` and the stale sweep race on a running job: exactly one of them wins."""
    async with database.transaction() as conn:
        run_id = await insert_run(conn)
        job_ids = [await insert_job(conn, run_id, name=f"j{i}", status="running") for i in range(10)]

    async def write(job_id: str, target: JobState, event: JobEvent) -> bool:
        async with database.transaction() as conn:
            return await set_job_status(conn, job_id, target, event)

    for job_id in job_ids:
        results = await asyncio.gather(
            write(job_id, JobState.SUCCESS, JobEvent.SUCCEED),
            write(job_id, JobState.TIMED_OUT_STALE, JobEvent.STALE),
            write(job_id, JobState.CANCELLED, JobEvent.CANCEL),
        )
        assert sum(results) == 1, results
