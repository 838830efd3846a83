"""Concurrency groups: the lock row of each group and the FIFO of its members (runs or jobs).

A group is `(org, scope, repo, name)`: workflow `concurrency` groups limit runs (scope `run`), job
`concurrency_group`s limit single jobs (scope `job`); the two are separate namespaces, and a group is
per repository, like the branch names groups are usually built from.

Members are the runs/jobs rows themselves (`concurrency_group_id`, `concurrency_state`): `waiting` in
creation order, `holding` while they may run, `released` once they ended. Every change to members
happens under the organization's concurrency lock (`serialize`), taken after the member's own run row
is locked — lock order run rows → concurrency lock, everywhere — so admissions and releases are
serialized across orchestrators on one PostgreSQL without process-local state. While the lock is held
another run's row is only ever taken with `FOR UPDATE SKIP LOCKED`, so the order can never form a
cycle; a member skipped that way is admitted later by whoever holds its run (a run being cancelled
releases its place when it ends) or by the reconcile sweep.

What admission *does* to a run or job (enqueue its jobs) lives in `store.runs`, which calls these.
"""

from __future__ import annotations

import datetime as dt
import weakref
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.database import lock_key
from kici.orchestrator.db.schema import (
    ConcurrencyScope,
    ConcurrencyState,
    concurrency_groups,
    jobs,
    new_id,
    runs,
    utcnow,
)

_ACTIVE = (ConcurrencyState.WAITING.value, ConcurrencyState.HOLDING.value)


def wait_reason(name: str) -> str:
    """What `runs show` prints after `waiting`: `concurrency: <group>`; for a deployment environment's
    group (store.environments), that another deployment to it is in progress."""
    if name.startswith(ENVIRONMENT_GROUP_PREFIX):
        return f"environment: {name[len(ENVIRONMENT_GROUP_PREFIX):]}, waiting for the deployment in progress"
    return f"concurrency: {name}"


ENVIRONMENT_GROUP_PREFIX = "environment:"
"""Job groups named so belong to a deployment environment (one deployment at a time, repo `""`)."""


@dataclass(frozen=True)
class Group:
    id: str
    name: str
    max_running: int


async def serialize(conn: AsyncConnection, org_id: str) -> None:
    """Take the organization's concurrency lock for the rest of the transaction (a transaction-scoped
    PostgreSQL advisory lock; SQLite's write transactions already exclude each other).

    One lock for every group of the organization rather than one per group: a release can cascade —
    a run ends, the next run of its group is admitted, its jobs enter their own job groups — so a
    transaction may need several groups in an order nobody can know in advance, and per-group locks
    taken in that order could deadlock. Only runs and jobs that use concurrency ever take it."""
    if conn.dialect.name != "postgresql":
        return
    txn = conn.sync_connection.get_transaction() if conn.sync_connection is not None else None
    held = conn.info.get(_HELD)
    if txn is not None and held is not None and held() is txn:
        return
    await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(f"concurrency:{org_id}")})
    if txn is not None:
        conn.info[_HELD] = weakref.ref(txn)


def holds_lock(conn: AsyncConnection) -> bool:
    """True when this transaction took the concurrency lock already (PostgreSQL): a run row may then only
    be locked with SKIP LOCKED, never waited for (lock order is run rows → concurrency lock)."""
    if conn.dialect.name != "postgresql":
        return False
    txn = conn.sync_connection.get_transaction() if conn.sync_connection is not None else None
    held = conn.info.get(_HELD)
    return txn is not None and held is not None and held() is txn


_HELD = "kici_concurrency_lock"


async def ensure_group(
    conn: AsyncConnection, *, org_id: str, scope: ConcurrencyScope, repo: str, name: str, max_running: int | None
) -> Group:
    """The group, created on first use. `max_running` given → the group's limit becomes it (the latest
    lock file to use a group sets its limit); None keeps the stored one."""
    key = {"org_id": org_id, "scope": scope.value, "repo": repo, "name": name}
    where = [concurrency_groups.c[k] == v for k, v in key.items()]
    query = sa.select(concurrency_groups.c.id, concurrency_groups.c.max_running).where(*where)
    row = (await conn.execute(query)).first()
    if row is None:
        insert_values = {**key, "id": new_id(), "max_running": max_running or 1, "created_at": utcnow()}
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            await conn.execute(pg_insert(concurrency_groups).values(**insert_values).on_conflict_do_nothing())
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            await conn.execute(sqlite_insert(concurrency_groups).values(**insert_values).on_conflict_do_nothing())
        row = (await conn.execute(query)).one()
    limit = int(row.max_running)
    if max_running is not None and max_running != limit:
        await conn.execute(
            concurrency_groups.update().where(concurrency_groups.c.id == row.id).values(max_running=max_running)
        )
        limit = max_running
    return Group(str(row.id), name, limit)


async def get_group(conn: AsyncConnection, group_id: str) -> Group | None:
    row = (
        await conn.execute(
            sa.select(concurrency_groups.c.id, concurrency_groups.c.name, concurrency_groups.c.max_running).where(
                concurrency_groups.c.id == group_id
            )
        )
    ).first()
    return Group(str(row.id), str(row.name), int(row.max_running)) if row is not None else None


# -- run members -------------------------------------------------------------------------------------


async def active_runs(conn: AsyncConnection, group_id: str, *, exclude: str | None = None) -> list[tuple[str, str]]:
    """(run id, state) of the group's waiting and holding runs, oldest first."""
    query = (
        sa.select(runs.c.id, runs.c.concurrency_state)
        .where(runs.c.concurrency_group_id == group_id, runs.c.concurrency_state.in_(_ACTIVE))
        .order_by(runs.c.created_at, runs.c.id)
    )
    return [(str(r.id), str(r.concurrency_state)) for r in await conn.execute(query) if r.id != exclude]


async def lock_runs(conn: AsyncConnection, run_ids: list[str], *, skip_locked: bool) -> list[str]:
    """Lock these runs' rows in creation order; with `skip_locked`, only those nobody else holds (the ids
    locked). Rows this transaction already holds are never skipped."""
    if not run_ids:
        return []
    query = sa.select(runs.c.id).where(runs.c.id.in_(run_ids)).order_by(runs.c.created_at, runs.c.id)
    query = query.with_for_update(skip_locked=skip_locked)
    return [str(r) for r in (await conn.execute(query)).scalars()]


async def join_run(conn: AsyncConnection, run_id: str, group: Group) -> None:
    await conn.execute(
        runs.update()
        .where(runs.c.id == run_id)
        .values(
            concurrency_group_id=group.id,
            concurrency_state=ConcurrencyState.WAITING.value,
            wait_reason=wait_reason(group.name),
        )
    )


async def set_run_state(conn: AsyncConnection, run_id: str, state: ConcurrencyState) -> None:
    await conn.execute(
        runs.update()
        .where(runs.c.id == run_id, runs.c.concurrency_state.in_(_ACTIVE))
        .values(concurrency_state=state.value, wait_reason=None)
    )


async def next_waiting_runs(conn: AsyncConnection, group: Group) -> list[str]:
    """Waiting runs that fit in the group's free places now, oldest first."""
    holding = await conn.execute(
        sa.select(sa.func.count())
        .select_from(runs)
        .where(runs.c.concurrency_group_id == group.id, runs.c.concurrency_state == ConcurrencyState.HOLDING.value)
    )
    free = group.max_running - int(holding.scalar_one())
    if free <= 0:
        return []
    query = (
        sa.select(runs.c.id)
        .where(runs.c.concurrency_group_id == group.id, runs.c.concurrency_state == ConcurrencyState.WAITING.value)
        .order_by(runs.c.created_at, runs.c.id)
        .limit(free)
    )
    return [str(r) for r in (await conn.execute(query)).scalars()]


# -- job members -------------------------------------------------------------------------------------


async def join_job(conn: AsyncConnection, job_id: str, group: Group) -> None:
    await conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.concurrency_state.is_(None))
        .values(concurrency_state=ConcurrencyState.WAITING.value, wait_reason=wait_reason(group.name))
    )


async def set_job_state(conn: AsyncConnection, job_ids: list[str], state: ConcurrencyState) -> None:
    if job_ids:
        await conn.execute(
            jobs.update()
            .where(jobs.c.id.in_(job_ids), jobs.c.concurrency_state.in_(_ACTIVE))
            .values(concurrency_state=state.value, wait_reason=None)
        )


@dataclass(frozen=True)
class WaitingJob:
    id: str
    run_id: str


async def next_waiting_jobs(conn: AsyncConnection, group: Group) -> list[WaitingJob]:
    """Waiting jobs that fit in the group's free places now, oldest first."""
    holding = await conn.execute(
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.concurrency_group_id == group.id, jobs.c.concurrency_state == ConcurrencyState.HOLDING.value)
    )
    free = group.max_running - int(holding.scalar_one())
    if free <= 0:
        return []
    query = (
        sa.select(jobs.c.id, jobs.c.run_id)
        .where(jobs.c.concurrency_group_id == group.id, jobs.c.concurrency_state == ConcurrencyState.WAITING.value)
        .order_by(jobs.c.created_at, jobs.c.id)
        .limit(free)
    )
    return [WaitingJob(str(r.id), str(r.run_id)) for r in await conn.execute(query)]


# -- reconcile ---------------------------------------------------------------------------------------


async def groups_with_waiters(conn: AsyncConnection, *, older_than: dt.datetime) -> list[tuple[str, str, str]]:
    """(org id, scope, group id) of groups with a member waiting since before `older_than`: what the
    reconcile sweep looks at (a release that had to skip a waiting member's locked run leaves one behind).
    Reads the small groups table and probes each group through the members' (group, state) index."""
    found: list[tuple[str, str, str]] = []
    for scope, table in ((ConcurrencyScope.RUN, runs), (ConcurrencyScope.JOB, jobs)):
        waiting = sa.exists().where(
            table.c.concurrency_group_id == concurrency_groups.c.id,
            table.c.concurrency_state == ConcurrencyState.WAITING.value,
            table.c.created_at < older_than,
        )
        query = sa.select(concurrency_groups.c.org_id, concurrency_groups.c.id).where(
            concurrency_groups.c.scope == scope.value, waiting
        )
        found += [(str(r.org_id), scope.value, str(r.id)) for r in await conn.execute(query)]
    return found
