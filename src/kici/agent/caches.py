"""Job caches on the agent: restore a job's caches after the checkout and before its first step, save them
after it succeeded when the exact key missed, and serve the steps' `ctx.cache` requests — streaming
tar+gzip archives (kici.runner.cache_archive) to and from the orchestrator over HTTP with this agent's
token: `GET|PUT <orchestrator>/api/v1/agent/jobs/<job id>/caches/<key>`. The agent holds no storage
credentials, and which repository and namespace a job reads and writes is the orchestrator's decision.

Storage trouble never changes a job's result: a failed restore is a miss (its half-restored paths are
removed), a failed save is a line in the job's setup log. What does fail the job (category `cache`) is a
cache that cannot be what it says: a key whose `hash_files` glob matches nothing, a path leaving the
workspace through a symlink.

The transfers run in worker threads with a synchronous HTTP client: the archive code is synchronous, and
a pipe between the tar writer and the upload keeps memory use to a few chunks whatever the cache's size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx

from kici.runner.cache_archive import CacheArchiveError, CachePathError, existing_paths, extract_archive, write_archive

CHUNK_SIZE = 256 * 1024
CONNECT_TIMEOUT_S = 10.0


class CacheError(Exception):
    """A cache the job declared wrongly (a path leaving the workspace): fails the job."""


@dataclass
class Restored:
    key: str
    """The key asked for."""
    matched: str | None = None
    """The key restored (the key itself, or what a restore-key prefix matched); None on a miss."""
    size: int = 0
    seconds: float = 0.0
    error: str | None = None
    """Why the restore failed (storage, a corrupt archive); the job goes on as on a miss."""

    @property
    def exact(self) -> bool:
        return self.matched == self.key


@dataclass
class Saved:
    key: str
    outcome: str
    """`saved`, `exists` (another job saved the key first), `empty` (no path exists) or `failed`."""
    size: int = 0
    seconds: float = 0.0
    error: str | None = None
    missing: list[str] = field(default_factory=list)


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def cache_url(base_url: str, job_id: str, key: str) -> str:
    return f"{base_url}/api/v1/agent/jobs/{quote(job_id, safe='')}/caches/{quote(key, safe='')}"


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)[:500]
    except ValueError:
        return response.text[:300]


class _HashingReader:
    """A file-like view of a response body that hashes what passes through."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._at = 0
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) - self._at < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self.digest.update(chunk)
            self.size += len(chunk)
            if self._at:  # drop what was read before growing (keeps the buffer about one chunk long)
                del self._buffer[:self._at]
                self._at = 0
            self._buffer += chunk
        end = len(self._buffer) if size < 0 else min(len(self._buffer), self._at + size)
        out = bytes(self._buffer[self._at:end])
        self._at = end
        return out

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass


class CacheClient:
    """One job's cache transfers (blocking: call from a worker thread)."""

    def __init__(self, *, base_url: str, token: str, job_id: str, workspace: Path, timeout_s: float = 600.0) -> None:
        self.base_url = base_url
        self.token = token
        self.job_id = job_id
        self.workspace = workspace
        self.timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def restore(self, key: str, paths: Sequence[str], restore_keys: Sequence[str] = ()) -> Restored:
        """Raises `CacheError` for a path leaving the workspace; anything else is reported in the result."""
        try:
            present, _ = existing_paths(self.workspace, paths)
        except CachePathError as exc:
            raise CacheError(str(exc)) from None
        started = time.monotonic()
        outcome = Restored(key)
        try:
            with httpx.Client(timeout=self.timeout) as client, client.stream(
                "GET", cache_url(self.base_url, self.job_id, key), params={"restore_key": list(restore_keys)},
                headers=self._headers(),
            ) as response:
                if response.status_code == 204:
                    return outcome
                if response.status_code != 200:
                    response.read()
                    outcome.error = f"HTTP {response.status_code}: {_error_text(response)}"
                    return outcome
                matched = unquote(response.headers.get("x-kici-cache-key", ""))
                expected = response.headers.get("x-kici-sha256", "")
                reader = _HashingReader(response.iter_raw(CHUNK_SIZE))
                try:
                    extract_archive(reader, self.workspace, paths)  # type: ignore[arg-type]
                    reader.drain()
                    if expected and reader.digest.hexdigest() != expected:
                        raise CacheArchiveError(f"the archive's SHA-256 is {reader.digest.hexdigest()}, "
                                                f"the orchestrator recorded {expected}")
                except (CacheArchiveError, OSError, httpx.HTTPError) as exc:
                    self._remove_restored(paths, present)
                    outcome.error = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
                    return outcome
                outcome.matched = matched or key
                outcome.size = reader.size
        except httpx.HTTPError as exc:
            self._remove_restored(paths, present)
            outcome.error = f"{type(exc).__name__}: {exc}"
            return outcome
        finally:
            outcome.seconds = time.monotonic() - started
        return outcome

    def _remove_restored(self, paths: Sequence[str], present_before: Sequence[str]) -> None:
        """After a failed restore: the cache's paths that the restore created go, so nothing half-restored
        is left for the steps."""
        root = self.workspace.resolve()
        for rel in paths:
            if rel in present_before:
                continue
            path = root / rel
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)

    def save(self, key: str, paths: Sequence[str]) -> Saved:
        """Raises `CacheError` for a path leaving the workspace; anything else is reported in the result."""
        try:
            present, missing = existing_paths(self.workspace, paths)
        except CachePathError as exc:
            raise CacheError(str(exc)) from None
        if not present:
            return Saved(key, "empty", missing=missing)
        started = time.monotonic()
        read_fd, write_fd = os.pipe()
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                with os.fdopen(write_fd, "wb") as out:
                    write_archive(self.workspace, present, out)
            except BaseException as exc:  # handed to the uploading side, which aborts the upload
                failure.append(exc)

        writer = threading.Thread(target=produce, name="kici-cache-archive", daemon=True)
        writer.start()
        source = os.fdopen(read_fd, "rb")
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            while chunk := source.read(CHUNK_SIZE):
                sent += len(chunk)
                yield chunk
            writer.join()
            if failure:  # abort: a truncated archive must never be stored
                raise failure[0]

        outcome = Saved(key, "failed", missing=missing)
        try:
            with httpx.Client(timeout=self.timeout) as client:
                response = client.put(cache_url(self.base_url, self.job_id, key), content=body(),
                                      headers={**self._headers(), "Content-Type": "application/gzip"})
        except (httpx.HTTPError, OSError, CachePathError) as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 201:
                outcome.outcome = "saved"
                outcome.size = int(response.json().get("size", sent))
            elif response.status_code == 409 and _json(response).get("exists"):
                outcome.outcome = "exists"
            else:
                outcome.error = f"HTTP {response.status_code}: {_error_text(response)}"
        finally:
            source.close()  # a writer still writing (the upload stopped early) gets EPIPE and ends
            writer.join(timeout=30)
            outcome.seconds = time.monotonic() - started
        return outcome


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def restore_line(result: Restored) -> str:
    if result.error is not None:
        return f"[warn] cache {result.key}: restore failed, continuing without it: {result.error}"
    if result.matched is None:
        return f"[cache] cache miss {result.key}"
    via = "" if result.exact else f" (restore key matched {result.matched})"
    return f"[cache] cache hit {result.key}{via}: {human_size(result.size)} in {result.seconds:.1f} s"


def save_line(result: Saved) -> str:
    missing = f" (not found: {', '.join(result.missing)})" if result.missing else ""
    if result.outcome == "saved":
        return f"[cache] saved {result.key}: {human_size(result.size)} in {result.seconds:.1f} s{missing}"
    if result.outcome == "exists":
        return f"[cache] cache {result.key} was saved by another job first; keeping that one"
    if result.outcome == "empty":
        return f"[warn] cache {result.key} not saved: none of its paths exist{missing}"
    return f"[warn] cache {result.key} not saved (the job's result is unaffected): {result.error}"



@dataclass
class JobCache:
    """One of the job's `cache=` entries with its key templates resolved for this job."""

    key: str
    paths: list[str]
    restore_keys: list[str]
    restored: Restored | None = None
