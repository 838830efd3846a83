"""Webhook deliveries: the durable dedup marks (`dedup_cache`) and the event log (`event_log`).

Dedup: one `dedup_cache` row per delivery id, live until `expires_at` (`KICI_DEDUP_TTL_SECONDS`, 24 h by
default). Marking is a single upsert that only succeeds when no live row exists, so two concurrent
deliveries of the same id (two orchestrators, or a retry racing the original) cannot both win; an
expired row is taken over. The event log is unique on `(org_id, delivery_id)` and never expires, so a
redelivery after the dedup TTL is still recognised through it (`begin_delivery` checks both).
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import DEFAULT_ORG_ID, EventLogStatus, dedup_cache, event_log, new_id, runs, utcnow

__all__ = [
    "EventLogEntry",
    "begin_delivery",
    "dedup_exists",
    "finish_event_log",
    "get_event_log",
    "list_event_log",
    "mark_delivery",
    "purge_expired_dedup",
    "run_ids_of_delivery",
]


class EventLogEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    org_id: str
    delivery_id: str
    source_id: str | None
    provider: str
    event: str | None
    action: str | None
    repo: str | None
    ref: str | None
    sha: str | None
    status: EventLogStatus
    reason: str | None
    matched_count: int
    created_at: dt.datetime
    processed_at: dt.datetime | None


@functools.cache
def _mark_statement(dialect: str) -> Any:
    # built once per dialect (this runs for every delivery); the conflict arm uses the would-be row's
    # values, so the statement takes plain parameters
    insert = pg_insert(dedup_cache) if dialect == "postgresql" else sqlite_insert(dedup_cache)
    return insert.on_conflict_do_update(
        index_elements=["delivery_id"],
        set_={
            "org_id": insert.excluded.org_id,
            "created_at": insert.excluded.created_at,
            "expires_at": insert.excluded.expires_at,
        },
        where=dedup_cache.c.expires_at < insert.excluded.created_at,
    )


@functools.cache
def _event_log_statement(dialect: str) -> Any:
    insert = pg_insert(event_log) if dialect == "postgresql" else sqlite_insert(event_log)
    return insert.on_conflict_do_nothing(index_elements=["org_id", "delivery_id"])


async def mark_delivery(
    conn: AsyncConnection, delivery_id: str, *, ttl_seconds: int, org_id: str = DEFAULT_ORG_ID
) -> bool:
    """Mark `delivery_id` as seen; True when this call marked it, False when a live mark already exists."""
    now = utcnow()
    expires = now + dt.timedelta(seconds=ttl_seconds)
    result = await conn.execute(
        _mark_statement(conn.dialect.name),
        {"delivery_id": delivery_id, "org_id": org_id, "created_at": now, "expires_at": expires},
    )
    return bool(result.rowcount == 1)


async def dedup_exists(conn: AsyncConnection, delivery_id: str) -> bool:
    """Whether a live dedup mark exists for `delivery_id`."""
    row = (
        await conn.execute(
            sa.select(dedup_cache.c.delivery_id).where(
                dedup_cache.c.delivery_id == delivery_id, dedup_cache.c.expires_at >= utcnow()
            )
        )
    ).first()
    return row is not None


async def purge_expired_dedup(conn: AsyncConnection) -> int:
    result = await conn.execute(dedup_cache.delete().where(dedup_cache.c.expires_at < utcnow()))
    return int(result.rowcount or 0)


async def begin_delivery(
    conn: AsyncConnection,
    *,
    delivery_id: str,
    provider: str,
    ttl_seconds: int,
    org_id: str = DEFAULT_ORG_ID,
    source_id: str | None = None,
    event: str | None = None,
    action: str | None = None,
    repo: str | None = None,
    ref: str | None = None,
    sha: str | None = None,
    status: EventLogStatus = EventLogStatus.RECEIVED,
    reason: str | None = None,
) -> bool:
    """Mark the delivery and write its event log row, in the caller's transaction. False (and nothing
    written) when it is a duplicate: a live dedup mark, or an event log row from an earlier delivery."""
    if not await mark_delivery(conn, delivery_id, ttl_seconds=ttl_seconds, org_id=org_id):
        return False
    now = utcnow()
    result = await conn.execute(
        _event_log_statement(conn.dialect.name),
        {
            "id": new_id(),
            "org_id": org_id,
            "delivery_id": delivery_id,
            "source_id": source_id,
            "provider": provider,
            "event": event,
            "action": action,
            "repo": repo,
            "ref": ref,
            "sha": sha,
            "status": EventLogStatus(status).value,
            "reason": reason,
            "matched_count": 0,
            "created_at": now,
            "processed_at": None if status is EventLogStatus.RECEIVED else now,
        },
    )
    return bool(result.rowcount == 1)


async def finish_event_log(
    conn: AsyncConnection,
    delivery_id: str,
    status: EventLogStatus,
    *,
    org_id: str = DEFAULT_ORG_ID,
    reason: str | None = None,
    matched_count: int = 0,
    sha: str | None = None,
) -> bool:
    """Record the outcome of a delivery (from `received`, or a `failed` retry of the bookkeeping)."""
    result = await conn.execute(
        _FINISH_EVENT_LOG,
        {
            "v_org": org_id, "v_delivery": delivery_id, "v_status": EventLogStatus(status).value,
            "v_reason": reason, "v_matched": matched_count, "v_processed": utcnow(), "v_sha": sha,
        },
    )
    return bool(result.rowcount == 1)


_FINISH_EVENT_LOG = (
    event_log.update()
    .where(event_log.c.org_id == sa.bindparam("v_org"), event_log.c.delivery_id == sa.bindparam("v_delivery"))
    .values(
        status=sa.bindparam("v_status", type_=sa.Text),
        reason=sa.bindparam("v_reason", type_=sa.Text),
        matched_count=sa.bindparam("v_matched", type_=sa.Integer),
        processed_at=sa.bindparam("v_processed", type_=event_log.c.processed_at.type),
        sha=sa.func.coalesce(sa.bindparam("v_sha", type_=sa.Text), event_log.c.sha),
    )
)


async def get_event_log(
    conn: AsyncConnection, delivery_id: str, *, org_id: str = DEFAULT_ORG_ID
) -> EventLogEntry | None:
    row = (
        await conn.execute(
            sa.select(event_log).where(event_log.c.org_id == org_id, event_log.c.delivery_id == delivery_id)
        )
    ).first()
    return EventLogEntry.model_validate(dict(row._mapping)) if row is not None else None


async def list_event_log(
    conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID, limit: int = 100, status: EventLogStatus | None = None
) -> list[EventLogEntry]:
    query = sa.select(event_log).where(event_log.c.org_id == org_id)
    if status is not None:
        query = query.where(event_log.c.status == EventLogStatus(status).value)
    rows = await conn.execute(query.order_by(event_log.c.created_at.desc(), event_log.c.id).limit(limit))
    return [EventLogEntry.model_validate(dict(row._mapping)) for row in rows]


async def run_ids_of_delivery(conn: AsyncConnection, delivery_id: str, *, org_id: str = DEFAULT_ORG_ID) -> list[str]:
    """Ids of the runs recorded with this delivery id (the runs it started), oldest first."""
    rows = await conn.execute(
        sa.select(runs.c.id)
        .where(runs.c.org_id == org_id, runs.c.delivery_id == delivery_id)
        .order_by(runs.c.created_at, runs.c.id)
    )
    return [str(row.id) for row in rows]
