"""Retention on demand (`POST /prune`): what the background sweep deletes, now — or, with `dry_run`, only
counted. A real prune is audited with its counts and cutoffs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import ERROR_RESPONSES, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.retention import PruneResult, prune, prune_summary

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]


class PruneRequest(BaseModel):
    dry_run: bool = Field(default=False, description="Only count what would be deleted; delete nothing")


@router.post("/prune", summary="Delete runs, events and audit entries older than the retention settings")
async def post_prune(
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.DATA_PRUNE))],
    body: PruneRequest | None = None,
) -> PruneResult:
    dry_run = body.dry_run if body is not None else False
    result = await prune(state.database, services_of(request.app).delete_run_data, state.settings, dry_run=dry_run)
    if not dry_run:
        async with state.database.transaction() as conn:
            await record_mutation(conn, request, principal, action="data.prune", target="data:retention",
                                  permission=Permission.DATA_PRUNE, reason=prune_summary(result))
    return result
