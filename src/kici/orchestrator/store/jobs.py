"""Job status writes, guarded by the engine's state machine.

Every status change is one `UPDATE jobs SET status = :target … WHERE id = :id AND status IN (…)`, where
the list holds exactly the states from which `event` leads to `target` (`kici.engine.states`). The
database applies the guard atomically, so concurrent writers (an agent's late message, the stale sweep, a
cancel) cannot move a job along an invalid edge, terminal states never change, and a late or duplicate
message simply updates zero rows — the caller sees False and ignores it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.states import TRANSITIONS, JobEvent, JobState, is_terminal
from kici.orchestrator.db.schema import jobs, utcnow

_STATUS_COLUMNS = frozenset({"status", "id", "run_id"})


@dataclass(frozen=True)
class KeepFirst:
    """A column value written only when the column is still NULL (`started_at` of a job reported running
    twice keeps the first time)."""

    value: Any


@functools.lru_cache(maxsize=512)
def _status_update(
    target: str, sources: tuple[str, ...], columns: tuple[str, ...], keep_first: tuple[str, ...], owned: bool
) -> sa.Update:
    # Built once per shape and reused: SQLAlchemy then skips statement construction and cache-key
    # generation, a large share of the cost of the hottest statement of the dispatcher.
    values: dict[str, Any] = {"status": target}
    for column in columns:
        values[column] = sa.bindparam(f"v_{column}", type_=jobs.c[column].type)
    for column in keep_first:
        values[column] = sa.func.coalesce(jobs.c[column], sa.bindparam(f"v_{column}", type_=jobs.c[column].type))
    conditions = [jobs.c.id == sa.bindparam("v_job_id"), jobs.c.status.in_(sources)]
    if owned:
        conditions.append(jobs.c.agent_id == sa.bindparam("v_owner"))
    return jobs.update().where(*conditions).values(**values)


def guard_sources(target: JobState | str, event: JobEvent | str) -> frozenset[JobState]:
    """States from which `event` moves a job to `target` (empty when it never does)."""
    target, event = JobState(target), JobEvent(event)
    return frozenset(state for (state, ev), to in TRANSITIONS.items() if ev == event and to == target)


def _guard(
    target: JobState, event: JobEvent | str, values: Mapping[str, Any] | None
) -> tuple[list[str], dict[str, Any]]:
    """The source states the UPDATE's guard allows, and the other columns it writes."""
    sources = guard_sources(target, event)
    if not sources:
        raise ValueError(f"job event {JobEvent(event).value} never leads to {target.value}")
    extra = dict(values or {})
    if _STATUS_COLUMNS & extra.keys():
        raise ValueError(f"values may not set {sorted(_STATUS_COLUMNS & extra.keys())}")
    if is_terminal(target):
        extra.setdefault("finished_at", utcnow())
    return sorted(s.value for s in sources), extra


async def set_job_status(
    conn: AsyncConnection,
    job_id: str,
    target: JobState | str,
    event: JobEvent | str,
    *,
    values: Mapping[str, Any] | None = None,
    owned_by: str | None = None,
) -> bool:
    """Move job `job_id` to `target` through `event` if its current state allows it; True when it moved.

    `values` are other columns written in the same UPDATE (`started_at`, `error`, `agent_id`, …); a
    terminal target also sets `finished_at` unless given. `owned_by` adds `agent_id = owned_by` to the
    guard, for messages that only the job's agent may send. `ValueError` when `event` can never lead to
    `target` (a programming error, not a late message).
    """
    target = JobState(target)
    sources, extra = _guard(target, event, values)
    plain = tuple(sorted(k for k, v in extra.items() if not isinstance(v, KeepFirst)))
    keep_first = tuple(sorted(k for k, v in extra.items() if isinstance(v, KeepFirst)))
    statement = _status_update(target.value, tuple(sources), plain, keep_first, owned_by is not None)
    params: dict[str, Any] = {"v_job_id": job_id}
    for key, value in extra.items():
        params[f"v_{key}"] = value.value if isinstance(value, KeepFirst) else value
    if owned_by is not None:
        params["v_owner"] = owned_by
    result = await conn.execute(statement, params)
    return result.rowcount == 1


async def set_jobs_status(
    conn: AsyncConnection,
    job_ids: list[str],
    target: JobState | str,
    event: JobEvent | str,
    *,
    values: Mapping[str, Any] | None = None,
) -> int:
    """`set_job_status` for several jobs in one UPDATE (same guard, same values); how many moved."""
    if not job_ids:
        return 0
    target = JobState(target)
    sources, extra = _guard(target, event, values)
    extra = {k: v.value if isinstance(v, KeepFirst) else v for k, v in extra.items()}
    result = await conn.execute(
        jobs.update()
        .where(jobs.c.id.in_(job_ids), jobs.c.status.in_(sources))
        .values(status=target.value, **extra)
    )
    return int(result.rowcount or 0)
