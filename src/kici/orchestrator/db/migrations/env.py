"""Alembic environment for the orchestrator database, used by `kici.orchestrator.db.migrate`.

There is no alembic.ini: `migrate()` builds the Alembic config in code and hands over an open connection
(inside its locked transaction) through `config.attributes["connection"]`, so migrations run the same way
from `kici-orchestrator`, from tests and from a packaged install, whatever the working directory.
Offline mode (`sqlalchemy.url` set, e.g. to print SQL for a DBA) also works.
"""

from __future__ import annotations

from alembic import context

from kici.orchestrator.db.schema import VERSION_TABLE, metadata

config = context.config


def _configure_options(dialect_name: str) -> dict[str, object]:
    return {
        "target_metadata": metadata,
        "version_table": VERSION_TABLE,
        # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("offline migrations need the sqlalchemy.url option")
    dialect_name = "sqlite" if url.startswith("sqlite") else "postgresql"
    context.configure(url=url, literal_binds=True, **_configure_options(dialect_name))  # type: ignore[arg-type]
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "run the orchestrator's migrations with `kici-orchestrator migrate` (or kici.orchestrator.db.migrate), "
            "which supplies the database connection"
        )
    context.configure(connection=connection, **_configure_options(connection.dialect.name))  # type: ignore[arg-type]
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
