"""An in-memory LRU + TTL cache of lock files, keyed `{provider}:{repo}:{sha}`.

A commit's content never changes, so a cached answer (the bytes, or "no lock file at this commit") stays
right for as long as it is kept; the TTL (`KICI_LOCKFILE_CACHE_TTL_MS`) only bounds memory held by
commits nobody pushes to any more, and `KICI_LOCKFILE_CACHE_MAX` bounds the entry count (0 disables the
cache). Concurrent misses for one key share a single fetch, so a burst of deliveries for one push (a
push plus its check suite, or several orgs' sources) reads the host once. Errors are not cached.

One answer can depend on the source rather than the commit: GitHub answers 404 ("no lock file") for a
repository the configured installation cannot see. So a source's entries are dropped when the source
changes (`forget_prefix`, driven by the cluster bus's `source.changed` on every node).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from kici.engine.lockfile import LockFile, parse_lock_file

_Missing = object()


class LockFileCache:
    def __init__(self, max_entries: int, ttl_ms: int) -> None:
        self.max_entries = max_entries
        self.ttl_seconds = ttl_ms / 1000
        self._entries: OrderedDict[str, tuple[float, bytes | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self._parsed: OrderedDict[str, LockFile] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(provider: str, repo: str, sha: str) -> str:
        return f"{provider}:{repo}:{sha}"

    def __len__(self) -> int:
        return len(self._entries)

    def parsed(self, content: bytes) -> LockFile:
        """`parse_lock_file(content)`, remembered for the most recent lock files (by content): every
        webhook for a cached commit would otherwise validate the whole lock file again. `LockFileError`
        as from `parse_lock_file` (failures are not remembered)."""
        key = hashlib.sha256(content).hexdigest()
        found = self._parsed.get(key)
        if found is not None:
            self._parsed.move_to_end(key)
            return found
        lock = parse_lock_file(content)
        self._parsed[key] = lock
        while len(self._parsed) > max(1, self.max_entries):
            self._parsed.popitem(last=False)
        return lock

    def _lookup(self, key: str) -> bytes | object | None:
        entry = self._entries.get(key)
        if entry is None:
            return _Missing
        expires, value = entry
        if expires <= time.monotonic():
            del self._entries[key]
            return _Missing
        self._entries.move_to_end(key)
        return value

    def _store(self, key: str, value: bytes | None) -> None:
        if self.max_entries <= 0 or self.ttl_seconds <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl_seconds, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def get(self, key: str, fetch: Callable[[], Awaitable[bytes | None]]) -> bytes | None:
        """The cached value for `key`, or `fetch()`'s (then cached)."""
        found = self._lookup(key)
        if found is not _Missing:
            self.hits += 1
            return found if isinstance(found, bytes) else None
        pending = self._inflight.get(key)
        if pending is not None:
            self.hits += 1
            return await asyncio.shield(pending)
        self.misses += 1
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await fetch()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(value)
        self._store(key, value)
        return value

    def forget_prefix(self, prefix: str) -> int:
        """Drop the entries whose key starts with `prefix` (`github:<source id>:`); how many."""
        keys = [k for k in self._entries if k.startswith(prefix)]
        for key in keys:
            del self._entries[key]
        return len(keys)

    def clear(self) -> None:
        self._entries.clear()
