"""Schedules: the `schedule()` triggers registered from the lock file on a source's default branch.

One row per (source, repository, workflow, trigger index). `next_fire_at` is the next cron slot (UTC);
the scheduler reads only rows whose slot has come (`due_schedules`, on an index), and fires one with
`claim_fire`, a conditional UPDATE that moves `next_fire_at` on only if it still holds the value the
scheduler saw. The run is created in the same transaction, so of several orchestrators (or one that
restarts half-way) exactly one fires each slot, and a committed fire is never repeated.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import DEFAULT_ORG_ID, new_id, schedules, sources, utcnow

NextFire = Callable[[str, str, dt.datetime], dt.datetime]
"""`(cron, timezone, after) → the first slot after `after``."""


@dataclass(frozen=True)
class Registration:
    """One schedule trigger as the lock file declares it."""

    workflow: str
    trigger_index: int
    cron: str
    timezone: str
    inputs: dict[str, Any]


class ScheduleRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    org_id: str
    source_id: str
    repo: str
    workflow: str
    trigger_index: int
    cron: str
    timezone: str
    branch: str
    inputs: dict[str, Any]
    lock_commit: str
    next_fire_at: dt.datetime
    last_fired_at: dt.datetime | None
    last_run_id: str | None
    created_at: dt.datetime
    updated_at: dt.datetime


class ScheduleListing(ScheduleRecord):
    source: str
    """The source's name."""


_UPDATE_REGISTRATION = (
    schedules.update()
    .where(schedules.c.id == sa.bindparam("b_id"))
    .values(
        cron=sa.bindparam("b_cron"), timezone=sa.bindparam("b_timezone"), branch=sa.bindparam("b_branch"),
        lock_commit=sa.bindparam("b_lock_commit"), inputs=sa.bindparam("b_inputs", type_=schedules.c.inputs.type),
        next_fire_at=sa.bindparam("b_next_fire_at", type_=schedules.c.next_fire_at.type),
        updated_at=sa.bindparam("b_updated_at", type_=schedules.c.updated_at.type),
    )
)


@dataclass(frozen=True)
class ReplaceResult:
    added: list[str]
    changed: list[str]
    """Workflows whose cron or time zone changed (their next fire time is recomputed)."""
    removed: list[str]
    kept: list[str]


async def replace_registrations(
    conn: AsyncConnection,
    *,
    source_id: str,
    repo: str,
    branch: str,
    lock_commit: str,
    registrations: Sequence[Registration],
    next_fire: NextFire,
    now: dt.datetime | None = None,
    org_id: str = DEFAULT_ORG_ID,
) -> ReplaceResult:
    """Make the source's registrations for `repo` exactly `registrations`, in the caller's transaction.

    An unchanged trigger keeps its next and last fire times (a push to the default branch must neither
    fire nor skip a slot); one whose cron or time zone changed gets a new next fire time; triggers the
    lock file no longer has are deleted."""
    now = now or utcnow()
    rows = await conn.execute(
        sa.select(schedules).where(schedules.c.source_id == source_id, schedules.c.repo == repo).with_for_update()
    )
    current = {(r.workflow, r.trigger_index): r for r in rows}
    wanted = {(r.workflow, r.trigger_index): r for r in registrations}
    result = ReplaceResult([], [], [], [])
    gone = [row.id for key, row in current.items() if key not in wanted]
    if gone:
        await conn.execute(schedules.delete().where(schedules.c.id.in_(gone)))
        result.removed.extend(sorted(f"{k[0]}#{k[1]}" for k in current if k not in wanted))
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for key, reg in sorted(wanted.items()):
        label = f"{reg.workflow}#{reg.trigger_index}"
        row = current.get(key)
        if row is None:
            inserts.append({
                "id": new_id(), "org_id": org_id, "source_id": source_id, "repo": repo, "workflow": reg.workflow,
                "trigger_index": reg.trigger_index, "cron": reg.cron, "timezone": reg.timezone,
                "next_fire_at": next_fire(reg.cron, reg.timezone, now), "created_at": now, "branch": branch,
                "lock_commit": lock_commit, "inputs": dict(reg.inputs), "updated_at": now,
            })
            result.added.append(label)
            continue
        if (row.cron, row.timezone) != (reg.cron, reg.timezone):
            next_at = next_fire(reg.cron, reg.timezone, now)
            result.changed.append(label)
        else:
            next_at = row.next_fire_at
            result.kept.append(label)
        if (row.cron, row.timezone, row.branch, row.lock_commit, row.inputs, row.next_fire_at) == (
            reg.cron, reg.timezone, branch, lock_commit, reg.inputs, next_at
        ):
            continue  # nothing to write (a re-read of the same commit)
        updates.append({
            "b_id": row.id, "b_cron": reg.cron, "b_timezone": reg.timezone, "b_branch": branch,
            "b_lock_commit": lock_commit, "b_inputs": dict(reg.inputs), "b_next_fire_at": next_at, "b_updated_at": now,
        })
    # one statement each, executed for many rows: a lock file with a thousand schedules is one round trip
    if inserts:
        await conn.execute(schedules.insert(), inserts)
    if updates:
        await conn.execute(_UPDATE_REGISTRATION, updates)
    return result


async def due_schedules(conn: AsyncConnection, *, now: dt.datetime, limit: int = 100) -> list[ScheduleRecord]:
    """Rows whose next slot has come, most overdue first (an index range scan: idle rows cost nothing)."""
    query = (
        sa.select(schedules)
        .where(schedules.c.next_fire_at <= now)
        .order_by(schedules.c.next_fire_at, schedules.c.id)
        .limit(limit)
    )
    return [ScheduleRecord.model_validate(dict(r._mapping)) for r in await conn.execute(query)]


async def claim_fire(
    conn: AsyncConnection, schedule_id: str, *, seen: dt.datetime, slot: dt.datetime, next_at: dt.datetime
) -> bool:
    """Record that the slot `seen` fires (as `slot`) and move on to `next_at` — only if nobody did so
    since the row was read. True: this caller fires, and must create the run in this transaction."""
    result = await conn.execute(
        schedules.update()
        .where(schedules.c.id == schedule_id, schedules.c.next_fire_at == seen)
        .values(next_fire_at=next_at, last_fired_at=slot, updated_at=utcnow())
    )
    return result.rowcount == 1


async def set_last_run(conn: AsyncConnection, schedule_id: str, run_id: str) -> None:
    await conn.execute(schedules.update().where(schedules.c.id == schedule_id).values(last_run_id=run_id))


async def postpone(conn: AsyncConnection, schedule_id: str, *, seen: dt.datetime, next_at: dt.datetime) -> bool:
    """Skip the slot `seen` without firing (its workflow cannot run): move on to `next_at`."""
    result = await conn.execute(
        schedules.update()
        .where(schedules.c.id == schedule_id, schedules.c.next_fire_at == seen)
        .values(next_fire_at=next_at, updated_at=utcnow())
    )
    return result.rowcount == 1


async def list_schedules(
    conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID, source_id: str | None = None
) -> list[ScheduleListing]:
    query = (
        sa.select(schedules, sources.c.name.label("source"))
        .join(sources, sources.c.id == schedules.c.source_id)
        .where(schedules.c.org_id == org_id)
        .order_by(sources.c.name, schedules.c.repo, schedules.c.workflow, schedules.c.trigger_index)
    )
    if source_id is not None:
        query = query.where(schedules.c.source_id == source_id)
    return [ScheduleListing.model_validate(dict(r._mapping)) for r in await conn.execute(query)]


async def count_schedules(conn: AsyncConnection) -> int:
    return int((await conn.execute(sa.select(sa.func.count()).select_from(schedules))).scalar_one())
