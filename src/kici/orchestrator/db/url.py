"""Database URLs: what operators write (`sqlite:///…`, `postgresql://…`) and the async drivers we use.

Operators should not have to know which Python driver the orchestrator uses, so the plain scheme is the
documented one and the driver is chosen here. A URL that already names our driver is accepted as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

Dialect = Literal["sqlite", "postgresql"]

_DRIVERS: dict[str, tuple[Dialect, str]] = {
    "sqlite": ("sqlite", "sqlite+aiosqlite"),
    "sqlite+aiosqlite": ("sqlite", "sqlite+aiosqlite"),
    "postgresql": ("postgresql", "postgresql+asyncpg"),
    "postgres": ("postgresql", "postgresql+asyncpg"),
    "postgresql+asyncpg": ("postgresql", "postgresql+asyncpg"),
}


class DatabaseURLError(ValueError):
    """The URL is not one the orchestrator can use; the message says what is accepted."""


def sqlite_url_for(path: Path) -> str:
    """The documented (driver-less) URL of an SQLite file."""
    return f"sqlite:///{path}"


def parse_database_url(url: str) -> tuple[Dialect, URL]:
    """The dialect and the async-driver URL for `url`; `DatabaseURLError` for anything else."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseURLError(
            "not a database URL; use sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME"
        ) from None
    scheme = parsed.drivername
    if scheme not in _DRIVERS:
        raise DatabaseURLError(
            f"unsupported database scheme {scheme!r}; use sqlite:///PATH or postgresql://USER@HOST/DBNAME"
        )
    dialect, driver = _DRIVERS[scheme]
    if dialect == "sqlite":
        # An in-memory database would vanish with its connection (and differ per pooled connection):
        # the orchestrator's state must survive, so only files are accepted.
        if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
            raise DatabaseURLError("SQLite needs a file path, e.g. sqlite:////var/lib/kici/kici.db")
    elif not parsed.database:
        raise DatabaseURLError("PostgreSQL URL names no database, e.g. postgresql://kici@db.internal/kici")
    return dialect, parsed.set(drivername=driver)


def redact(url: str | URL) -> str:
    """`url` with its password replaced, for logs and error messages."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError:
        return "<invalid URL>"
    return parsed.render_as_string(hide_password=True)
