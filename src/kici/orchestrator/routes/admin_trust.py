"""A source's trust policy (`/sources/{id_or_name}/trust`): show it (with every default filled in) and
replace it. Only GitHub sources have one: a git or generic source's events come from the operator's own
systems and are trusted, so a PUT on one answers 422 rather than storing a policy nothing would read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from kici.engine.durations import format_duration
from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import ERROR_RESPONSES, AdminError, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.holds.policy import TrustPolicy, policy_of
from kici.orchestrator.logs import log_event
from kici.orchestrator.routes.admin_sources import _find
from kici.orchestrator.services import source_changed
from kici.orchestrator.store import sources as store
from kici.orchestrator.store.sources import Source, SourceError

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]


class TrustView(BaseModel):
    source: str
    kind: SourceKind
    applies: bool = Field(description="False for git and generic sources: their events are trusted")
    policy: TrustPolicy | None = Field(description="The policy with its defaults filled in (null: none applies)")
    hold_expiry: str | None = Field(description="The hold expiry in force (the policy's, else KICI_HOLD_EXPIRY_HOURS)")


def _view(source: Source, state: AppState) -> TrustView:
    if source.kind is not SourceKind.GITHUB:
        return TrustView(source=source.name, kind=source.kind, applies=False, policy=None, hold_expiry=None)
    policy = policy_of(source.config)
    return TrustView(source=source.name, kind=source.kind, applies=True, policy=policy,
                     hold_expiry=format_duration(policy.expiry(state.settings.hold_expiry_hours)))


@router.get("/sources/{id_or_name}/trust", summary="Show a source's trust policy")
async def show_trust(
    id_or_name: str, state: State, principal: Annotated[Principal, Depends(require(Permission.SOURCES_READ))]
) -> TrustView:
    async with state.database.read() as conn:
        found = await _find(conn, principal.token.org_id, id_or_name)
    return _view(found, state)


@router.put("/sources/{id_or_name}/trust", summary="Replace a source's trust policy (omitted fields: defaults)")
async def put_trust(
    id_or_name: str, body: TrustPolicy, request: Request, state: State,
    principal: Annotated[Principal, Depends(require(Permission.SOURCES_WRITE))],
) -> TrustView:
    org_id = principal.token.org_id
    try:
        async with state.database.transaction() as conn:
            current = await _find(conn, org_id, id_or_name)
            config = {**current.config, "trust": body.model_dump(mode="json")}
            updated = await store.update_source(conn, current.id, org_id=org_id, config=config)
            if updated is None:
                raise AdminError(404, f"no source {id_or_name!r}")
            await record_mutation(
                conn, request, principal, action="source.trust", target=f"source:{updated.name}",
                permission=Permission.SOURCES_WRITE,
                reason=f"fork_pull_requests={body.fork_pull_requests.value} "
                       f"untrusted_authors={body.untrusted_authors.value} "
                       f"secrets_for_approved={str(body.secrets_for_approved).lower()}",
            )
    except SourceError as exc:
        raise AdminError(422, str(exc)) from None
    log_event("admin.source_trust_set", source=updated.name, by_token_id=principal.token.id)
    await source_changed(request.app, updated.id)
    return _view(updated, state)
