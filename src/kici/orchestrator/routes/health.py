"""Liveness (`/health`), readiness (`/ready`) and Prometheus metrics (`/metrics`).

`/health` never touches the database: it answers "is the process alive", so a supervisor does not restart
a healthy orchestrator because PostgreSQL blinked. `/ready` answers "can it do work now" and is what a
load balancer should route on.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.database import DatabaseUnavailable
from kici.orchestrator.logs import log_event
from kici.orchestrator.metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["health"])

State = Annotated[AppState, Depends(app_state)]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    timestamp: dt.datetime
    uptime_s: float
    version: str


class ReadyResponse(BaseModel):
    status: Literal["ready", "starting", "unavailable"]
    reason: str | None = None


@router.get("/health")
async def health(state: State) -> HealthResponse:
    return HealthResponse(
        timestamp=dt.datetime.now(dt.UTC),
        uptime_s=round(time.monotonic() - state.started_monotonic, 3),
        version=state.version,
    )


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def ready(state: State) -> JSONResponse:
    if not state.readiness.prepared:
        state.metrics.ready.set(0)
        body = ReadyResponse(status="starting", reason=state.readiness.reason)
        return JSONResponse(body.model_dump(), status_code=503)
    try:
        await state.database.ping()
    except DatabaseUnavailable as exc:
        state.metrics.ready.set(0)
        if state.readiness.last_failure != str(exc):  # probes poll often: log changes, not every probe
            state.readiness.last_failure = str(exc)
            log_event("ready.database_unreachable", level="warning", reason=str(exc))
        body = ReadyResponse(status="unavailable", reason=f"database unreachable: {exc}")
        return JSONResponse(body.model_dump(), status_code=503)
    if state.readiness.last_failure is not None:
        state.readiness.last_failure = None
        log_event("ready.database_reachable")
    state.metrics.ready.set(1)
    return JSONResponse(ReadyResponse(status="ready").model_dump())


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
