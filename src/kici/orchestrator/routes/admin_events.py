"""The webhook event log (`/events`): one row per delivery received — what it was, and what became of it
(processed into runs, a duplicate, filtered out, no lock file, …). Addressed by delivery id, the id the
provider gave the delivery (e.g. GitHub's `X-GitHub-Delivery`)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
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
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.schema import EventLogStatus
from kici.orchestrator.store import events
from kici.orchestrator.store.events import EventLogEntry

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
Reader = Annotated[Principal, Depends(require(Permission.EVENTS_READ))]
MAX_LIMIT = 500
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such delivery"}}


class EventInfo(BaseModel):
    id: str
    delivery_id: str
    source_id: str | None = Field(description="The source it came in through (it may have been removed since)")
    provider: str
    event: str | None
    action: str | None
    repo: str | None
    ref: str | None
    sha: str | None
    status: EventLogStatus
    reason: str | None = Field(description="Why it was filtered, refused or failed")
    matched_count: int = Field(description="Workflows the event matched")
    created_at: dt.datetime = Field(description="When the delivery was received")
    processed_at: dt.datetime | None

    @classmethod
    def of(cls, entry: EventLogEntry) -> EventInfo:
        return cls.model_validate(entry.model_dump(include=set(cls.model_fields)))


class EventDetail(EventInfo):
    run_ids: list[str] = Field(description="Runs started by this delivery, oldest first")


@router.get("/events", summary="The webhook event log, newest first")
async def list_events(
    state: State,
    principal: Reader,
    status: Annotated[EventLogStatus | None, Query(description="Only deliveries with this outcome")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> list[EventInfo]:
    async with state.database.read() as conn:
        found = await events.list_event_log(conn, org_id=principal.token.org_id, limit=limit, status=status)
    return [EventInfo.of(e) for e in found]


@router.get("/events/{delivery_id}", summary="Show a delivery and the runs it started", responses=_NOT_FOUND)
async def show_event(delivery_id: str, state: State, principal: Reader) -> EventDetail:
    org_id = principal.token.org_id
    async with state.database.read() as conn:
        entry = await events.get_event_log(conn, delivery_id, org_id=org_id)
        if entry is None:
            raise AdminError(404, f"no delivery with id {delivery_id!r}")
        run_ids = await events.run_ids_of_delivery(conn, delivery_id, org_id=org_id)
    return EventDetail(**EventInfo.of(entry).model_dump(), run_ids=run_ids)
