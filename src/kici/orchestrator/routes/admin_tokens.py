"""Admin tokens (`/tokens`) and agent tokens (`/agent-tokens`): create (the plaintext is in the response,
once), list (never secrets), revoke."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, field_validator, model_validator

from kici.engine.durations import DurationError, parse_duration
from kici.engine.labels import validate_user_labels
from kici.orchestrator.agents import agent_registry
from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import (
    ERROR_RESPONSES,
    AdminError,
    AdminRoute,
    ErrorResponse,
    Permission,
    Principal,
    forbidden,
    require,
)
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.db.schema import AdminRole, utcnow
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import queue as queue_store
from kici.orchestrator.store import tokens
from kici.orchestrator.store.runs import QueueLimits
from kici.orchestrator.store.tokens import AdminToken, AgentToken

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
NAME_FIELD = Field(min_length=1, max_length=200, description="A label for people: who or what uses the token")


def _clean_name(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    return value


class Expiry(BaseModel):
    """When a new token stops working: `expires_in` (`90s`, `15m`, `24h`, `30d`) or `expires_at` (a future
    time), not both; neither: never."""

    expires_in: str | None = Field(default=None, description="A lifetime from now: a whole number and s, m, h or d")
    expires_at: dt.datetime | None = Field(default=None, description="An absolute expiry time (ISO 8601, future)")

    @field_validator("expires_in")
    @classmethod
    def _expires_in(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration(value)
            except DurationError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("expires_at")
    @classmethod
    def _expires_at(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("give a time zone (e.g. Z for UTC)")
        if value <= utcnow():
            raise ValueError("must be in the future")
        return value.astimezone(dt.UTC)

    @model_validator(mode="after")
    def _one_of(self) -> Expiry:
        if self.expires_in is not None and self.expires_at is not None:
            raise ValueError("give expires_in or expires_at, not both")
        return self

    def deadline(self) -> dt.datetime | None:
        if self.expires_in is not None:
            return utcnow() + parse_duration(self.expires_in)
        return self.expires_at


def _expiry_text(expires_at: dt.datetime | None) -> str:
    return f", expires {expires_at.isoformat()}" if expires_at is not None else ""


# -- admin tokens -----------------------------------------------------------------------------------


class AdminTokenCreate(Expiry):
    name: str = NAME_FIELD
    role: AdminRole = Field(description="owner, admin, auditor or viewer; only owners may create owner tokens")

    _name = field_validator("name")(_clean_name)


class AdminTokenInfo(BaseModel):
    id: str
    name: str
    role: AdminRole
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    expires_at: dt.datetime | None = Field(default=None, description="None: never expires")
    expired: bool = Field(default=False, description="Past `expires_at`: refused like a revoked token")

    @classmethod
    def of(cls, token: AdminToken) -> AdminTokenInfo:
        return cls(
            id=token.id,
            name=token.name,
            role=token.role,
            created_at=token.created_at,
            last_used_at=token.last_used_at,
            revoked_at=token.revoked_at,
            expires_at=token.expires_at,
            expired=token.expired,
        )


class AdminTokenCreated(AdminTokenInfo):
    token: str = Field(description="The token itself. Shown this once; only its SHA-256 is stored.")


@router.post("/tokens", status_code=201, summary="Create an admin token")
async def create_admin_token(
    body: AdminTokenCreate,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.TOKENS_WRITE))],
) -> AdminTokenCreated:
    if body.role == AdminRole.OWNER and not principal.can(Permission.TOKENS_OWNER):
        raise forbidden(request, principal, Permission.TOKENS_OWNER)
    async with state.database.transaction() as conn:
        created = await tokens.create_admin_token(conn, name=body.name, role=body.role, org_id=principal.token.org_id,
                                                   expires_at=body.deadline())
        await record_mutation(
            conn, request, principal, action="token.create", target=f"token:{created.token.id}",
            permission=Permission.TOKENS_WRITE, status=201,
            reason=(f"admin token {created.token.name!r} "
                    f"(role {body.role.value}{_expiry_text(created.token.expires_at)})"),
        )
    log_event("admin.token_created", token_id=created.token.id, role=body.role.value, by_token_id=principal.token.id)
    return AdminTokenCreated(**AdminTokenInfo.of(created.token).model_dump(), token=created.plaintext)


@router.get("/tokens", summary="List admin tokens (without secrets)")
async def list_admin_tokens(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.TOKENS_READ))],
    include_revoked: bool = False,
) -> list[AdminTokenInfo]:
    async with state.database.read() as conn:
        found = await tokens.list_admin_tokens(conn, org_id=principal.token.org_id, include_revoked=include_revoked)
    return [AdminTokenInfo.of(t) for t in found]


@router.delete(
    "/tokens/{token_id}",
    summary="Revoke an admin token",
    responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)
async def revoke_admin_token(
    token_id: str,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.TOKENS_WRITE))],
) -> AdminTokenInfo:
    org_id = principal.token.org_id
    async with state.database.transaction() as conn:
        active = await tokens.list_admin_tokens(conn, org_id=org_id)
        target = next((t for t in active if t.id == token_id), None)
        if target is None:
            raise AdminError(404, f"no active admin token with id {token_id!r}")
        if target.role == AdminRole.OWNER:
            if not principal.can(Permission.TOKENS_OWNER):
                raise forbidden(request, principal, Permission.TOKENS_OWNER)
            # an expired owner token does not count: it cannot sign in any more
            others = [t for t in active if t.role == AdminRole.OWNER and t.active and t.id != token_id]
            if target.active and not others:
                raise AdminError(
                    409, "refusing to revoke the last active owner token; create another owner token first"
                )
        if not await tokens.revoke_admin_token(conn, token_id, org_id=org_id):
            raise AdminError(404, f"no active admin token with id {token_id!r}")
        revoked = next(t for t in await tokens.list_admin_tokens(conn, org_id=org_id, include_revoked=True)
                       if t.id == token_id)
        await record_mutation(
            conn, request, principal, action="token.revoke", target=f"token:{token_id}",
            permission=Permission.TOKENS_WRITE,
            reason=f"admin token {target.name!r} (role {target.role.value}) revoked",
        )
    log_event("admin.token_revoked", token_id=token_id, role=target.role.value, by_token_id=principal.token.id)
    return AdminTokenInfo.of(revoked)


# -- agent tokens -----------------------------------------------------------------------------------


class AgentTokenCreate(Expiry):
    name: str = NAME_FIELD
    labels: list[str] = Field(
        default_factory=list, description="Labels an agent using this token may register with"
    )
    allow_root_steps: bool = Field(
        default=False,
        description="Agents using this token may run job steps as root. Without it, an agent that would run "
        "steps as root (it runs as root with no usable step user) is refused at registration.",
    )

    _name = field_validator("name")(_clean_name)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        return validate_user_labels(value)


class AgentTokenInfo(BaseModel):
    id: str
    name: str
    labels: list[str]
    allow_root_steps: bool
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None
    expires_at: dt.datetime | None = Field(default=None, description="None: never expires")
    expired: bool = Field(default=False, description="Past `expires_at`: its agents are refused at (re)connect")

    @classmethod
    def of(cls, token: AgentToken) -> AgentTokenInfo:
        return cls(
            id=token.id,
            name=token.name,
            labels=list(token.labels),
            allow_root_steps=token.allow_root_steps,
            created_at=token.created_at,
            last_used_at=token.last_used_at,
            revoked_at=token.revoked_at,
            expires_at=token.expires_at,
            expired=token.expired,
        )


class AgentTokenCreated(AgentTokenInfo):
    token: str = Field(description="The `kat_…` token. Shown this once; only its SHA-256 is stored.")


@router.post("/agent-tokens", status_code=201, summary="Create an agent token")
async def create_agent_token(
    body: AgentTokenCreate,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.AGENT_TOKENS_WRITE))],
) -> AgentTokenCreated:
    async with state.database.transaction() as conn:
        created = await tokens.create_agent_token(
            conn, name=body.name, labels=body.labels, org_id=principal.token.org_id,
            allow_root_steps=body.allow_root_steps, expires_at=body.deadline(),
        )
        await record_mutation(
            conn, request, principal, action="agent_token.create", target=f"agent_token:{created.token.id}",
            permission=Permission.AGENT_TOKENS_WRITE, status=201,
            reason=(f"agent token {created.token.name!r} (labels {','.join(body.labels) or 'none'}"
                    f"{', root steps allowed' if body.allow_root_steps else ''}"
                    f"{_expiry_text(created.token.expires_at)})"),
        )
    log_event("admin.agent_token_created", agent_token_id=created.token.id, labels=body.labels,
              allow_root_steps=body.allow_root_steps or None, by_token_id=principal.token.id)
    return AgentTokenCreated(**AgentTokenInfo.of(created.token).model_dump(), token=created.plaintext)


@router.get("/agent-tokens", summary="List agent tokens (without secrets)")
async def list_agent_tokens(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.AGENT_TOKENS_READ))],
    include_revoked: bool = False,
) -> list[AgentTokenInfo]:
    async with state.database.read() as conn:
        found = await tokens.list_agent_tokens(conn, org_id=principal.token.org_id, include_revoked=include_revoked)
    return [AgentTokenInfo.of(t) for t in found]


@router.delete("/agent-tokens/{token_id}", summary="Revoke an agent token", responses={404: {"model": ErrorResponse}})
async def revoke_agent_token(
    token_id: str,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.AGENT_TOKENS_WRITE))],
) -> AgentTokenInfo:
    org_id = principal.token.org_id
    limits = QueueLimits(state.settings.queue_max_depth, state.settings.queue_timeout_ms)
    dispatcher = services_of(request.app).dispatcher
    registry = agent_registry(request.app)
    for agent in registry.connected_agents():
        if agent.token_id == token_id:  # nothing new for them while they are being cut off
            dispatcher.retire(agent.agent_id)
    async with state.database.transaction() as conn:
        if not await tokens.revoke_agent_token(conn, token_id, org_id=org_id):
            raise AdminError(404, f"no active agent token with id {token_id!r}")
        revoked = next(t for t in await tokens.list_agent_tokens(conn, org_id=org_id, include_revoked=True)
                       if t.id == token_id)
        # in the same transaction: no agent of this token can report on its jobs any more
        agent_ids = await agent_store.agents_of_token(conn, token_id)
        requeued, failed = await queue_store.settle_revoked_agents(conn, agent_ids, limits=limits)
        await agent_store.mark_token_agents_disconnected(conn, token_id)
        await record_mutation(
            conn, request, principal, action="agent_token.revoke", target=f"agent_token:{token_id}",
            permission=Permission.AGENT_TOKENS_WRITE,
            reason=(f"agent token {revoked.name!r} revoked: {len(agent_ids)} agents cut off, "
                    f"{len(requeued)} jobs requeued, {len(failed)} failed"),
        )
    # connections to this process end now, the other nodes' through the cluster bus (and, should that
    # message be lost, at their next token re-check, `agent_token_recheck_s`)
    closed = await registry.disconnect_token(token_id, "agent token revoked")
    await services_of(request.app).bus.publish("agent-token.revoked", {"token_id": token_id}, local=False)
    dispatcher.forget([*requeued, *failed])
    dispatcher.wake()
    log_event("admin.agent_token_revoked", agent_token_id=token_id, by_token_id=principal.token.id,
              agents=agent_ids or None, disconnected=closed or None, jobs_requeued=requeued or None,
              jobs_failed=failed or None)
    return AgentTokenInfo.of(revoked)
