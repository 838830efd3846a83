"""The embedded SQLite driver (kici.orchestrator.db.sqlite_inline): statements on the event loop's thread,
and a write lock held by another process waited for with asyncio sleeps — the loop keeps running meanwhile
— then refused once the busy timeout has passed."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from kici.orchestrator.db.database import Database
from kici.orchestrator.db.sqlite_inline import connector

HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def _hold_write_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


async def test_a_write_waits_for_another_process_without_blocking_the_loop(tmp_path: Path) -> None:
    db = Database.connect(f"sqlite:///{tmp_path / 'k.db'}")
    try:
        async with db.transaction() as conn:
            await conn.execute(sa.text("CREATE TABLE t (n INTEGER)"))
        holder = _hold_write_lock(tmp_path / "k.db", 0.6)
        try:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            started = time.monotonic()
            async with db.transaction() as conn:
                await conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            waited = time.monotonic() - started
            ticker.cancel()
            assert waited >= 0.3, "the write did not wait for the other process's lock"
            assert ticks >= 10, f"the event loop stalled while the write waited ({ticks} ticks in {waited:.2f} s)"
        finally:
            holder.wait(10)
        async with db.read() as conn:
            assert (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar_one() == 1
    finally:
        await db.close()


async def test_a_lock_held_past_the_busy_timeout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    sqlite3.connect(path).execute("CREATE TABLE t (n INTEGER)").connection.close()
    conn = await connector(str(path), busy_timeout_s=0.2)()
    holder = _hold_write_lock(path, 1.5)
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await conn.execute("BEGIN IMMEDIATE")
        assert 0.2 <= time.monotonic() - started < 1.2
    finally:
        holder.wait(10)
        await conn.close()
    conn = await connector(str(path), busy_timeout_s=0.2)()
    try:
        await conn.execute("BEGIN IMMEDIATE")
        await conn.execute("INSERT INTO t VALUES (2)")
        await conn.commit()
        rows = await (await conn.execute("SELECT n FROM t")).fetchall()
        assert rows == [(2,)]
    finally:
        await conn.close()
