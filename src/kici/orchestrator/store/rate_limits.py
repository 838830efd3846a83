"""Request rate limits shared by every orchestrator on the database (`rate_limit_windows`): a count per key
and one-minute window; the limit is checked against a sliding estimate over the current and previous
window (`previous * (1 - elapsed/60) + current`), so a burst at a window's edge cannot double the rate."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import rate_limit_windows

__all__ = ["take"]

WINDOW_S = 60


async def take(conn: AsyncConnection, key: str, per_minute: int, now: float) -> float | None:
    """Count one request for `key` at Unix time `now` in the caller's transaction: None when it is within
    `per_minute`, else the seconds until one would be (and nothing is counted). The counting upsert comes
    first: it locks the key's row until commit, so concurrent orchestrators take turns on one key."""
    table = rate_limit_windows
    window = int(now // WINDOW_S)
    insert: Any = pg_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)
    statement = insert.values(key=key, window_start=window, hits=1).on_conflict_do_update(
        index_elements=["key", "window_start"], set_={"hits": table.c.hits + 1}
    ).returning(table.c.hits)
    current = int((await conn.execute(statement)).scalar_one())
    previous = (await conn.execute(
        sa.select(table.c.hits).where(table.c.key == key, table.c.window_start == window - 1)
    )).scalar_one_or_none() or 0
    await conn.execute(table.delete().where(table.c.key == key, table.c.window_start < window - 1))
    elapsed = now - window * WINDOW_S
    weight = 1 - elapsed / WINDOW_S
    if previous * weight + current <= per_minute:
        return None
    await conn.execute(table.update().where(table.c.key == key, table.c.window_start == window)
                       .values(hits=table.c.hits - 1))
    current -= 1
    # when the previous window's share has decayed enough; else the next window
    if previous and current < per_minute:
        needed = (previous * weight + current + 1 - per_minute) / previous * WINDOW_S
        return max(0.0, min(needed, WINDOW_S - elapsed))
    return WINDOW_S - elapsed  # the current window alone is full: at least until the next one
