"""The audit trail: a row per successful mutation (`allowed`, written in the mutation's transaction) and
per denied admin request (`denied`, written in its own transaction so it is kept though the request fails).

Unauthenticated denials (401) are aggregated: one row per client, reason, token and window with a `count`
(`record_aggregated`), so a flood of bad requests grows a counter, not the table. Listing filters by
action (exact or a `prefix.`), actor, time range and outcome, newest first, keyset-paged like the runs list.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import DEFAULT_ORG_ID, AuditOutcome, audit_log, new_id, utcnow


class AuditRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    org_id: str
    action: str
    outcome: str
    status: int | None
    reason: str | None
    token_id: str | None
    role: str | None
    permission: str | None
    method: str | None
    path: str | None
    client: str | None
    actor: str | None = None
    target: str | None = None
    created_at: dt.datetime
    count: int = 1
    """How many denials this row stands for (aggregated unauthenticated denials); 1 otherwise."""
    last_at: dt.datetime | None = None
    """The latest of the aggregated denials (None for a single event)."""


async def record(
    conn: AsyncConnection,
    *,
    action: str,
    outcome: AuditOutcome,
    org_id: str = DEFAULT_ORG_ID,
    **fields: Any,
) -> str:
    """Insert one audit row; unknown keys in `fields` are refused (they would be silently lost)."""
    columns = {c.name for c in audit_log.columns} - {
        "id", "org_id", "action", "outcome", "created_at", "count", "last_at", "aggregate_key"
    }
    unknown = set(fields) - columns
    if unknown:
        raise ValueError(f"not audit columns: {', '.join(sorted(unknown))}")
    row_id = new_id()
    await conn.execute(
        audit_log.insert().values(
            id=row_id, org_id=org_id, action=action, outcome=outcome.value, created_at=utcnow(), **fields
        )
    )
    return row_id


def _window_start(now: dt.datetime, window_s: int) -> dt.datetime:
    epoch = int(now.timestamp())
    return dt.datetime.fromtimestamp(epoch - epoch % window_s, dt.UTC)


async def record_aggregated(
    conn: AsyncConnection,
    *,
    action: str,
    window_s: int,
    org_id: str = DEFAULT_ORG_ID,
    now: dt.datetime | None = None,
    **fields: Any,
) -> str:
    """A denied event counted into the row of its client, status, reason and token for the current window
    of `window_s` seconds: the first one inserts the row (its path and time are the first request's), the
    others add one to `count` and move `last_at`. One statement (`INSERT … ON CONFLICT DO UPDATE` on the
    unique `aggregate_key`), so concurrent requests — other processes included — meet on the same row on
    both databases. Returns the row's id."""
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    now = now or utcnow()
    start = _window_start(now, window_s)
    key = ":".join([
        "denied", action, org_id, str(fields.get("status")), fields.get("client") or "-", fields.get("reason") or "-",
        fields.get("token_id") or "-", f"{window_s}@{int(start.timestamp())}",
    ])
    values = {"id": new_id(), "org_id": org_id, "action": action, "outcome": AuditOutcome.DENIED.value,
              "created_at": now, "last_at": now, "count": 1, "aggregate_key": key, **fields}
    dialect = conn.dialect.name
    insert: Any = postgresql.insert(audit_log) if dialect == "postgresql" else sqlite.insert(audit_log)
    statement = insert.values(**values)
    statement = statement.on_conflict_do_update(
        index_elements=[audit_log.c.aggregate_key],
        set_={"count": audit_log.c.count + 1, "last_at": statement.excluded.last_at},
    ).returning(audit_log.c.id)
    return str((await conn.execute(statement)).scalar_one())


class BadCursor(ValueError):
    """A `before` cursor that this module did not make."""


def audit_cursor(entry: AuditRecord) -> str:
    """An opaque cursor just past `entry` in the newest-first order: its (created_at, id), base64url."""
    raw = json.dumps([entry.created_at.astimezone(dt.UTC).isoformat(), entry.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, entry_id = json.loads(raw)
        at = dt.datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(entry_id, str):
            raise ValueError
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error):
        raise BadCursor(f"not an audit cursor: {cursor[:40]!r}") from None
    return at, entry_id


@dataclass(frozen=True)
class AuditFilter:
    outcome: str | None = None
    action: str | None = None
    """Exact (`secret.set`), or every action under a prefix when it ends with a dot (`secret.`)."""
    actor: str | None = None
    """Exact: `token:<id>`, `github:<login>`, `system`."""
    since: dt.datetime | None = None
    """Inclusive."""
    until: dt.datetime | None = None
    """Exclusive."""


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditRecord]
    next: str | None
    """Cursor of the next (older) page; None on the last one."""


async def find_audit(
    conn: AsyncConnection,
    *,
    org_id: str = DEFAULT_ORG_ID,
    where: AuditFilter = AuditFilter(),
    limit: int = 100,
    before: str | None = None,
) -> AuditPage:
    """One page of entries, newest first; keyset paging on (created_at, id). Raises `BadCursor`."""
    query = sa.select(audit_log).where(audit_log.c.org_id == org_id)
    if where.outcome is not None:
        query = query.where(audit_log.c.outcome == where.outcome)
    if where.action is not None:
        if where.action.endswith("."):
            # a substring, not LIKE (no `_`/`%` escaping, no case folding) nor a range (collation-dependent)
            query = query.where(sa.func.substr(audit_log.c.action, 1, len(where.action)) == where.action)
        else:
            query = query.where(audit_log.c.action == where.action)
    if where.actor is not None:
        query = query.where(audit_log.c.actor == where.actor)
    if where.since is not None:
        query = query.where(audit_log.c.created_at >= where.since)
    if where.until is not None:
        query = query.where(audit_log.c.created_at < where.until)
    if before is not None:
        at, entry_id = _decode_cursor(before)
        query = query.where(
            sa.or_(audit_log.c.created_at < at, sa.and_(audit_log.c.created_at == at, audit_log.c.id < entry_id))
        )
    query = query.order_by(audit_log.c.created_at.desc(), audit_log.c.id.desc()).limit(max(0, limit) + 1)
    found = [AuditRecord.model_validate(dict(row._mapping)) for row in await conn.execute(query)]
    more = len(found) > limit
    found = found[:limit]
    return AuditPage(entries=found, next=audit_cursor(found[-1]) if more and found else None)


async def list_audit(
    conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID, outcome: str | None = None, limit: int = 100
) -> list[AuditRecord]:
    """Newest first."""
    page = await find_audit(conn, org_id=org_id, where=AuditFilter(outcome=outcome), limit=limit)
    return page.entries
