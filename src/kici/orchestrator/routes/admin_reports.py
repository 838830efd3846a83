"""Reports (`/reports`): the reporting outbox — GitHub check-run updates and notifications — pending,
sent or failed, newest first; and `POST /reports/{id}/retry` for one that was given up on."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from kici.orchestrator.audit_trail import record_mutation
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
from kici.orchestrator.db.schema import ReportStatus
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import outbox
from kici.orchestrator.store.outbox import ReportRecord

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
MAX_LIMIT = 1000


class ReportInfo(BaseModel):
    id: int
    kind: Literal["check_run", "notification"]
    event: str = Field(description="check runs: queued, in_progress, completed; notifications: run.finished, "
                       "job.finished")
    status: Literal["pending", "sent", "failed"]
    run_id: str
    job_id: str | None
    target: str | None = Field(description="A notification's URL (null for check runs)")
    delivery_id: str = Field(description="Sent to notification receivers as X-KiCI-Delivery")
    attempts: int = Field(description="Failed delivery attempts so far")
    next_attempt_at: dt.datetime = Field(description="When a pending report is due (again)")
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None

    @classmethod
    def of(cls, row: ReportRecord) -> ReportInfo:
        return cls.model_validate(row.model_dump(include=set(cls.model_fields)))


@router.get("/reports", summary="List reports (check runs, notifications), newest first")
async def list_reports(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.REPORTS_READ))],
    status: Annotated[Literal["pending", "sent", "failed"] | None, Query(description="Only this status")] = None,
    run_id: Annotated[str | None, Query(description="Only this run's reports")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[ReportInfo]:
    async with state.database.read() as conn:
        rows = await outbox.list_reports(conn, org_id=principal.token.org_id, status=status, run_id=run_id,
                                         limit=limit)
    return [ReportInfo.of(r) for r in rows]


_RETRY_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such report"},
    409: {"model": ErrorResponse, "description": "The report has not failed"},
}


@router.post("/reports/{report_id}/retry", summary="Send a failed report again", responses=_RETRY_RESPONSES)
async def retry_report(
    report_id: int,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.REPORTS_RETRY))],
) -> ReportInfo:
    async with state.database.transaction() as conn:
        found = await outbox.get_report(conn, report_id)
        if found is None or found.org_id != principal.token.org_id:
            raise AdminError(404, f"no report with id {report_id}")
        if not await outbox.retry_report(conn, report_id):
            raise AdminError(409, f"report {report_id} is {found.status}, not {ReportStatus.FAILED.value}; "
                                  "only a failed report can be retried")
        await record_mutation(
            conn, request, principal, action="report.retry", target=f"report:{report_id}",
            permission=Permission.REPORTS_RETRY, reason=f"report {report_id}",
        )
        retried = await outbox.get_report(conn, report_id)
    assert retried is not None
    log_event("report.retry", report_id=report_id, by_token_id=principal.token.id)
    services_of(request.app).reporter.wake()
    return ReportInfo.of(retried)
