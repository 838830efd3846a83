"""Secret deliveries: a record of each dispatch that sent a job the secrets it declares — run, job,
attempt, and for each name the scope its value came from. Values are never passed to this module."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import new_id, secret_deliveries, utcnow

__all__ = ["SecretDelivery", "list_run_deliveries", "record_delivery"]


class SecretDelivery(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    run_id: str
    job_id: str
    attempt: int
    secrets: dict[str, str]
    """Name → scope (`org`, `repo:<owner/name>`, `env:<environment>`)."""
    created_at: dt.datetime


_INSERT = secret_deliveries.insert()


async def record_delivery(
    conn: AsyncConnection, *, run_id: str, job_id: str, attempt: int, scopes: dict[str, str]
) -> None:
    """One row in the caller's transaction (the one that resolved the values)."""
    await conn.execute(_INSERT, {"id": new_id(), "run_id": run_id, "job_id": job_id, "attempt": attempt,
                                 "secrets": dict(scopes), "created_at": utcnow()})


async def list_run_deliveries(conn: AsyncConnection, run_id: str) -> list[SecretDelivery]:
    """A run's deliveries, oldest first."""
    query = (sa.select(secret_deliveries).where(secret_deliveries.c.run_id == run_id)
             .order_by(secret_deliveries.c.created_at, secret_deliveries.c.id))
    return [SecretDelivery.model_validate(dict(row._mapping)) for row in await conn.execute(query)]
