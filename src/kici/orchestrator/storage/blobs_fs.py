"""The filesystem blob store (the embedded default): `<data dir>/blobs/objects/<key>`.

A put writes a temporary file under `<root>/tmp` chunk by chunk, flushes it to disk, then renames it into
place, so a reader sees the old blob or the new one, never a part; a conditional create links the
temporary file in instead (`link` fails when the name exists, so of two concurrent creators exactly one
wins). The file I/O runs in worker threads: the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from kici.orchestrator.storage.blobs import (
    CHUNK_SIZE,
    BlobExists,
    BlobInfo,
    BlobNotFound,
    BlobSource,
    BlobStoreUnavailable,
    BlobTooLarge,
    check_key,
    check_prefix,
)


def default_blob_root(data_dir: Path) -> Path:
    return data_dir / "blobs"


def _info(key: str, path: Path) -> BlobInfo:
    st = path.stat()
    return BlobInfo(key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC))


class _FileReader:
    def __init__(self, info: BlobInfo, handle: BinaryIO) -> None:
        self.info = info
        self._handle = handle

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await asyncio.to_thread(self._handle.read, CHUNK_SIZE)
                if not chunk:
                    return
                yield chunk
        finally:
            await self.close()

    async def close(self) -> None:
        self._handle.close()


class FilesystemBlobStore:
    name = "fs"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._objects = root / "objects"
        self._tmp = root / "tmp"

    def _path(self, key: str) -> Path:
        return self._objects / check_key(key)

    async def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._objects.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe_file = self._tmp / f"probe-{uuid.uuid4().hex}"
            probe_file.write_bytes(b"")
            probe_file.unlink()

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise BlobStoreUnavailable(f"blob directory {self.root} is not writable: {exc}") from None

    async def put(self, key: str, source: BlobSource, *, if_absent: bool = False,
                  max_bytes: int | None = None) -> BlobInfo:
        final = self._path(key)
        try:
            await asyncio.to_thread(self._tmp.mkdir, parents=True, exist_ok=True)
            tmp = self._tmp / f"{uuid.uuid4().hex}.part"
            handle = await asyncio.to_thread(open, tmp, "wb")
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot write under {self.root}: {exc}") from None
        try:
            size = 0
            try:
                if isinstance(source, AsyncIterable):
                    async for chunk in source:
                        size += len(chunk)
                        if max_bytes is not None and size > max_bytes:
                            raise BlobTooLarge(key, max_bytes)
                        await asyncio.to_thread(handle.write, chunk)
                else:
                    size = await asyncio.to_thread(_copy_file, source, handle, key, max_bytes)
                await asyncio.to_thread(_flush_and_close, handle)
            finally:
                handle.close()
            await asyncio.to_thread(self._place, tmp, final, key, if_absent)
        except OSError as exc:
            raise BlobStoreUnavailable(f"writing blob {key!r} under {self.root} failed: {exc}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return BlobInfo(key=key, size=size, modified=datetime.now(UTC))

    def _place(self, tmp: Path, final: Path, key: str, if_absent: bool) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if if_absent:
            try:
                os.link(tmp, final)  # atomic and fails when `final` exists: one concurrent creator wins
            except FileExistsError:
                raise BlobExists(key) from None
        else:
            os.replace(tmp, final)

    async def open(self, key: str) -> _FileReader:
        path = self._path(key)

        def do_open() -> _FileReader:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the reader
            try:
                st = os.fstat(handle.fileno())
                info = BlobInfo(key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC))
            except BaseException:
                handle.close()
                raise
            return _FileReader(info, handle)

        try:
            return await asyncio.to_thread(do_open)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFound(key) from None

    async def stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        try:
            info = await asyncio.to_thread(_info, key, path)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFound(key) from None
        if not path.is_file():
            raise BlobNotFound(key)
        return info

    async def list(self, prefix: str) -> list[BlobInfo]:
        check_prefix(prefix)
        return await asyncio.to_thread(self._list, prefix)

    def _list(self, prefix: str) -> builtins.list[BlobInfo]:
        # walk only the deepest directory the prefix names, then filter by the whole prefix
        base = self._objects / prefix.rsplit("/", 1)[0] if "/" in prefix else self._objects
        out: builtins.list[BlobInfo] = []
        if not base.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                key = path.relative_to(self._objects).as_posix()
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):  # deleted while we walked
                        out.append(_info(key, path))
        out.sort(key=lambda info: info.key)
        return out

    async def delete(self, key: str) -> bool:
        path = self._path(key)

        def remove() -> bool:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return False
            self._prune(path.parent)
            return True

        return await asyncio.to_thread(remove)

    async def delete_prefix(self, prefix: str) -> int:
        found = await self.list(prefix)
        deleted = 0
        for info in found:
            if await self.delete(info.key):
                deleted += 1
        return deleted

    def _prune(self, directory: Path) -> None:
        """Remove directories left empty, up to the objects root."""
        while directory != self._objects and self._objects in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or gone): stop
                return
            directory = directory.parent

    async def close(self) -> None:
        return None


def _copy_file(source: BinaryIO, handle: BinaryIO, key: str, max_bytes: int | None) -> int:
    size = 0
    while True:
        chunk = source.read(CHUNK_SIZE)
        if not chunk:
            return size
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise BlobTooLarge(key, max_bytes)
        handle.write(chunk)


def _flush_and_close(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
