"""What retention deletes: finished runs (their jobs, steps, queue, report and check-run rows go with them
through `ON DELETE CASCADE`), event log entries and audit entries older than a cutoff — counted for a dry
run, deleted a bounded batch per statement for a real one. The caller commits between batches and removes
the runs' log files (`kici.orchestrator.retention`)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.states import RUN_TERMINAL_STATUSES
from kici.orchestrator.db.schema import audit_log, event_log, jobs, runs

_FINISHED = [s.value for s in RUN_TERMINAL_STATUSES]


def _old_run(cutoff: dt.datetime) -> sa.ColumnElement[bool]:
    """A finished run that finished before `cutoff` (one that failed before it started may have no
    `finished_at`: its creation time counts then). A run that is not finished never matches."""
    return sa.and_(
        runs.c.status.in_(_FINISHED),
        sa.or_(runs.c.finished_at < cutoff, sa.and_(runs.c.finished_at.is_(None), runs.c.created_at < cutoff)),
    )


async def count_runs(conn: AsyncConnection, cutoff: dt.datetime) -> tuple[int, int]:
    """(runs, their jobs) a prune at `cutoff` would delete."""
    found = sa.select(runs.c.id).where(_old_run(cutoff))
    run_count = (await conn.execute(sa.select(sa.func.count()).select_from(found.subquery()))).scalar_one()
    job_count = (await conn.execute(
        sa.select(sa.func.count()).select_from(jobs).where(jobs.c.run_id.in_(found))
    )).scalar_one()
    return int(run_count), int(job_count)


async def delete_runs(conn: AsyncConnection, cutoff: dt.datetime, limit: int) -> tuple[list[str], int]:
    """Delete up to `limit` of the oldest prunable runs; (their ids, how many jobs went with them)."""
    ids = list((await conn.execute(
        sa.select(runs.c.id).where(_old_run(cutoff)).order_by(runs.c.created_at, runs.c.id).limit(limit)
    )).scalars())
    if not ids:
        return [], 0
    job_count = (await conn.execute(
        sa.select(sa.func.count()).select_from(jobs).where(jobs.c.run_id.in_(ids))
    )).scalar_one()
    # the status is checked again: a run rerun-reset to pending in between is not deleted
    await conn.execute(runs.delete().where(runs.c.id.in_(ids), runs.c.status.in_(_FINISHED)))
    return ids, int(job_count)


async def count_before(conn: AsyncConnection, table: sa.Table, cutoff: dt.datetime) -> int:
    """Rows of `event_log` or `audit_log` created before `cutoff`."""
    _check(table)
    query = sa.select(sa.func.count()).select_from(table).where(table.c.created_at < cutoff)
    return int((await conn.execute(query)).scalar_one())


async def delete_before(conn: AsyncConnection, table: sa.Table, cutoff: dt.datetime, limit: int) -> int:
    """Delete up to `limit` of the oldest rows of `event_log` or `audit_log` created before `cutoff`."""
    _check(table)
    ids = sa.select(table.c.id).where(table.c.created_at < cutoff).order_by(table.c.created_at).limit(limit)
    # materialised first: PostgreSQL and SQLite both take `IN (subquery with LIMIT)`, but a list keeps the
    # statement's cost obvious and the count exact
    found = list((await conn.execute(ids)).scalars())
    if not found:
        return 0
    result = await conn.execute(table.delete().where(table.c.id.in_(found)))
    return int(result.rowcount)


def _check(table: sa.Table) -> None:
    if table is not event_log and table is not audit_log:
        raise ValueError(f"retention by created_at is for event_log and audit_log, not {table.name}")
