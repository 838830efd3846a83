"""Job caches: list them (`caches:read`) and purge a repository's (`caches:write`, audited)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import ERROR_RESPONSES, AdminError, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.logs import log_event
from kici.orchestrator.storage.blobs import BlobStoreUnavailable
from kici.orchestrator.store import caches as cache_store
from kici.orchestrator.store.caches import CacheRecord

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)
State = Annotated[AppState, Depends(app_state)]
MAX_LIST = 1000


class CacheInfo(BaseModel):
    id: str
    repo: str = Field(description="The repository (owner/name) whose runs saved it")
    source_id: str = Field(description="The run's source (empty for runs without one)")
    namespace: str = Field(description="`trusted`, or `untrusted:<ref>` for held-then-approved runs")
    key: str
    size: int = Field(description="Bytes of the compressed archive")
    sha256: str
    run_id: str | None = Field(description="The run that saved it")
    created_at: dt.datetime
    last_used_at: dt.datetime = Field(description="Last restore (or the save); eviction goes by it")

    @classmethod
    def of(cls, record: CacheRecord) -> CacheInfo:
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


class PurgeResult(BaseModel):
    repo: str
    key_prefix: str | None
    deleted: int
    bytes: int


@router.get("/caches", summary="List job caches (by repository and key prefix)")
async def list_caches(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.CACHES_READ))],
    repo: Annotated[str | None, Query(description="Only this repository (owner/name)")] = None,
    key_prefix: Annotated[str | None, Query(description="Only keys starting with this")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
) -> list[CacheInfo]:
    async with state.database.read() as conn:
        found = await cache_store.list_caches(conn, org_id=principal.token.org_id, repo=repo,
                                              key_prefix=key_prefix, limit=limit)
    return [CacheInfo.of(record) for record in found]


@router.delete("/caches", summary="Purge a repository's caches (optionally only keys with a prefix)")
async def purge_caches(
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.CACHES_WRITE))],
    repo: Annotated[str, Query(description="The repository (owner/name) whose caches go")],
    key_prefix: Annotated[str | None, Query(description="Only keys starting with this")] = None,
) -> PurgeResult:
    if not repo.strip():
        raise AdminError(400, "repo must name a repository (owner/name)")
    async with state.database.transaction() as conn:
        found = await cache_store.list_caches(conn, org_id=principal.token.org_id, repo=repo, key_prefix=key_prefix)
        deleted = await cache_store.delete_rows(conn, [r.id for r in found])
        what = f"repo:{repo}" + (f" key-prefix:{key_prefix}" if key_prefix else "")
        await record_mutation(
            conn, request, principal, action="cache.purge", target=f"caches:{what}",
            permission=Permission.CACHES_WRITE, reason=f"{deleted} cache(s) purged",
        )
    blobs = services_of(request.app).blobs
    for record in found:
        try:
            await blobs.delete(record.blob_key)
        except BlobStoreUnavailable as exc:  # the rows are gone; a later save replaces the leftover
            log_event("cache.blob_delete_failed", level="warning", key=record.blob_key, error=str(exc))
    log_event("cache.purged", repo=repo, key_prefix=key_prefix, deleted=deleted, by_token_id=principal.token.id)
    return PurgeResult(repo=repo, key_prefix=key_prefix, deleted=deleted, bytes=sum(r.size for r in found))
