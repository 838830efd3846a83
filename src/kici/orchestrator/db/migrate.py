"""Schema migrations, run programmatically (no alembic.ini in anyone's working directory).

`migrate()` applies every pending migration inside one locked transaction: on PostgreSQL under a
transaction-scoped advisory lock, on SQLite under the `BEGIN IMMEDIATE` write lock of the file. Several
orchestrators starting together therefore migrate once; the others wait, then find nothing to do. Both
databases run DDL transactionally here, so a failed migration leaves the schema as it was.

Writing a migration: add `versions/NNNN_what.py` with `revision = "NNNN"` and `down_revision` set to
the previous number, with frozen table definitions (never import `schema.py` there), and update
`schema.py` to match; the schema test on both databases tells when the two disagree. On SQLite use
`op.batch_alter_table` for anything beyond adding a column.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection

from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import VERSION_TABLE
from kici.orchestrator.logs import log_event

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK = "migrate"


class MigrationError(Exception):
    """The schema cannot be brought to this version's head; the message says why."""


@dataclass(frozen=True)
class MigrationStatus:
    current: str | None
    """Revision the database is at; None for an empty database."""
    head: str
    """Latest revision this version of KiCI knows."""
    pending: tuple[str, ...]
    """Revisions `migrate()` would apply, oldest first."""

    @property
    def up_to_date(self) -> bool:
        return not self.pending and self.current == self.head


@dataclass(frozen=True)
class MigrationResult:
    before: str | None
    after: str
    applied: tuple[str, ...]
    """Revisions applied by this call, oldest first; empty when the schema was already current."""


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None, "no migrations found"
    return head


def _current_revision(conn: Connection) -> str | None:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _pending(current: str | None) -> tuple[str, ...]:
    script = _script()
    try:
        revisions = list(script.iterate_revisions("heads", current or "base"))
    except (CommandError, RevisionError) as exc:
        raise MigrationError(
            f"the database is at schema revision {current!r}, which this version of KiCI does not know "
            f"(was it migrated by a newer version?): {exc}"
        ) from None
    return tuple(reversed([r.revision for r in revisions if r.revision != current]))


def _upgrade(conn: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = conn
    command.upgrade(config, "head")


@asynccontextmanager
async def _opened(target: str | Database) -> AsyncIterator[Database]:
    if isinstance(target, Database):
        yield target
        return
    database = Database.connect(target)
    try:
        yield database
    finally:
        await database.close()


async def migrate(target: str | Database) -> MigrationResult:
    """Bring the database at `target` (a URL or an open `Database`) to the head revision, under the
    migration lock. A no-op when it is already there. Not re-entrant within one process (Alembic keeps
    its context in module globals); processes and cluster nodes may run it concurrently."""
    async with _opened(target) as database, database.transaction(lock=MIGRATION_LOCK) as conn:
        before = await conn.run_sync(_current_revision)
        pending = _pending(before)  # also rejects a database from a newer version before touching it
        if pending:
            await conn.run_sync(_upgrade)
        after = await conn.run_sync(_current_revision)
    if after is None:
        raise MigrationError("migrations ran but recorded no revision")
    if pending:
        log_event("db.migrated", database=database.redacted_url, before=before, after=after, applied=list(pending))
    return MigrationResult(before=before, after=after, applied=pending)


async def migration_status(target: str | Database) -> MigrationStatus:
    """Where the database at `target` stands relative to this version's migrations."""
    async with _opened(target) as database, database.read() as conn:
        current = await conn.run_sync(_current_revision)
    return MigrationStatus(current=current, head=head_revision(), pending=_pending(current))
