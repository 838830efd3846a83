"""Job caches: archives jobs save (`job(..., cache=Cache(...))`, `ctx.cache`) and later jobs of the same
repository restore, kept in the blob store (`KICI_STORAGE_BACKEND`) with one `caches` row each.

Scope and trust. A cache belongs to one repository (the run's source and owner/name) and one namespace:
runs the source trusts save into `trusted`; runs of untrusted code (held, then approved: `runs.trust` is not
`trusted`) save into `untrusted:<ref>`, one per ref (a pull request's ref), which trusted runs never read.
Untrusted runs read their own namespace first, then `trusted` — like GitHub's fork pull requests, they
read the base's caches and never write them.

Restore: the exact key (in each readable namespace in order), then each restore key as a prefix, the newest
match first. Save: keys are immutable; the blob is written with `put(if_absent=True)` under a key derived
from (repository, namespace, key), so of two concurrent savers exactly one wins and the other is told
(409), and nothing is ever half-written. The row is inserted after the blob is complete.

Eviction: when a save takes a repository over `KICI_CACHE_REPO_MAX_BYTES`, its least recently used entries
go; the retention sweep removes entries unused for `KICI_CACHE_MAX_AGE`. Rows go first, then blobs, so a
restore never finds a row without its archive for long (and handles it when it does).

Agents never hold storage credentials: they stream archives through the orchestrator with their own token
(kici.orchestrator.routes.agent_caches).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

from kici.engine.states import RunTrust
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.logs import log_event
from kici.orchestrator.storage.blobs import BlobStore, BlobStoreUnavailable
from kici.orchestrator.store import caches as cache_store
from kici.orchestrator.store.caches import CacheRecord, CacheScope
from kici.orchestrator.store.runs import RunRecord

TRUSTED = "trusted"
UNTRUSTED_PREFIX = "untrusted:"
MAX_KEY_LENGTH = 512
BLOB_PREFIX = "caches/"
ORPHAN_AGE = dt.timedelta(minutes=10)
"""A blob without a row older than this is a leftover (its saver died before writing the row), not a
concurrent saver about to write its row: the next save may replace it."""


class CacheKeyError(ValueError):
    pass


def check_key(key: str, what: str = "cache key") -> str:
    """The orchestrator's own check of a key (it trusts no agent): 1 to 512 characters, no control
    character, no white space at either end."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise CacheKeyError(f"{what} must be 1 to {MAX_KEY_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise CacheKeyError(f"{what} {key[:100]!r} contains a control character")
    if key != key.strip():
        raise CacheKeyError(f"{what} {key[:100]!r} starts or ends with white space")
    return key


def scope_of(run: RunRecord) -> CacheScope:
    return CacheScope(org_id=run.org_id, source_id=run.source_id or "", repo=run.repo)


def namespace_of(run: RunRecord) -> str:
    """Where the run's jobs save."""
    if run.trust == RunTrust.TRUSTED.value:
        return TRUSTED
    return UNTRUSTED_PREFIX + (run.ref or f"sha:{run.sha}")


def readable_namespaces(run: RunRecord) -> list[str]:
    """Where the run's jobs restore from, in order."""
    own = namespace_of(run)
    return [own] if own == TRUSTED else [own, TRUSTED]


def _digest(text: str, size: int = 64) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:size]


def blob_key(scope: CacheScope, namespace: str, key: str) -> str:
    """Deterministic, so that concurrent savers of one key contend for one blob (`put(if_absent=True)`)."""
    repo = _digest(f"{scope.org_id}\0{scope.source_id}\0{scope.repo}", 32)
    return f"{BLOB_PREFIX}{repo}/{_digest(namespace, 16)}/{_digest(key)}"


async def lookup(
    database: Database, run: RunRecord, key: str, restore_keys: Sequence[str]
) -> CacheRecord | None:
    """The entry a job of `run` restores for `key` (exact, then the restore-key prefixes in order, newest
    first), marked used; None on a miss."""
    scope = scope_of(run)
    namespaces = readable_namespaces(run)
    async with database.transaction() as conn:
        found: CacheRecord | None = None
        for namespace in namespaces:
            found = await cache_store.find_exact(conn, scope, namespace, key)
            if found is not None:
                break
        for prefix in restore_keys if found is None else ():
            for namespace in namespaces:
                found = await cache_store.find_newest_with_prefix(conn, scope, namespace, prefix)
                if found is not None:
                    break
            if found is not None:
                break
        if found is not None:
            await cache_store.touch(conn, found.id)
    return found


async def delete_entries(database: Database, blobs: BlobStore, records: Sequence[CacheRecord]) -> int:
    """Delete entries: their rows (one transaction), then their blobs. Returns the rows deleted."""
    if not records:
        return 0
    async with database.transaction() as conn:
        deleted = await cache_store.delete_rows(conn, [r.id for r in records])
    for record in records:
        try:
            await blobs.delete(record.blob_key)
        except BlobStoreUnavailable as exc:  # the row is gone: a later save replaces the leftover blob
            log_event("cache.blob_delete_failed", level="warning", key=record.blob_key, error=str(exc))
    return deleted


async def enforce_quota(
    database: Database, blobs: BlobStore, scope: CacheScope, max_bytes: int, *, keep: str | None = None
) -> list[CacheRecord]:
    """Evict the scope's least recently used entries (never `keep`, the one just saved) until its caches
    fit in `max_bytes`. Returns the evicted entries."""
    async with database.read() as conn:
        total = await cache_store.repo_bytes(conn, scope)
        if total <= max_bytes:
            return []
        candidates = await cache_store.least_recently_used(conn, scope, keep=keep)
    evicted: list[CacheRecord] = []
    for record in candidates:
        if total <= max_bytes:
            break
        evicted.append(record)
        total -= record.size
    await delete_entries(database, blobs, evicted)
    if evicted:
        log_event("cache.evicted", reason="quota", repo=scope.repo, entries=len(evicted),
                  bytes=sum(r.size for r in evicted))
    return evicted


async def evict_unused(
    database: Database, blobs: BlobStore, max_age: dt.timedelta | None, *, now: dt.datetime | None = None,
    batch: int = 500,
) -> int:
    """Evict every entry not used for `max_age` (None: nothing). Returns the number evicted."""
    if max_age is None:
        return 0
    before = (now or utcnow()) - max_age
    total = 0
    while True:
        async with database.read() as conn:
            records = await cache_store.unused_since(conn, before, limit=batch)
        if not records:
            break
        total += await delete_entries(database, blobs, records)
        if len(records) < batch:
            break
    if total:
        log_event("cache.evicted", reason="age", entries=total)
    return total
