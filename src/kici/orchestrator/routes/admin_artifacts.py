"""A run's artifacts: list them and download one (streamed from the blob store). `runs:read`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from kici.orchestrator.auth import (
    ERROR_RESPONSES,
    AdminError,
    AdminRoute,
    ErrorResponse,
    Permission,
    Principal,
    require,
)
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.storage.blobs import BlobNotFound, BlobStoreUnavailable
from kici.orchestrator.store import artifacts as artifact_store
from kici.orchestrator.store import runs
from kici.orchestrator.store.artifacts import ArtifactRecord

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)
State = Annotated[AppState, Depends(app_state)]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such run or artifact"}}


class ArtifactInfo(BaseModel):
    id: str
    run_id: str
    job_id: str
    job: str = Field(description="The job's name in the run (matrix suffix included)")
    path: str = Field(description="The file's path relative to the job's workspace")
    size: int
    sha256: str
    content_type: str
    created_at: dt.datetime

    @classmethod
    def of(cls, record: ArtifactRecord) -> ArtifactInfo:
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


async def _check_run(state: AppState, principal: Principal, run_id: str) -> None:
    async with state.database.read() as conn:
        run = await runs.get_run(conn, run_id)
    if run is None or run.org_id != principal.token.org_id:
        raise AdminError(404, f"no run with id {run_id!r}")


@router.get("/runs/{run_id}/artifacts", summary="List a run's artifacts", responses=_NOT_FOUND)
async def list_artifacts(
    run_id: str, state: State, principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))]
) -> list[ArtifactInfo]:
    await _check_run(state, principal, run_id)
    async with state.database.read() as conn:
        found = await artifact_store.list_run_artifacts(conn, run_id, org_id=principal.token.org_id)
    return [ArtifactInfo.of(record) for record in found]


@router.get(
    "/runs/{run_id}/artifacts/{artifact_id}",
    summary="Download an artifact (streamed; `X-Kici-Sha256` carries its SHA-256)",
    responses={**_NOT_FOUND, 200: {"content": {"application/octet-stream": {}}},
               503: {"model": ErrorResponse, "description": "Artifact storage unavailable"}},
    response_class=StreamingResponse,
)
async def download_artifact(
    run_id: str, artifact_id: str, request: Request, state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))],
) -> StreamingResponse:
    async with state.database.read() as conn:
        record = await artifact_store.get_artifact(conn, run_id, artifact_id, org_id=principal.token.org_id)
    if record is None:
        raise AdminError(404, f"no artifact {artifact_id!r} in run {run_id!r}")
    try:
        reader = await services_of(request.app).blobs.open(record.blob_key)
    except BlobNotFound:
        raise AdminError(404, f"the content of artifact {artifact_id!r} is missing from storage") from None
    except BlobStoreUnavailable as exc:
        raise AdminError(503, f"artifact storage unavailable: {exc}") from None
    name = record.path.rsplit("/", 1)[-1]
    headers = {
        "Content-Length": str(reader.info.size),
        "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
        "X-Kici-Sha256": record.sha256,
        "X-Kici-Artifact-Path": quote(record.path),
    }
    return StreamingResponse(reader.chunks(), media_type=record.content_type, headers=headers)
