"""The S3-compatible blob store (AWS S3, SeaweedFS, MinIO, …), through boto3.

Objects are `<KICI_STORAGE_PREFIX><key>` in `KICI_STORAGE_BUCKET`. Credentials come from the standard AWS
chain only (environment, shared credentials/config files, container or instance metadata): KiCI's own
settings never hold them, and agents never see them (they upload through the orchestrator).

A put streams: a source smaller than one part goes up in a single `PutObject`; a larger one becomes a
multipart upload, one part (`part_size`, 8 MiB by default) in memory at a time, aborted on any failure so
no half object is left. A conditional create sends `If-None-Match: *` (on the `PutObject` or on the
`CompleteMultipartUpload`), which the server decides atomically: of two concurrent creators one wins, the
other gets `BlobExists`.

boto3 is synchronous: every call runs in a worker thread, so the event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

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

DEFAULT_PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict", "409"}

T = TypeVar("T")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def normalize_prefix(prefix: str) -> str:
    """`kici`, `/kici/` and `kici/` all mean objects under `kici/`; empty means the bucket's root."""
    prefix = prefix.strip("/")
    if prefix:
        check_prefix(prefix)
    return f"{prefix}/" if prefix else ""


class _S3Reader:
    def __init__(self, info: BlobInfo, body: Any) -> None:
        self.info = info
        self._body = body

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    chunk: bytes = await asyncio.to_thread(self._body.read, CHUNK_SIZE)
                except (BotoCoreError, OSError) as exc:
                    raise BlobStoreUnavailable(f"reading blob {self.info.key!r} from S3 failed: {exc}") from None
                if not chunk:
                    return
                yield chunk
        finally:
            await self.close()

    async def close(self) -> None:
        await asyncio.to_thread(self._body.close)


class S3BlobStore:
    name = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint: str | None = None,
        region: str | None = None,
        force_path_style: bool = False,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum part size)")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint = endpoint
        self.part_size = part_size
        config = Config(
            region_name=region,
            s3={"addressing_style": "path" if force_path_style else "auto"},
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # checksums only where S3 requires them: S3-compatible servers differ in the newer
            # default-on trailing checksums, and TLS plus Content-Length already protect the transfer
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own (the default chain, never explicit keys) so concurrent threads do not
        # share boto3's module-level default session while it initialises.
        session = boto3.session.Session()
        self._client: Any = session.client("s3", endpoint_url=endpoint, config=config)

    @property
    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint}" if self.endpoint else "")

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def _call(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except NoCredentialsError:
            raise BlobStoreUnavailable(
                f"no AWS credentials for {self.where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a shared "
                "credentials file (AWS_PROFILE) or an instance role"
            ) from None
        except BotoCoreError as exc:  # connection refused, DNS, timeouts …
            raise BlobStoreUnavailable(f"S3 storage {self.where} unreachable: {exc}") from None

    async def check(self) -> None:
        try:
            await self._call(self._client.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            code = _code(exc)
            if code in _NOT_FOUND or code == "NoSuchBucket":
                raise BlobStoreUnavailable(f"bucket {self.bucket!r} does not exist ({self.where})") from None
            if code in {"403", "AccessDenied"}:
                raise BlobStoreUnavailable(
                    f"access to bucket {self.bucket!r} denied ({self.where}): check the AWS credentials"
                ) from None
            raise BlobStoreUnavailable(f"S3 storage {self.where}: {code or exc}") from None

    async def put(self, key: str, source: BlobSource, *, if_absent: bool = False,
                  max_bytes: int | None = None) -> BlobInfo:
        full = self._key(key)
        parts = _parts(source, self.part_size)
        size = 0

        def count(chunk: bytes) -> bytes:
            nonlocal size
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise BlobTooLarge(key, max_bytes)
            return chunk

        first = count(await anext(parts, b""))
        conditional: dict[str, str] = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            second = await anext(parts, None)
            if second is None:  # small: one request
                await self._call(self._client.put_object, Bucket=self.bucket, Key=full, Body=first, **conditional)
                return BlobInfo(key=key, size=size)
            upload = await self._call(self._client.create_multipart_upload, Bucket=self.bucket, Key=full)
            upload_id = upload["UploadId"]
            try:
                done: list[dict[str, Any]] = []
                pending = [first, count(second)]
                while pending:
                    number = len(done) + 1
                    reply = await self._call(self._client.upload_part, Bucket=self.bucket, Key=full,
                                             UploadId=upload_id, PartNumber=number, Body=pending.pop(0))
                    done.append({"ETag": reply["ETag"], "PartNumber": number})
                    following = await anext(parts, None)
                    if following is not None:
                        pending.append(count(following))
                await self._call(self._client.complete_multipart_upload, Bucket=self.bucket, Key=full,
                                 UploadId=upload_id, MultipartUpload={"Parts": done}, **conditional)
            except BaseException:
                try:
                    await self._call(self._client.abort_multipart_upload, Bucket=self.bucket, Key=full,
                                     UploadId=upload_id)
                except Exception:  # the original error matters more; a lifecycle rule reaps the leftovers
                    pass
                raise
        except ClientError as exc:
            if if_absent and _code(exc) in _PRECONDITION:
                raise BlobExists(key) from None
            raise BlobStoreUnavailable(f"writing blob {key!r} to {self.where} failed: {_code(exc) or exc}") from None
        return BlobInfo(key=key, size=size)

    async def open(self, key: str) -> _S3Reader:
        try:
            reply = await self._call(self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise BlobNotFound(key) from None
            raise BlobStoreUnavailable(f"reading blob {key!r} from {self.where} failed: {_code(exc)}") from None
        info = BlobInfo(key=key, size=int(reply["ContentLength"]), modified=reply.get("LastModified"))
        return _S3Reader(info, reply["Body"])

    async def stat(self, key: str) -> BlobInfo:
        try:
            reply = await self._call(self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise BlobNotFound(key) from None
            raise BlobStoreUnavailable(f"stat of blob {key!r} on {self.where} failed: {_code(exc)}") from None
        return BlobInfo(key=key, size=int(reply["ContentLength"]), modified=reply.get("LastModified"))

    async def list(self, prefix: str) -> list[BlobInfo]:
        check_prefix(prefix)

        def walk() -> list[BlobInfo]:
            out: list[BlobInfo] = []
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    key = str(item["Key"])[len(self.prefix):]
                    out.append(BlobInfo(key=key, size=int(item["Size"]), modified=item.get("LastModified")))
            return out

        try:
            found = await self._call(walk)
        except ClientError as exc:
            raise BlobStoreUnavailable(f"listing {prefix!r} on {self.where} failed: {_code(exc)}") from None
        return sorted(found, key=lambda info: info.key)

    async def delete(self, key: str) -> bool:
        try:
            await self.stat(key)
        except BlobNotFound:
            return False
        try:
            await self._call(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            raise BlobStoreUnavailable(f"deleting blob {key!r} on {self.where} failed: {_code(exc)}") from None
        return True

    async def delete_prefix(self, prefix: str) -> int:
        found = await self.list(prefix)
        deleted = 0
        for start in range(0, len(found), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + info.key} for info in found[start:start + 1000]]
            try:
                reply = await self._call(self._client.delete_objects, Bucket=self.bucket,
                                         Delete={"Objects": batch, "Quiet": True})
            except ClientError as exc:
                raise BlobStoreUnavailable(f"deleting {prefix!r} on {self.where} failed: {_code(exc)}") from None
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise BlobStoreUnavailable(
                    f"deleting {prefix!r} on {self.where}: {len(errors)} object(s) not deleted "
                    f"({first.get('Key')}: {first.get('Code')})"
                )
            deleted += len(batch)
        return deleted

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)


async def _parts(source: BlobSource, part_size: int) -> AsyncIterator[bytes]:
    """`source` re-cut into parts of exactly `part_size` bytes (the last one shorter)."""
    buffer = bytearray()
    if isinstance(source, AsyncIterable):
        async for chunk in source:
            buffer += chunk
            while len(buffer) >= part_size:
                yield bytes(buffer[:part_size])
                del buffer[:part_size]
    else:
        while True:
            chunk = await asyncio.to_thread(source.read, part_size - len(buffer))
            if not chunk:
                break
            buffer += chunk
            if len(buffer) >= part_size:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)
