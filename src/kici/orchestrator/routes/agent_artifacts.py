"""The agents' artifact upload, `PUT {KICI_BASE_PATH}/api/v1/agent/jobs/{job_id}/artifacts/{path}`.

Authenticated with the agent's own token (`Authorization: Bearer <agent token>`) and bound to the job: the
job must be running on an agent registered with that token (another agent's token → 403) and not have
finished (→ 409). The body streams into the blob store; nothing is kept when it is refused halfway (over a
size limit, the client gone, storage down). Answers `{"error": …}` on failure, the artifact on success.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import ClientDisconnect

from kici.engine.states import JobState
from kici.orchestrator import artifacts
from kici.orchestrator.audit_trail import client_of
from kici.orchestrator.auth import error_response
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.db.schema import AuditOutcome, new_id
from kici.orchestrator.logs import log_event
from kici.orchestrator.storage.blobs import BlobStoreUnavailable, BlobTooLarge
from kici.orchestrator.store import artifacts as artifact_store
from kici.orchestrator.store import audit, tokens
from kici.orchestrator.store.artifacts import UploadTarget

AGENT_PREFIX = "/api/v1/agent"
UPLOADABLE = frozenset({JobState.RUNNING.value, JobState.RECOVERING.value, JobState.CANCELLING.value})


def in_hand(target: UploadTarget) -> bool:
    """The job runs on its agent as far as requests about it go: running (or recovering, cancelling), or
    still `queued` with an agent assigned — handed out, its agent's `running` not yet written (a step's
    request over HTTP can overtake that status on the WebSocket)."""
    return target.status in UPLOADABLE or (target.status == JobState.QUEUED.value and target.agent_id is not None)

router = APIRouter(prefix=AGENT_PREFIX, tags=["agents"])
State = Annotated[AppState, Depends(app_state)]


def bearer_token(request: Request) -> str | None:
    """The `Authorization: Bearer` value (an agent token), or None."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


async def _hashed(stream: AsyncIterator[bytes], digest: hashlib._Hash) -> AsyncIterator[bytes]:
    async for chunk in stream:
        if chunk:
            digest.update(chunk)
            yield chunk


class JobRequestRefused(Exception):
    """An agent's request about a job refused; `response` says why (401, 403, 404 or 409)."""

    def __init__(self, response: Response) -> None:
        super().__init__()
        self.response = response


async def running_job_of(
    conn: AsyncConnection, request: Request, job_id: str, *, action: str, what: str
) -> UploadTarget:
    """The job `job_id`, running on an agent of the request's agent token, in the caller's transaction. A
    job of another token's agent writes a denied audit row (`action`); `what` ends the 409 message for a job
    that no longer runs ("artifacts are accepted while it runs"). Raises `JobRequestRefused`."""
    plaintext = bearer_token(request)
    if plaintext is None:
        raise JobRequestRefused(error_response(401, "missing agent token (Authorization: Bearer <agent token>)"))
    token = await tokens.verify_agent_token(conn, plaintext)
    if token is None:
        raise JobRequestRefused(error_response(401, "invalid or revoked agent token"))
    target = await artifact_store.upload_target(conn, job_id)
    if target is None or target.org_id != token.org_id:
        raise JobRequestRefused(error_response(404, f"no job with id {job_id!r}"))
    if target.agent_token_id != token.id:
        await audit.record(
            conn, action=action, outcome=AuditOutcome.DENIED, org_id=token.org_id, status=403,
            reason="the job is not running on an agent of this token", token_id=token.id,
            method=request.method, path=request.url.path, client=client_of(request),
            actor=f"agent-token:{token.id}", target=f"job:{job_id}",
        )
        raise JobRequestRefused(error_response(403, f"job {job_id!r} is not running on an agent of this agent token"))
    if not in_hand(target):
        raise JobRequestRefused(error_response(409, f"job {job_id!r} is {target.status}; {what}"))
    return target


@router.put(
    "/jobs/{job_id}/artifacts/{path:path}",
    summary="Upload one artifact of a running job (agent token)",
    status_code=201,
)
async def upload_artifact(job_id: str, path: str, request: Request, state: State) -> Response:
    if bearer_token(request) is None:
        return error_response(401, "missing agent token (Authorization: Bearer <agent token>)")
    try:
        path = artifacts.check_artifact_path(path)
    except artifacts.ArtifactPathError as exc:
        return error_response(400, str(exc))
    settings = state.settings
    async with state.database.transaction() as conn:
        try:
            target = await running_job_of(conn, request, job_id, action="artifact.upload",
                                          what="artifacts are accepted while it runs")
        except JobRequestRefused as refused:
            return refused.response
        used = await artifact_store.job_bytes(conn, job_id, except_path=path)
    limit = min(settings.artifact_max_bytes, settings.artifact_job_max_bytes - used)
    declared = request.headers.get("content-length")
    if limit <= 0 or (declared is not None and declared.isdigit() and int(declared) > limit):
        return _too_large(path, settings.artifact_max_bytes, settings.artifact_job_max_bytes, used)
    blobs = services_of(request.app).blobs
    artifact_id = new_id()
    key = artifacts.blob_key(target.run_id, job_id, artifact_id)
    digest = hashlib.sha256()
    try:
        info = await blobs.put(key, _hashed(request.stream(), digest), max_bytes=limit)
    except BlobTooLarge:
        return _too_large(path, settings.artifact_max_bytes, settings.artifact_job_max_bytes, used)
    except ClientDisconnect:
        return error_response(400, "the upload ended before its body did; nothing was stored")
    except BlobStoreUnavailable as exc:
        log_event("artifact.storage_unavailable", level="error", job_id=job_id, error=str(exc))
        return error_response(503, f"artifact storage unavailable: {exc}")
    content_type = artifacts.content_type_or_default(request.headers.get("content-type"))
    try:
        # one job's uploads commit one at a time, so the limit and the path's replacement see each other
        async with state.database.transaction(lock=f"artifacts:{job_id}") as conn:
            current = await artifact_store.upload_target(conn, job_id)
            if current is None or not in_hand(current):  # finished while the body streamed
                raise _Finished()
            # checked again with the size known: concurrent uploads of one job must not pass the limit together
            used = await artifact_store.job_bytes(conn, job_id, except_path=path)
            if used + info.size > settings.artifact_job_max_bytes:
                raise _OverJobLimit(used)
            _, replaced = await artifact_store.replace_artifact(
                conn, org_id=target.org_id, run_id=target.run_id, job_id=job_id, path=path, size=info.size,
                sha256=digest.hexdigest(), content_type=content_type, blob_key=key, artifact_id=artifact_id,
            )
            await audit.record(
                conn, action="artifact.upload", outcome=AuditOutcome.ALLOWED, org_id=target.org_id, status=201,
                token_id=target.agent_token_id, method=request.method, path=request.url.path, client=client_of(request),
                actor=f"agent:{target.agent_id}", target=f"run:{target.run_id} job:{job_id} artifact:{path}",
            )
    except _Finished:
        await blobs.delete(key)
        return error_response(409, f"job {job_id!r} finished during the upload; nothing was kept")
    except _OverJobLimit as over:
        await blobs.delete(key)
        return _too_large(path, settings.artifact_max_bytes, settings.artifact_job_max_bytes, over.used)
    except IntegrityError:  # another upload of the same path committed first
        await blobs.delete(key)
        return error_response(409, f"artifact {path!r} of job {job_id!r} is being uploaded concurrently; "
                                   "nothing was kept from this upload")
    except BaseException:
        await blobs.delete(key)  # no row points at it
        raise
    if replaced is not None:
        await blobs.delete(replaced)
    log_event("artifact.uploaded", run_id=target.run_id, job_id=job_id, path=path, size=info.size)
    return JSONResponse(
        {"id": artifact_id, "run_id": target.run_id, "job_id": job_id, "path": path, "size": info.size,
         "sha256": digest.hexdigest(), "content_type": content_type},
        status_code=201,
    )


class _Finished(Exception):
    pass


class _OverJobLimit(Exception):
    def __init__(self, used: int) -> None:
        super().__init__(used)
        self.used = used


def _too_large(path: str, per_artifact: int, per_job: int, used: int) -> Response:
    return error_response(
        413,
        f"artifact {path!r} is over the limit: at most {per_artifact} bytes per artifact "
        f"(KICI_ARTIFACT_MAX_BYTES) and {per_job} bytes per job (KICI_ARTIFACT_JOB_MAX_BYTES; "
        f"{used} already uploaded); nothing was stored",
    )
