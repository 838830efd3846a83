"""Preparing the database at start-up: wait until it answers, migrate, create the default org, bootstrap the
first admin token. Runs while the HTTP server already answers `/health` (and `/ready` with 503 and the
reason), so an orchestrator started before its PostgreSQL simply becomes ready when the database does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kici.orchestrator.config import Settings
from kici.orchestrator.container import Readiness
from kici.orchestrator.datadir import write_private_file
from kici.orchestrator.db.database import Database, DatabaseUnavailable
from kici.orchestrator.db.migrate import MigrationError, migrate, migration_status
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.logs import log_event
from kici.orchestrator.storage.blobs import BlobStore, BlobStoreUnavailable
from kici.orchestrator.store import orgs, tokens

BOOTSTRAP_TOKEN_NAME = "bootstrap"
MAX_RETRY_DELAY_S = 30.0


class FatalStartupError(Exception):
    """Start-up cannot succeed by waiting (a broken SQLite path, a schema from a newer version, …)."""


@dataclass(frozen=True)
class GeneratedToken:
    plaintext: str
    token_id: str
    file: str


async def wait_for_database(database: Database, readiness: Readiness, *, first_delay: float = 0.5) -> None:
    """Return once `SELECT 1` succeeds. PostgreSQL may come up after us, so we retry with back-off; an
    SQLite file that cannot be opened will not fix itself, so that is fatal at once."""
    delay = first_delay
    while True:
        try:
            await database.ping(timeout=5.0)
            return
        except DatabaseUnavailable as exc:
            if database.is_sqlite:
                raise FatalStartupError(f"cannot open the SQLite database {database.redacted_url}: {exc}") from None
            readiness.waiting(f"database unreachable: {exc}")
            log_event("db.unreachable", level="warning", database=database.redacted_url, reason=str(exc),
                      retry_in_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_DELAY_S)


async def ensure_schema(settings: Settings, database: Database, readiness: Readiness) -> None:
    """Migrate (`KICI_AUTO_MIGRATE=true`), or wait until someone else has (`false`: e.g. a deploy job runs
    `kici-orchestrator migrate` before or after starting the new version)."""
    delay = 1.0
    while True:
        try:
            if settings.auto_migrate:
                await migrate(database)
                return
            status = await migration_status(database)
        except MigrationError as exc:
            raise FatalStartupError(str(exc)) from None
        if status.up_to_date:
            return
        reason = (
            f"database schema at {status.current or 'empty'}, this version needs {status.head}; "
            "run `kici-orchestrator migrate` (KICI_AUTO_MIGRATE=false)"
        )
        readiness.waiting(reason)
        log_event("db.migrations_pending", level="warning", current=status.current, head=status.head,
                  pending=list(status.pending), retry_in_s=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_DELAY_S)


async def bootstrap(settings: Settings, database: Database) -> GeneratedToken | None:
    """Create the default org and the first admin token. Returns the generated token when one was made
    (the caller shows it once); None when the token is pinned by `KICI_BOOTSTRAP_ADMIN_TOKEN` or admin
    tokens already exist.

    Runs under a cluster-wide lock so orchestrators starting together create one token, not several. A
    token file is written before the transaction commits: if the commit fails, the file holds a token
    that does not work and the next start replaces it, rather than a working token nobody saw.
    """
    async with database.transaction(lock="bootstrap") as conn:
        await orgs.ensure_default_org(conn)
        if settings.bootstrap_admin_token is not None:
            plaintext = settings.bootstrap_admin_token.get_secret_value()
            existing = await tokens.find_admin_token(conn, plaintext)
            if existing is None:
                created = await tokens.create_admin_token(
                    conn, name=BOOTSTRAP_TOKEN_NAME, role=AdminRole.OWNER, plaintext=plaintext
                )
                log_event("bootstrap.admin_token_pinned", token_id=created.token.id)
            elif not existing.active:
                # An operator revoked it on purpose; an environment variable left behind must not undo that.
                log_event("bootstrap.admin_token_revoked", level="warning", token_id=existing.id,
                          hint="KICI_BOOTSTRAP_ADMIN_TOKEN names a revoked token; remove it from the environment")
            elif existing.role != AdminRole.OWNER:
                await tokens.set_admin_token_role(conn, existing.id, AdminRole.OWNER)
                log_event("bootstrap.admin_token_role_restored", token_id=existing.id, role="owner")
            return None
        if await tokens.count_active_admin_tokens(conn) > 0:
            return None
        created = await tokens.create_admin_token(conn, name=BOOTSTRAP_TOKEN_NAME, role=AdminRole.OWNER)
        path = settings.bootstrap_token_file
        write_private_file(path, created.plaintext + "\n", replace=True)
    log_event("bootstrap.admin_token_created", token_id=created.token.id, file=str(path),
              hint="printed once on the terminal; also in the file (mode 0600)")
    return GeneratedToken(plaintext=created.plaintext, token_id=created.token.id, file=str(path))


async def check_blob_storage(settings: Settings, blobs: BlobStore) -> None:
    """Refuse to start on a blob store that cannot be used (an S3 endpoint that does not answer, a missing
    bucket, refused credentials, an unwritable data dir), saying why: never a silent fallback to `fs`."""
    try:
        await blobs.check()
    except BlobStoreUnavailable as exc:
        raise FatalStartupError(f"blob storage (KICI_STORAGE_BACKEND={settings.storage_backend}): {exc}") from None
    log_event("storage.ready", backend=blobs.name)


async def prepare_database(
    settings: Settings,
    database: Database,
    readiness: Readiness,
    *,
    on_generated_token: Callable[[GeneratedToken], None] | None = None,
    before_ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Everything between "process started" and "ready": database reachable, schema current, bootstrap,
    then `before_ready` (the node joining the cluster)."""
    readiness.waiting("waiting for the database")
    await wait_for_database(database, readiness)
    readiness.waiting("applying migrations" if settings.auto_migrate else "checking the schema version")
    await ensure_schema(settings, database, readiness)
    generated = await bootstrap(settings, database)
    if generated is not None and on_generated_token is not None:
        on_generated_token(generated)
    if before_ready is not None:
        readiness.waiting("joining the cluster")
        await before_ready()
    readiness.mark_prepared()
    log_event("orchestrator.ready", database=database.redacted_url, mode=settings.mode)
