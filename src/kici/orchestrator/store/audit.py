"""The audit trail: one row per denied admin request (allowed actions join it with the trust and secrets
work). Written in its own transaction so a denial is recorded even though the request fails."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
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


async def record(
    conn: AsyncConnection,
    *,
    action: str,
    outcome: AuditOutcome,
    org_id: str = DEFAULT_ORG_ID,
    **fields: Any,
) -> str:
    """Insert one audit row; unknown keys in `fields` are refused (they would be silently lost)."""
    columns = {c.name for c in audit_log.columns} - {"id", "org_id", "action", "outcome", "created_at"}
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


async def list_audit(
    conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID, outcome: str | None = None, limit: int = 100
) -> list[AuditRecord]:
    """Newest first."""
    query = sa.select(audit_log).where(audit_log.c.org_id == org_id)
    if outcome is not None:
        query = query.where(audit_log.c.outcome == outcome)
    query = query.order_by(audit_log.c.created_at.desc(), audit_log.c.id).limit(max(0, limit))
    return [AuditRecord.model_validate(dict(row._mapping)) for row in await conn.execute(query)]
