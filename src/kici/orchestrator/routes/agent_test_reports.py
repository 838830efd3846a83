"""The agents' test report upload, `PUT {KICI_BASE_PATH}/api/v1/agent/jobs/{job_id}/test-reports/{path}`.

Authenticated and bound to the job as artifact uploads are (kici.orchestrator.routes.agent_artifacts): the
agent's own token, the job running on an agent of that token (else 403), not finished (else 409). The body
streams into the blob store and is read into per-test rows (kici.orchestrator.test_reports). A file the
orchestrator could not read (malformed, a DTD) is still accepted (201) with its `error`; one over
`KICI_TEST_REPORT_MAX_BYTES` is refused (413) and recorded as not read, so the run's reports say so too.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.requests import ClientDisconnect

from kici.orchestrator import artifacts
from kici.orchestrator import test_reports as reports
from kici.orchestrator.audit_trail import client_of
from kici.orchestrator.auth import error_response
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.db.schema import AuditOutcome, new_id
from kici.orchestrator.logs import log_event
from kici.orchestrator.routes.agent_artifacts import (
    AGENT_PREFIX,
    JobRequestRefused,
    bearer_token,
    in_hand,
    running_job_of,
)
from kici.orchestrator.storage.blobs import BlobStore, BlobStoreUnavailable, BlobTooLarge
from kici.orchestrator.store import artifacts as artifact_store
from kici.orchestrator.store import audit
from kici.orchestrator.store import test_reports as report_store
from kici.orchestrator.store.artifacts import UploadTarget

router = APIRouter(prefix=AGENT_PREFIX, tags=["agents"])
State = Annotated[AppState, Depends(app_state)]


@router.put(
    "/jobs/{job_id}/test-reports/{path:path}",
    summary="Send one JUnit XML test report of a running job (agent token)",
    status_code=201,
)
async def upload_test_report(job_id: str, path: str, request: Request, state: State) -> Response:
    if bearer_token(request) is None:
        return error_response(401, "missing agent token (Authorization: Bearer <agent token>)")
    try:
        path = artifacts.check_artifact_path(path, "test report path")
    except artifacts.ArtifactPathError as exc:
        return error_response(400, str(exc))
    settings = state.settings
    async with state.database.transaction() as conn:
        try:
            target = await running_job_of(conn, request, job_id, action="test_report.upload",
                                          what="test reports are accepted while it runs")
        except JobRequestRefused as refused:
            return refused.response
        if await report_store.job_file_count(conn, job_id, except_path=path) >= settings.test_report_max_files:
            return error_response(409, f"job {job_id!r} already sent {settings.test_report_max_files} test report "
                                       f"files (KICI_TEST_REPORT_MAX_FILES); {path!r} was not kept")
    limit = settings.test_report_max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return await _refuse_too_large(state, services_of(request.app).blobs, target, path, int(declared), limit)
    blobs = services_of(request.app).blobs
    file_id = new_id()
    key = reports.blob_key(target.run_id, job_id, file_id)
    received = reports.Received()
    try:
        try:
            info = await received.store(blobs, key, request.stream(), max_bytes=limit)
        except BlobTooLarge:
            return await _refuse_too_large(state, blobs, target, path, None, limit)
        except ClientDisconnect:
            return error_response(400, "the upload ended before its body did; nothing was stored")
        except BlobStoreUnavailable as exc:
            log_event("test_report.storage_unavailable", level="error", job_id=job_id, error=str(exc))
            return error_response(503, f"test report storage unavailable: {exc}")
        try:
            report = await received.parse(max_bytes=limit)
        except BaseException:
            await blobs.delete(key)
            raise
    finally:
        received.close()
    try:
        async with state.database.transaction(lock=f"test-reports:{job_id}") as conn:
            current = await artifact_store.upload_target(conn, job_id)
            if current is None or not in_hand(current):  # finished while the body streamed
                raise _Finished()
            replaced = await report_store.replace_report_file(
                conn, file_id=file_id, org_id=target.org_id, run_id=target.run_id, job_id=job_id, path=path,
                size=info.size, sha256=received.digest.hexdigest(), blob_key=key, report=report, error=report.error,
            )
            await audit.record(
                conn, action="test_report.upload", outcome=AuditOutcome.ALLOWED, org_id=target.org_id, status=201,
                token_id=target.agent_token_id, method=request.method, path=request.url.path, client=client_of(request),
                actor=f"agent:{target.agent_id}", target=f"run:{target.run_id} job:{job_id} test-report:{path}",
            )
    except _Finished:
        await blobs.delete(key)
        return error_response(409, f"job {job_id!r} finished during the upload; nothing was kept")
    except IntegrityError:  # another upload of the same path committed first
        await blobs.delete(key)
        return error_response(409, f"test report {path!r} of job {job_id!r} is being uploaded concurrently; "
                                   "nothing was kept from this upload")
    except BaseException:
        await blobs.delete(key)  # no row points at it
        raise
    if replaced is not None:
        await blobs.delete(replaced)
    counts = report.counts()
    log_event("test_report.received", run_id=target.run_id, job_id=job_id, path=path, size=info.size,
              tests=counts.total, failed=counts.failed + counts.errors, error=report.error)
    return JSONResponse(
        {"id": file_id, "run_id": target.run_id, "job_id": job_id, "path": path, "size": info.size,
         "passed": counts.passed, "failed": counts.failed, "errors": counts.errors, "skipped": counts.skipped,
         "total": counts.total, "error": report.error},
        status_code=201,
    )


class _Finished(Exception):
    pass


async def _refuse_too_large(state: AppState, blobs: BlobStore, target: UploadTarget, path: str,
                            size: int | None, limit: int) -> Response:
    """413, and a `test_report_files` row saying so: the run's reports show the file was sent and refused."""
    reason = (f"refused: {'the file is ' + str(size) + ' bytes, ' if size is not None else ''}over the "
              f"{limit}-byte limit (KICI_TEST_REPORT_MAX_BYTES)")
    replaced = None
    try:
        async with state.database.transaction(lock=f"test-reports:{target.job_id}") as conn:
            current = await artifact_store.upload_target(conn, target.job_id)
            if current is not None and in_hand(current):
                replaced = await report_store.replace_report_file(
                    conn, file_id=new_id(), org_id=target.org_id, run_id=target.run_id, job_id=target.job_id,
                    path=path, size=size if size is not None else limit + 1, sha256=None, blob_key=None,
                    report=None, error=reason,
                )
    except IntegrityError:  # a concurrent upload of the same path recorded itself first
        pass
    if replaced is not None:
        await blobs.delete(replaced)
    log_event("test_report.too_large", run_id=target.run_id, job_id=target.job_id, path=path, size=size,
              limit=limit)
    return error_response(413, f"test report {path!r}: {reason.removeprefix('refused: ')}; nothing was stored")
