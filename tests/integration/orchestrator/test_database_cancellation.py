"""Write transactions cancelled at any moment (a request cut off, a shutdown deadline) leave the database
usable at once: no connection keeps SQLite's write lock for the next writer to wait out."""

from __future__ import annotations

import asyncio
import random
import time

import sqlalchemy as sa

from kici.orchestrator.db.database import Database


async def test_cancelled_writers_leave_no_lock_behind(database: Database) -> None:
    async with database.transaction() as conn:
        await conn.execute(sa.text("CREATE TABLE cancel_probe (n INTEGER)"))

    async def write(n: int) -> None:
        async with database.transaction() as conn:
            await conn.execute(sa.text("INSERT INTO cancel_probe (n) VALUES (:n)"), {"n": n})
            await conn.execute(sa.text("UPDATE cancel_probe SET n = n + 1 WHERE n < -100"))

    rng = random.Random(7)
    for n in range(150):
        task = asyncio.create_task(write(n))
        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.004]))
        task.cancel()
        await asyncio.wait({task}, timeout=20)
        assert task.done(), "a cancelled write did not end"

    started = time.monotonic()
    async with asyncio.timeout(10):
        await write(-1)
        async with database.read() as conn:
            rows = (await conn.execute(sa.text("SELECT count(*) FROM cancel_probe WHERE n = -1"))).scalar_one()
    assert rows == 1
    assert time.monotonic() - started < 2.0, "the next writer waited for a lock a cancelled one kept"
