"""Held runs and gated jobs (`/held`): list what waits for a decision, approve or reject a run.

The routes go through the held service (`kici.orchestrator.holds.service`), which hands the decision to
every gate kind in one transaction and writes the audit rows (`held.approve` / `held.reject`, actor
`token:<id>`). 404: no such run; 409: the run has nothing pending (not held, or decided already); 403: every
gate pending on it refused this approver.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, Field

from kici.orchestrator.audit_trail import client_of, token_actor
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
from kici.orchestrator.holds.gates import Approver, PendingGate
from kici.orchestrator.holds.service import AuditContext, DecisionRefused, HeldRunNotFound, NotHeld

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
_DECISION_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "No such run"},
    409: {"model": ErrorResponse, "description": "The run is not held, or was decided already"},
}


class RejectBody(BaseModel):
    reason: str | None = Field(default=None, max_length=2000, description="Why (recorded on the run and audit row)")


class DecisionResult(BaseModel):
    run_id: str
    action: str = Field(description="`approve` or `reject`")
    gates: list[dict[str, Any]] = Field(description="What each gate kind did (`kind`, `decided`, `recorded`, …)")
    released_job_ids: list[str] = Field(description="Jobs the approval queued")


def _context(request: Request, principal: Principal, permission: Permission) -> AuditContext:
    return AuditContext(principal.token.org_id, {
        "token_id": principal.token.id, "role": principal.role.value, "permission": permission.value,
        "method": request.method, "path": request.url.path, "client": client_of(request),
        "actor": token_actor(principal), "status": 200,
    })


def _approver(principal: Principal) -> Approver:
    return Approver(kind="token", name=principal.token.id, role=principal.role.value)


@router.get("/held", summary="List held runs and gated jobs waiting for a decision")
async def list_held(
    request: Request, principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))]
) -> list[PendingGate]:
    return await services_of(request.app).held.list(org_id=principal.token.org_id)


async def _decide(request: Request, principal: Principal, run_id: str, *, reason: str | None,
                  reject: bool) -> DecisionResult:
    held = services_of(request.app).held
    ctx = _context(request, principal, Permission.APPROVALS_WRITE)
    try:
        if reject:
            decision = await held.reject(run_id, _approver(principal), ctx, reason)
        else:
            decision = await held.approve(run_id, _approver(principal), ctx)
    except HeldRunNotFound:
        raise AdminError(404, f"no run {run_id!r}") from None
    except NotHeld as exc:
        raise AdminError(409, str(exc)) from None
    except DecisionRefused as exc:
        raise AdminError(403, str(exc)) from None
    return DecisionResult.model_validate(decision.as_json())


@router.post("/held/{run_id}/approve", summary="Approve a held run (at exactly its commit)",
             responses=_DECISION_ERRORS)
async def approve_held(
    run_id: str, request: Request, state: State,
    principal: Annotated[Principal, Depends(require(Permission.APPROVALS_WRITE))],
) -> DecisionResult:
    del state
    return await _decide(request, principal, run_id, reason=None, reject=False)


@router.post("/held/{run_id}/reject", summary="Reject a held run (it is cancelled with the reason)",
             responses=_DECISION_ERRORS)
async def reject_held(
    run_id: str, request: Request, state: State,
    principal: Annotated[Principal, Depends(require(Permission.APPROVALS_WRITE))],
    body: Annotated[RejectBody | None, Body()] = None,
) -> DecisionResult:
    del state
    reason = body.reason.strip() if body is not None and body.reason and body.reason.strip() else None
    return await _decide(request, principal, run_id, reason=reason, reject=True)
