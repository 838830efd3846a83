"""Schedules (`/schedules`): the `schedule()` triggers registered from each source's default branch, with
their next and last fire times. Read-only: registrations change with the lock file, not through the API."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from kici.orchestrator.auth import ERROR_RESPONSES, AdminError, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.store import schedules as store
from kici.orchestrator.store.schedules import ScheduleListing
from kici.orchestrator.store.sources import get_source, get_source_by_name

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]


class ScheduleInfo(BaseModel):
    id: str
    source: str = Field(description="The source's name")
    source_id: str
    repo: str
    workflow: str
    trigger_index: int = Field(description="Position of the `schedule()` trigger in the workflow's triggers")
    cron: str
    timezone: str
    branch: str = Field(description="The default branch the registration was read from (runs use its head)")
    inputs: dict[str, Any]
    lock_commit: str = Field(description="The commit whose lock file registered the schedule")
    next_fire_at: dt.datetime
    last_fired_at: dt.datetime | None = Field(description="The cron slot that fired last (None: never fired)")
    last_run_id: str | None

    @classmethod
    def of(cls, record: ScheduleListing) -> ScheduleInfo:
        return cls.model_validate(record.model_dump(include=set(cls.model_fields)))


@router.get("/schedules", summary="List registered schedules")
async def list_schedules(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))],
    source: Annotated[str | None, Query(description="Only this source (name or id)")] = None,
) -> list[ScheduleInfo]:
    org_id = principal.token.org_id
    async with state.database.read() as conn:
        source_id = None
        if source is not None:
            found = await get_source(conn, source, org_id=org_id) or await get_source_by_name(conn, org_id, source)
            if found is None:
                raise AdminError(404, f"no source {source!r}")
            source_id = found.id
        listed = await store.list_schedules(conn, org_id=org_id, source_id=source_id)
    return [ScheduleInfo.of(s) for s in listed]
