"""The agents' cache transfer: `GET {KICI_BASE_PATH}/api/v1/agent/jobs/{job_id}/caches/{key}` (restore: the
exact key, then each `restore_key` query parameter as a prefix; 200 with the archive streamed, or 204 on a
miss) and `PUT …/caches/{key}` (save: the archive as the body; 201, or 409 when the key is already saved).

Authenticated with the agent's own token and bound to the job, like artifact uploads: the job must be
running on an agent registered with that token. Where a job reads and writes follows from its run's trust
(kici.orchestrator.caches): the agent never names a namespace or a repository, so job code cannot reach
another repository's caches, nor write the trusted namespace from an untrusted run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from starlette.requests import ClientDisconnect

from kici.orchestrator import caches
from kici.orchestrator.audit_trail import client_of
from kici.orchestrator.auth import error_response
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.db.schema import AuditOutcome, utcnow
from kici.orchestrator.logs import log_event
from kici.orchestrator.routes.agent_artifacts import AGENT_PREFIX, JobRequestRefused, running_job_of
from kici.orchestrator.storage.blobs import (
    BlobExists,
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
    BlobTooLarge,
)
from kici.orchestrator.store import audit, runs
from kici.orchestrator.store import caches as cache_store
from kici.orchestrator.store.runs import RunRecord

router = APIRouter(prefix=AGENT_PREFIX, tags=["agents"])
State = Annotated[AppState, Depends(app_state)]


async def _job_run(request: Request, state: AppState, job_id: str, action: str) -> tuple[str, RunRecord]:
    """(agent id, run) of a job running on an agent of the request's token; raises `JobRequestRefused`."""
    async with state.database.transaction() as conn:
        target = await running_job_of(conn, request, job_id, action=action, what="caches are used while it runs")
        run = await runs.get_run(conn, target.run_id)
    if run is None:  # pragma: no cover - the job's row cascades with its run
        raise JobRequestRefused(error_response(404, f"no job with id {job_id!r}"))
    assert target.agent_id is not None
    return target.agent_id, run


@router.get(
    "/jobs/{job_id}/caches/{key:path}",
    summary="Restore a cache for a running job (agent token): the archive, or 204 on a miss",
    response_class=StreamingResponse,
)
async def restore_cache(
    job_id: str, key: str, request: Request, state: State,
    restore_key: Annotated[list[str] | None, Query(description="Key prefixes to try, in order, after the key")] = None,
) -> Response:
    try:
        caches.check_key(key)
        prefixes = [caches.check_key(p, "restore key") for p in restore_key or []]
    except caches.CacheKeyError as exc:
        return error_response(400, str(exc))
    try:
        _, run = await _job_run(request, state, job_id, "cache.restore")
    except JobRequestRefused as refused:
        return refused.response
    found = await caches.lookup(state.database, run, key, prefixes)
    if found is None:
        return Response(status_code=204)
    blobs = services_of(request.app).blobs
    try:
        reader = await blobs.open(found.blob_key)
    except BlobNotFound:  # the row outlived its blob (a failed delete): forget it, report a miss
        async with state.database.transaction() as conn:
            await cache_store.delete_rows(conn, [found.id])
        log_event("cache.blob_missing", level="warning", key=found.key, blob_key=found.blob_key)
        return Response(status_code=204)
    except BlobStoreUnavailable as exc:
        log_event("cache.storage_unavailable", level="error", job_id=job_id, error=str(exc))
        return error_response(503, f"cache storage unavailable: {exc}")
    headers = {
        "Content-Length": str(reader.info.size),
        "X-Kici-Cache-Key": quote(found.key, safe=""),
        "X-Kici-Cache-Namespace": quote(found.namespace, safe=""),
        "X-Kici-Sha256": found.sha256,
    }
    log_event("cache.restored", run_id=run.id, job_id=job_id, key=found.key, namespace=found.namespace,
              exact=found.key == key, size=found.size)
    return StreamingResponse(reader.chunks(), media_type="application/gzip", headers=headers)


async def _hashed(stream: AsyncIterator[bytes], digest: hashlib._Hash) -> AsyncIterator[bytes]:
    async for chunk in stream:
        if chunk:
            digest.update(chunk)
            yield chunk


@router.put(
    "/jobs/{job_id}/caches/{key:path}",
    summary="Save a cache of a running job (agent token); 409 when the key is already saved",
    status_code=201,
)
async def save_cache(job_id: str, key: str, request: Request, state: State) -> Response:
    try:
        caches.check_key(key)
    except caches.CacheKeyError as exc:
        return error_response(400, str(exc))
    try:
        agent_id, run = await _job_run(request, state, job_id, "cache.save")
    except JobRequestRefused as refused:
        return refused.response
    settings = state.settings
    limit = settings.cache_max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _too_large(key, limit)
    scope, namespace = caches.scope_of(run), caches.namespace_of(run)
    blob_key = caches.blob_key(scope, namespace, key)
    blobs = services_of(request.app).blobs
    digest = hashlib.sha256()
    try:
        info = await blobs.put(blob_key, _hashed(request.stream(), digest), if_absent=True, max_bytes=limit)
    except BlobExists:
        return await _exists(state, blobs, scope, namespace, key, blob_key)
    except BlobTooLarge:
        return _too_large(key, limit)
    except ClientDisconnect:
        return error_response(400, "the upload ended before its body did; nothing was stored")
    except BlobStoreUnavailable as exc:
        log_event("cache.storage_unavailable", level="error", job_id=job_id, error=str(exc))
        return error_response(503, f"cache storage unavailable: {exc}")
    try:
        async with state.database.transaction() as conn:
            record = await cache_store.insert(conn, scope, namespace=namespace, key=key, blob_key=blob_key,
                                              size=info.size, sha256=digest.hexdigest(), run_id=run.id)
            await audit.record(
                conn, action="cache.save", outcome=AuditOutcome.ALLOWED, org_id=run.org_id, status=201,
                method=request.method, path=request.url.path, client=client_of(request), actor=f"agent:{agent_id}",
                target=f"repo:{run.repo} cache:{namespace}:{key[:200]} run:{run.id} job:{job_id}",
            )
    except IntegrityError:  # a row for the key appeared meanwhile: the blob is that row's, keep it
        return _conflict(key, namespace)
    except BaseException:
        await blobs.delete(blob_key)  # no row points at it
        raise
    evicted = await caches.enforce_quota(state.database, blobs, scope, settings.cache_repo_max_bytes, keep=record.id)
    log_event("cache.saved", run_id=run.id, job_id=job_id, key=key, namespace=namespace, size=info.size,
              evicted=len(evicted))
    return JSONResponse(
        {"key": key, "namespace": namespace, "size": info.size, "sha256": record.sha256,
         "evicted": [e.key for e in evicted]},
        status_code=201,
    )


async def _exists(state: AppState, blobs: BlobStore, scope: cache_store.CacheScope, namespace: str,
                  key: str, blob_key: str) -> Response:
    """A put lost to an existing blob: another saver of the key won (409), or a leftover without a row is
    removed so the next save stores the key (also 409: this body is gone)."""
    async with state.database.read() as conn:
        row = await cache_store.find_exact(conn, scope, namespace, key)
    if row is None:
        try:
            info = await blobs.stat(blob_key)
        except (BlobNotFound, BlobStoreUnavailable):
            info = None
        modified = info.modified if info is not None else None
        if modified is not None and utcnow() - modified.astimezone(dt.UTC) > caches.ORPHAN_AGE:
            await blobs.delete(blob_key)
            log_event("cache.orphan_removed", key=key, blob_key=blob_key)
    return _conflict(key, namespace)


def _conflict(key: str, namespace: str) -> Response:
    return JSONResponse(
        {"error": f"cache {key!r} is already saved (in {namespace}); keys are immutable, the first saver wins",
         "exists": True},
        status_code=409,
    )


def _too_large(key: str, limit: int) -> Response:
    return error_response(
        413, f"cache {key!r} is over the limit of {limit} bytes (KICI_CACHE_MAX_BYTES); nothing was stored"
    )
