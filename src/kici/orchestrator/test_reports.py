"""Test reports: the JUnit XML files a job names (`job(..., test_reports=["reports/*.xml"])`), sent by the
agent after the job (succeeded or failed) to `PUT /api/v1/agent/jobs/{job_id}/test-reports/{path}`
(kici.orchestrator.routes.agent_test_reports), kept as sent in the blob store under
`test-reports/<run id>/<job id>/<file id>` and read here into per-test rows (`test_results`) with one
`test_report_files` row per file: its counts, or why it was not read (malformed, a DTD, over
`KICI_TEST_REPORT_MAX_BYTES`). A file that cannot be read never fails the job or the upload of the others.

People read them with `kici-admin runs tests RUN_ID` and `GET /api/v1/admin/runs/{run_id}/tests`; a job's
check run summarises them. They are kept as long as their run: `Services.delete_run_data` deletes them.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncIterator
from typing import IO

from kici.engine.junit import JUnitReport, parse_junit
from kici.orchestrator.db.database import Database
from kici.orchestrator.storage.blobs import BlobInfo, BlobStore
from kici.orchestrator.store import test_reports as report_store

SPOOL_IN_MEMORY_BYTES = 1024 * 1024
"""A report this small is read from memory; a larger one from a temporary file while it is parsed."""


def blob_key(run_id: str, job_id: str, file_id: str) -> str:
    return f"test-reports/{run_id}/{job_id}/{file_id}"


def run_prefix(run_id: str) -> str:
    return f"test-reports/{run_id}/"


class Received:
    """A report body on its way into the blob store: hashed, and spooled for the parser on the way."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115

    async def tee(self, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in stream:
            if chunk:
                self.digest.update(chunk)
                self.spool.write(chunk)
                yield chunk

    async def store(self, blobs: BlobStore, key: str, stream: AsyncIterator[bytes], *, max_bytes: int) -> BlobInfo:
        return await blobs.put(key, self.tee(stream), max_bytes=max_bytes)

    async def parse(self, *, max_bytes: int) -> JUnitReport:
        """The stored report's test cases (off the event loop: a large report takes a while)."""

        def read() -> JUnitReport:
            self.spool.seek(0)
            return parse_junit(self.spool, max_bytes=max_bytes)

        return await asyncio.to_thread(read)

    def close(self) -> None:
        self.spool.close()


async def delete_run_reports(database: Database, blobs: BlobStore, run_id: str) -> int:
    """Delete a run's test reports (rows, then the files as sent). For whatever deletes a run, with its logs
    and artifacts; the rows would also go with the run's row (ON DELETE CASCADE), the blobs not. Returns the
    number of blobs deleted."""
    async with database.transaction() as conn:
        await report_store.delete_run_reports(conn, run_id)
    return await blobs.delete_prefix(run_prefix(run_id))
