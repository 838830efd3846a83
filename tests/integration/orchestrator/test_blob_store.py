"""The blob-store contract, run against both backends: the filesystem and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kici.orchestrator.config import Settings
from kici.orchestrator.storage.blob_backends import blob_store_from_settings
from kici.orchestrator.storage.blobs import (
    BlobExists,
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
    BlobTooLarge,
    InvalidBlobKey,
    read_all,
)
from kici.orchestrator.storage.blobs_fs import FilesystemBlobStore
from kici.orchestrator.storage.blobs_s3 import MIN_PART_SIZE, S3BlobStore
from tests.s3server import S3Server

PART = MIN_PART_SIZE


@pytest.fixture
def aws_env(s3_server: S3Server) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in s3_server.aws_env}
    os.environ.update(s3_server.aws_env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(params=["fs", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "fs":
        blob_store: BlobStore = FilesystemBlobStore(tmp_path / "blobs")
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        request.getfixturevalue("aws_env")
        # a fresh prefix per test: tests share the session's bucket but never see each other's blobs
        blob_store = S3BlobStore(bucket=server.bucket, prefix=f"t-{uuid.uuid4().hex[:12]}", endpoint=server.endpoint,
                                 region="us-east-1", force_path_style=True, part_size=PART)
    await blob_store.check()
    try:
        yield blob_store
    finally:
        await blob_store.close()


async def _stream(data: bytes, chunk: int = 100_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), chunk):
        yield data[start:start + chunk]
        await asyncio.sleep(0)


@pytest.mark.parametrize("size", [0, 1, 2 * PART + 12345])
async def test_round_trip(store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    info = await store.put("a/b/blob.bin", _stream(data))
    assert info.size == size
    reader = await store.open("a/b/blob.bin")
    assert reader.info.size == size
    back = await read_all(reader)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    assert (await store.stat("a/b/blob.bin")).size == size


async def test_put_from_a_file_and_replace(store: BlobStore) -> None:
    big = os.urandom(PART + 7)
    await store.put("k", io.BytesIO(big))
    assert await read_all(await store.open("k")) == big
    await store.put("k", io.BytesIO(b"small"))  # replacing is the default
    assert await read_all(await store.open("k")) == b"small"


async def test_list_and_delete_by_prefix(store: BlobStore) -> None:
    for key in ("runs/r1/j1/a", "runs/r1/j1/b", "runs/r1/j2/c", "runs/r10/j/d", "other/x"):
        await store.put(key, io.BytesIO(key.encode()))
    assert [i.key for i in await store.list("runs/r1/")] == ["runs/r1/j1/a", "runs/r1/j1/b", "runs/r1/j2/c"]
    assert [i.key for i in await store.list("runs/r1")] == [
        "runs/r1/j1/a", "runs/r1/j1/b", "runs/r1/j2/c", "runs/r10/j/d"]
    assert [(i.key, i.size) for i in await store.list("other/")] == [("other/x", 7)]
    assert await store.list("nothing/") == []
    assert await store.delete_prefix("runs/r1/") == 3
    assert [i.key for i in await store.list("")] == ["other/x", "runs/r10/j/d"]
    assert await store.delete("other/x") is True
    assert await store.delete("other/x") is False
    assert [i.key for i in await store.list("")] == ["runs/r10/j/d"]


async def test_missing_keys(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.open("no/such")
    with pytest.raises(BlobNotFound):
        await store.stat("no/such")
    assert await store.delete_prefix("no/") == 0


@pytest.mark.parametrize("key", ["", "../x", "a/../b", "/abs", "a//b", "a/./b", "sp ace", "a\\b", "x" * 1000])
async def test_unusable_keys_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidBlobKey):
        await store.put(key, io.BytesIO(b"x"))
    with pytest.raises(InvalidBlobKey):
        await store.open(key)


async def test_concurrent_creates_one_wins(store: BlobStore) -> None:
    contents = [os.urandom(1000 + n) for n in range(6)]
    results = await asyncio.gather(
        *(store.put("cache/key", _stream(c, 300), if_absent=True) for c in contents), return_exceptions=True
    )
    winners = [n for n, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, BlobExists) for n, r in enumerate(results) if n != winners[0])
    assert await read_all(await store.open("cache/key")) == contents[winners[0]]
    with pytest.raises(BlobExists):  # also for a multipart-sized stream
        await store.put("cache/key", _stream(os.urandom(PART + 1)), if_absent=True)
    assert await read_all(await store.open("cache/key")) == contents[winners[0]]


async def test_over_the_size_limit_nothing_is_stored(store: BlobStore) -> None:
    with pytest.raises(BlobTooLarge):
        await store.put("big", _stream(os.urandom(100)), max_bytes=99)
    with pytest.raises(BlobTooLarge):
        await store.put("big", _stream(os.urandom(PART * 2)), max_bytes=PART + 10)
    assert await store.list("") == []
    await store.put("big", _stream(b"x" * 99), max_bytes=99)
    assert (await store.stat("big")).size == 99


async def test_s3_missing_bucket_and_unreachable_endpoint(s3_server: S3Server, aws_env: None) -> None:
    missing = S3BlobStore(bucket="no-such-bucket-kici", endpoint=s3_server.endpoint, force_path_style=True,
                          region="us-east-1")
    with pytest.raises(BlobStoreUnavailable, match="bucket 'no-such-bucket-kici' does not exist"):
        await missing.check()
    from tests.s3server import free_ports

    down = S3BlobStore(bucket="b", endpoint=f"http://127.0.0.1:{free_ports(1)[0]}", force_path_style=True,
                       region="us-east-1")
    with pytest.raises(BlobStoreUnavailable, match="unreachable"):
        await down.check()


def test_settings_pick_the_backend(tmp_path: Path) -> None:
    fs = blob_store_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(fs, FilesystemBlobStore) and fs.root == tmp_path / "blobs"
    with pytest.raises(ValueError, match="KICI_STORAGE_BACKEND=s3 needs KICI_STORAGE_BUCKET"):
        Settings(data_dir=tmp_path, storage_backend="s3")
    s3 = blob_store_from_settings(Settings(data_dir=tmp_path, storage_backend="s3", storage_bucket="bkt",
                                           storage_prefix="/kici/", storage_endpoint="http://127.0.0.1:1"))
    assert isinstance(s3, S3BlobStore) and s3.prefix == "kici/" and s3.bucket == "bkt"
