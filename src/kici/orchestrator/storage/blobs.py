"""Blob storage: one interface (`BlobStore`), two backends — the filesystem under the data dir (the embedded
default, `kici.orchestrator.storage.blobs_fs`) and S3-compatible object storage
(`kici.orchestrator.storage.blobs_s3`). Job artifacts use it now; caches and job logs are meant to.

Keys are `/`-separated paths of plain segments (`artifacts/<run id>/<job id>/<artifact id>`): letters,
digits, `.`, `_`, `-`, never `.` or `..` alone, so a key maps onto a file path or an object key without
escaping and can never climb out of the store's root or prefix. Content always streams — puts take an
async iterator of bytes or an open binary file, gets yield chunks — so nothing holds a whole blob in memory.

Errors are typed: `BlobNotFound` (no such key), `BlobExists` (a conditional create lost to another
writer: "concurrent savers of one key, one wins"), `BlobStoreUnavailable` (the backend cannot be reached,
the bucket is missing, the disk is full…), `InvalidBlobKey` (a key the rules above refuse).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Protocol

CHUNK_SIZE = 256 * 1024
"""Bytes per chunk when reading a blob back (and when reading a file to put)."""

_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,200}")
MAX_KEY_LENGTH = 900  # S3 allows 1024 bytes, and the S3 backend puts its prefix in front

BlobSource = AsyncIterable[bytes] | BinaryIO
"""What `put` reads from: an async iterator of byte chunks (an HTTP request body) or an open binary file."""


class BlobError(Exception):
    """Base of every blob-storage error."""


class InvalidBlobKey(BlobError, ValueError):
    pass


class BlobNotFound(BlobError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no blob {key!r}")


class BlobExists(BlobError):
    """`put(..., if_absent=True)` on a key that exists (or that another writer created first)."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"blob {key!r} already exists")


class BlobStoreUnavailable(BlobError):
    """The backend cannot be used right now (unreachable endpoint, missing bucket, refused credentials,
    full disk); the message says which and why."""


class BlobTooLarge(BlobError):
    """A put went over the `max_bytes` its caller allowed; nothing was stored."""

    def __init__(self, key: str, max_bytes: int) -> None:
        self.key = key
        self.max_bytes = max_bytes
        super().__init__(f"blob {key!r} is larger than {max_bytes} bytes")


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified: datetime | None = None


class BlobReader(Protocol):
    """An open blob: its `info`, then its content chunk by chunk. Close it (or exhaust it) when done."""

    info: BlobInfo

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class BlobStore(Protocol):
    name: str
    """`fs` or `s3`, for logs and errors."""

    async def check(self) -> None:
        """Raise `BlobStoreUnavailable` (saying why) when the store cannot be used: called at start-up."""
        ...

    async def put(self, key: str, source: BlobSource, *, if_absent: bool = False,
                  max_bytes: int | None = None) -> BlobInfo:
        """Store `source` under `key`, atomically: readers see the old content or the new, never a part.
        `if_absent`: raise `BlobExists` instead of replacing. `max_bytes`: raise `BlobTooLarge` (storing
        nothing) once the source goes over it."""
        ...

    async def open(self, key: str) -> BlobReader:
        """Raise `BlobNotFound` at once when the key is missing, so a caller can answer 404 before streaming."""
        ...

    async def stat(self, key: str) -> BlobInfo:
        ...

    async def list(self, prefix: str) -> list[BlobInfo]:
        """Every blob whose key starts with `prefix` (a key prefix, e.g. `artifacts/RUN/`), sorted by key."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete one blob; False when it did not exist."""
        ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under `prefix`; the number deleted."""
        ...

    async def close(self) -> None:
        ...


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidBlobKey(f"blob key must be 1 to {MAX_KEY_LENGTH} characters: {key[:80]!r}")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise InvalidBlobKey(f"not a usable blob key: {key[:200]!r} (segment {segment[:80]!r})")
    return key


def check_prefix(prefix: str) -> str:
    """A prefix is a key, optionally ending in `/` (a "directory"), or empty (everything)."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


async def read_all(reader: BlobReader) -> bytes:
    """The whole blob, for tests and small blobs only."""
    try:
        return b"".join([chunk async for chunk in reader.chunks()])
    finally:
        await reader.close()
