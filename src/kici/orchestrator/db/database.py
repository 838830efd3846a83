"""The one seam between the orchestrator and its database (SQLite embedded, PostgreSQL for production).

Everything else receives an `AsyncConnection` from `Database.transaction()` / `Database.read()` and runs
SQLAlchemy Core statements from `kici.orchestrator.store`; nothing outside `db/` creates engines.

SQLite specifics (and why):
- WAL mode: readers never block the writer, and the file survives a crash without a rollback journal.
- A second writer (another orchestrator process, a migration) waits instead of failing: the driver
  (`sqlite_inline`, statements on the event loop's thread) retries SQLITE_BUSY for SQLITE_BUSY_TIMEOUT_MS.
- `foreign_keys=ON`: SQLite leaves them off by default; the schema relies on cascades.
- We emit `BEGIN` ourselves (the driver's implicit transactions do not cover DDL and begin lazily), and
  write transactions use `BEGIN IMMEDIATE`: they take the write lock up front, so a read-then-write
  transaction can never fail half-way with SQLITE_BUSY when another writer got in between.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from kici.engine import aio
from kici.orchestrator.db import sqlite_inline
from kici.orchestrator.db.url import Dialect, parse_database_url, redact

SQLITE_BUSY_TIMEOUT_MS = 15_000
_BEGIN_OPTION = "kici_sqlite_begin"


class DatabaseUnavailable(Exception):
    """The database cannot be reached (or did not answer in time); the message is safe to show."""


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for `pg_advisory_*lock` derived from a lock name."""
    return int.from_bytes(hashlib.sha256(f"kici:{name}".encode()).digest()[:8], "big", signed=True)


def describe_error(exc: BaseException) -> str:
    """A one-line, password-free description of a database error, for /ready and logs."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    orig = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    cause = orig.__cause__ if orig.__cause__ is not None and not str(orig) else orig
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    name = type(cause).__name__
    return f"{name}: {message}"[:300] if message else name


class Database:
    """An async engine plus the transaction rules of its dialect. Create with `Database.connect(url)`."""

    def __init__(self, engine: AsyncEngine, dialect: Dialect, url: str) -> None:
        self.engine = engine
        self.dialect: Dialect = dialect
        self.url = url
        """The URL as configured (driver-less); `redacted_url` for anything that gets logged."""
        self._sqlite_writer = asyncio.Lock()
        """SQLite has one writer at a time. Writers of this process queue here, in order, instead of
        colliding on `BEGIN IMMEDIATE`, where SQLite's busy handler would make them sleep and retry with
        growing back-off (tens of milliseconds per collision); `busy_timeout` still covers other processes."""

    @classmethod
    def connect(cls, url: str, *, connect_timeout: float = 5.0, pool_size: int = 10) -> Database:
        """A `Database` for `url` (`sqlite:///…` or `postgresql://…`). Connections open lazily: an unreachable
        server surfaces at the first query (`ping()` says so), which lets the service start and report
        "not ready" instead of crashing."""
        dialect, driver_url = parse_database_url(url)
        if dialect == "sqlite":
            assert driver_url.database is not None
            Path(driver_url.database).expanduser().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # statements run on the event loop's thread (kici.orchestrator.db.sqlite_inline says why)
            engine = create_async_engine(
                driver_url, pool_size=pool_size, max_overflow=0, pool_pre_ping=False,
                async_creator=sqlite_inline.connector(driver_url.database,
                                                      busy_timeout_s=SQLITE_BUSY_TIMEOUT_MS / 1000),
            )
            _install_sqlite_listeners(engine)
        else:
            engine = create_async_engine(
                driver_url,
                pool_size=pool_size,
                max_overflow=pool_size,
                # No ping on every checkout (a round trip per transaction, ~8% of the dispatcher's CPU under
                # load): a connection found dead makes SQLAlchemy invalidate the whole pool, so after a
                # PostgreSQL restart one operation fails and its caller's retry gets fresh connections.
                pool_pre_ping=False,
                connect_args={
                    "timeout": connect_timeout,
                    "server_settings": {"application_name": "kici-orchestrator"},
                },
            )
        return cls(engine, dialect, url)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def redacted_url(self) -> str:
        return redact(self.url)

    @asynccontextmanager
    async def transaction(self, *, lock: str | None = None) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block exits normally and rolled back on an exception.

        `lock` names a cluster-wide critical section: on PostgreSQL a transaction-scoped advisory lock
        (`pg_advisory_xact_lock`, released at commit/rollback, so it cannot leak); on SQLite the
        `BEGIN IMMEDIATE` write lock already excludes every other writer of the file.
        """
        if self.is_sqlite:
            try:
                await aio.wait_for(self._sqlite_writer.acquire(), SQLITE_BUSY_TIMEOUT_MS / 1000)
            except TimeoutError:
                raise DatabaseUnavailable(
                    f"no write access to the SQLite database within {SQLITE_BUSY_TIMEOUT_MS} ms"
                ) from None
            try:
                async with self.engine.connect() as conn, conn.begin():
                    yield conn
            finally:
                self._sqlite_writer.release()
            return
        async with self.engine.connect() as conn, conn.begin():
            if lock is not None:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(lock)})
            yield conn

    async def try_lock(self, conn: AsyncConnection, name: str) -> bool:
        """Take the cluster-wide lock `name` for the rest of `conn`'s transaction if nobody holds it (a
        transaction-scoped PostgreSQL advisory lock); False when another session does. Always True on
        SQLite, whose write transactions exclude each other anyway."""
        if not self.is_postgresql:
            return True
        result = await conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": lock_key(name)})
        return bool(result.scalar_one())

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction: a consistent snapshot that takes no write lock on SQLite."""
        async with self.engine.connect() as conn:
            if self.is_sqlite:
                await conn.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
            async with conn.begin():
                yield conn

    async def ping(self, timeout: float = 3.0) -> None:
        """`SELECT 1`, or `DatabaseUnavailable` with a short reason."""
        try:
            async with asyncio.timeout(timeout):
                async with self.engine.connect() as conn:
                    if self.is_sqlite:  # a health probe must not queue behind writers for the write lock
                        await conn.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
                    await conn.execute(text("SELECT 1"))
        except (TimeoutError, SQLAlchemyError, OSError) as exc:
            raise DatabaseUnavailable(describe_error(exc)) from exc

    async def connect_listener(self, timeout: float = 5.0) -> Any:
        """A dedicated asyncpg connection outside the pool (PostgreSQL only), for `LISTEN`: it stays open
        for as long as the caller listens, which a pooled connection must not. The caller closes it."""
        import asyncpg  # type: ignore[import-untyped]

        if not self.is_postgresql:
            raise RuntimeError("LISTEN needs PostgreSQL")
        _, driver_url = parse_database_url(self.url)
        dsn = driver_url.set(drivername="postgresql").render_as_string(hide_password=False)
        return await asyncpg.connect(dsn, timeout=timeout, server_settings={"application_name": "kici-bus"})

    async def close(self) -> None:
        await self.engine.dispose()


def _enable_wal(cursor: Any) -> None:
    # Switching a new file to WAL needs an exclusive lock, and SQLite reports SQLITE_BUSY for it at once,
    # without the busy handler, when another process is doing the same (two orchestrators or migrators
    # starting on a fresh file). Retry within the busy timeout. Once the file is in WAL mode (which
    # persists), this pragma is a no-op that takes no lock, so the loop only ever spins on first start.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as exc:
            contended = "locked" in str(exc) or "busy" in str(exc)
            if not contended or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _install_sqlite_listeners(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (module docstring)
        cursor = dbapi_conn.cursor()
        try:
            # no busy handler: it would sleep on the event loop's thread; the driver retries SQLITE_BUSY
            # with asyncio sleeps within SQLITE_BUSY_TIMEOUT_MS instead
            cursor.execute("PRAGMA busy_timeout = 0")
            _enable_wal(cursor)
            # NORMAL is durable across process crashes in WAL mode; only an OS crash or power loss can
            # lose the last transactions, which is the usual trade-off for an embedded service database.
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")
