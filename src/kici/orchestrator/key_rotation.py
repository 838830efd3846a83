"""Key rotation: re-seal every scoped secret and every source secret under the current secret key.

Online and safe to interrupt: the work goes in batches, one transaction each; every row records which key
sealed it, so a re-run (or a second orchestrator running it at the same time) picks up only what is still
sealed under another key, and the conditional UPDATEs in the stores never overwrite a concurrent write.
Meanwhile reads keep working: they try the current key, then `KICI_SECRET_KEY_OLD`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from kici.orchestrator.crypto import Keyring
from kici.orchestrator.db.database import Database
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import secrets as secret_store
from kici.orchestrator.store import sources as source_store

__all__ = ["DEFAULT_BATCH_SIZE", "RotationResult", "rotate_key"]

DEFAULT_BATCH_SIZE = 100
"""Rows per transaction: short transactions keep writers (and SQLite's single write lock) moving."""


class RotationResult(BaseModel):
    key_id: str = Field(description="Id of the current key, which now seals every value that could be opened")
    old_key_id: str | None = Field(description="Id of KICI_SECRET_KEY_OLD (None: no old key configured)")
    secrets_resealed: int = Field(description="Scoped secrets re-encrypted in this pass")
    source_secrets_resealed: int = Field(description="Source secret fields re-encrypted in this pass")
    failed: list[str] = Field(description="Values neither key opens (names only); they are left as they were")
    remaining: int = Field(description="Values still sealed under another key after this pass")


async def rotate_key(database: Database, keys: Keyring, *, batch_size: int = DEFAULT_BATCH_SIZE) -> RotationResult:
    """One full pass over both stores. Raises `CryptoError` when no current key is configured."""
    current_id = keys.current_id
    resealed_secrets = resealed_sources = 0
    failed: list[str] = []
    after: str | None = None
    while True:
        async with database.transaction() as conn:
            batch = await secret_store.reseal_secrets(conn, keys, after_id=after, limit=batch_size)
        resealed_secrets += batch.resealed
        failed += batch.failed
        after = batch.last_id
        if batch.examined < batch_size:
            break
    after = None
    while True:
        async with database.transaction() as conn:
            source_batch = await source_store.reseal_source_secrets(conn, keys, after_id=after, limit=batch_size)
        resealed_sources += source_batch.resealed
        failed += source_batch.failed
        after = source_batch.last_id
        if source_batch.examined < batch_size:
            break
    async with database.read() as conn:
        remaining = await secret_store.count_stale_secrets(conn, keys)
        remaining += await source_store.count_stale_source_secrets(conn, keys)
    log_event("secret_key.rotated", level="warning" if failed else "info", key_id=current_id,
              old_key_id=keys.old_id, secrets_resealed=resealed_secrets, source_secrets_resealed=resealed_sources,
              failed=len(failed), remaining=remaining)
    return RotationResult(key_id=current_id, old_key_id=keys.old_id, secrets_resealed=resealed_secrets,
                          source_secrets_resealed=resealed_sources, failed=failed, remaining=remaining)
