"""Organisations. Only the default org is used for now; its id is already on every tenant row."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import DEFAULT_ORG_ID, orgs, utcnow


async def ensure_org(conn: AsyncConnection, org_id: str, name: str | None = None) -> bool:
    """Create the org if it does not exist; True when it was created. Safe under concurrency: an insert
    that loses the race does nothing (ON CONFLICT DO NOTHING, spelled per dialect)."""
    if await org_exists(conn, org_id):
        return False
    values = {"id": org_id, "name": name or org_id, "created_at": utcnow()}
    if conn.dialect.name == "postgresql":
        statement: sa.Executable = pg_insert(orgs).values(values).on_conflict_do_nothing(index_elements=["id"])
    else:
        statement = sqlite_insert(orgs).values(values).on_conflict_do_nothing(index_elements=["id"])
    result = await conn.execute(statement)
    return result.rowcount == 1


async def ensure_default_org(conn: AsyncConnection) -> bool:
    return await ensure_org(conn, DEFAULT_ORG_ID)


async def org_exists(conn: AsyncConnection, org_id: str) -> bool:
    return (await conn.execute(sa.select(orgs.c.id).where(orgs.c.id == org_id))).first() is not None


async def list_org_ids(conn: AsyncConnection) -> list[str]:
    return list((await conn.execute(sa.select(orgs.c.id).order_by(orgs.c.id))).scalars())

