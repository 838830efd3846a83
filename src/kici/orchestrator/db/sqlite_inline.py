"""The embedded SQLite database driven on the event loop's own thread.

SQLAlchemy's `sqlite+aiosqlite` dialect talks to an aiosqlite connection, which runs every call (cursor,
execute, fetch, close, commit) in a thread of its own and hands the result back through the event loop:
about 290 such round trips per trivial run, which cost the orchestrator more CPU than the SQL itself (the
statements of a run take ~3.5 ms of SQLite's time; the hand-offs, queue wake-ups and loop wake-ups about ten
times that). Statements on a local SQLite file take tens of microseconds, so this driver runs them inline:
the same asyncio interface (the dialect is unchanged, it gets this connection through `async_creator`),
no threads.

What a thread used to absorb, and how it is handled here:
- Waiting for the write lock: SQLite's busy handler would sleep on the event loop's thread. The connection
  gets a busy timeout of zero instead, and a statement refused with SQLITE_BUSY (which had no effect) is
  retried after an asyncio sleep, with back-off, within `busy_timeout_s`. In one orchestrator process
  writers queue on `Database._sqlite_writer` first, so this only happens when another process writes the
  same file (a migration, a second orchestrator started by mistake).
- A cancellation can only land in such a retry's sleep (nothing else here suspends): SQLAlchemy then
  invalidates the connection, and closing it rolls back, so no abandoned transaction keeps the write lock.
- A long statement (a retention pass deleting many rows) holds the loop for its duration, as any other
  CPU work of the orchestrator does; the batches those passes use keep it to milliseconds.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_BACKOFF_START_S = 0.002
_BACKOFF_MAX_S = 0.1


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


class InlineCursor:
    """An aiosqlite-shaped cursor whose coroutines do their work before their first suspension point."""

    def __init__(self, owner: InlineConnection) -> None:
        self._owner = owner
        self._cursor = owner._conn.cursor()

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = None) -> InlineCursor:
        if parameters is None:
            await self._owner.retry_busy(lambda: self._cursor.execute(sql))
        else:
            await self._owner.retry_busy(lambda: self._cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, seq_of_parameters: Iterable[Any]) -> InlineCursor:
        rows = list(seq_of_parameters)  # a retry needs them again
        await self._owner.retry_busy(lambda: self._cursor.executemany(sql, rows))
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _RunNow:
    """What SQLAlchemy's aiosqlite adapter uses as aiosqlite's request queue (to set `isolation_level`):
    runs the request at once."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)


class InlineConnection:
    """An aiosqlite-shaped connection over a `sqlite3.Connection`, used from the event loop's thread only."""

    def __init__(self, conn: sqlite3.Connection, busy_timeout_s: float) -> None:
        self._conn = conn
        self._connection: sqlite3.Connection | None = conn  # the adapter checks it before commit/rollback
        self._tx = _RunNow()
        self.busy_timeout_s = busy_timeout_s

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: Any) -> None:
        self._conn.isolation_level = value

    async def retry_busy(self, call: Callable[[], T]) -> T:
        """`call()`, again after a pause for as long as SQLite answers SQLITE_BUSY, up to the busy timeout."""
        deadline: float | None = None
        pause = _BACKOFF_START_S
        while True:
            try:
                return call()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.busy_timeout_s
                if now >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, _BACKOFF_MAX_S)

    def cursor(self) -> InlineCursor:
        return InlineCursor(self)

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        await self.retry_busy(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()


def connector(path: str, *, busy_timeout_s: float, cached_statements: int = 256) -> Callable[[], Any]:
    """The `async_creator` for `create_async_engine`: opens `path` (the caller's PRAGMAs follow on connect)."""

    async def connect() -> InlineConnection:
        conn = sqlite3.connect(path, timeout=0, check_same_thread=False, isolation_level=None,
                               cached_statements=cached_statements)
        return InlineConnection(conn, busy_timeout_s)

    return connect
