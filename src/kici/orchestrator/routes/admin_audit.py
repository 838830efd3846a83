"""The audit log (`/audit`): denied admin requests, newest first."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from kici.orchestrator.app import AppState, app_state
from kici.orchestrator.auth import ERROR_RESPONSES, AdminRoute, Permission, Principal, require
from kici.orchestrator.store import audit
from kici.orchestrator.store.audit import AuditRecord

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]


@router.get("/audit", summary="List audit entries (denied admin requests), newest first")
async def list_audit(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.AUDIT_READ))],
    outcome: Literal["denied", "allowed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditRecord]:
    async with state.database.read() as conn:
        found = await audit.list_audit(conn, org_id=principal.token.org_id, outcome=outcome, limit=limit)
    return found
