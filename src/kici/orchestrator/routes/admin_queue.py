"""The dispatch queue (`/queue`): its active rows — pending, dispatched, recovering — oldest first, which is
the order agents claim them in. Rows that left the queue (completed, failed, expired) are the jobs' history
and are read through `/runs/{id}/jobs` instead."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from kici.orchestrator.auth import ERROR_RESPONSES, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.schema import QueueStatus, utcnow
from kici.orchestrator.store import queue
from kici.orchestrator.store.queue import QueueRecord

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
MAX_LIMIT = 500
ACTIVE = (QueueStatus.PENDING.value, QueueStatus.DISPATCHED.value, QueueStatus.RECOVERING.value)


def _seconds_since(then: dt.datetime | None, now: dt.datetime) -> float | None:
    return None if then is None else round(max(0.0, (now - then).total_seconds()), 3)


class QueueEntry(BaseModel):
    id: str
    job_id: str
    run_id: str
    job_name: str = Field(description="The job's name in its run (lock file job name plus any matrix suffix)")
    workflow: str
    repo: str
    status: Literal["pending", "dispatched", "recovering"]
    agent: str | None = Field(description="Id of the agent holding the job; null while pending")
    attempts: int = Field(description="Times the job was handed to an agent (0 while never dispatched)")
    runs_on_labels: list[str] = Field(description="The exact labels the job asks for (regex matchers not shown)")
    exclude_labels: list[str]
    created_at: dt.datetime = Field(description="When the job entered the queue")
    dispatched_at: dt.datetime | None
    expires_at: dt.datetime | None = Field(description="Queue timeout: a pending job still here then fails")
    ack_deadline: dt.datetime | None = Field(description="The agent must acknowledge the dispatch by then")
    recovery_deadline: dt.datetime | None = Field(description="A recovering job fails if its agent is not back")
    age_seconds: float = Field(description="Seconds since the job entered the queue")
    dispatched_seconds: float | None = Field(description="Seconds since the current dispatch; null while pending")

    @classmethod
    def of(cls, row: QueueRecord, now: dt.datetime) -> QueueEntry:
        return cls(
            id=row.id,
            job_id=row.job_id,
            run_id=row.run_id,
            job_name=row.job_name,
            workflow=row.workflow,
            repo=row.repo,
            status=row.status,  # validated: only active rows are selected
            agent=row.agent_id,
            attempts=row.dispatch_attempts,
            runs_on_labels=row.runs_on_labels,
            exclude_labels=row.exclude_labels,
            created_at=row.created_at,
            dispatched_at=row.dispatched_at,
            expires_at=row.expires_at,
            ack_deadline=row.ack_deadline,
            recovery_deadline=row.recovery_deadline,
            age_seconds=_seconds_since(row.created_at, now) or 0.0,
            dispatched_seconds=_seconds_since(row.dispatched_at, now),
        )


@router.get("/queue", summary="The active dispatch queue, oldest first")
async def list_queue(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.QUEUE_READ))],
    status: Annotated[
        Literal["pending", "dispatched", "recovering"] | None, Query(description="Only rows with this status")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[QueueEntry]:
    async with state.database.read() as conn:
        rows = await queue.list_queue(
            conn, org_id=principal.token.org_id, limit=limit, statuses=(status,) if status else ACTIVE
        )
    now = utcnow()
    return [QueueEntry.of(row, now) for row in rows]
