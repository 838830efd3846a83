"""Deployment environments (`/environments`): which refs may deploy, who approves, the wait timer and
plain variables. An environment's secrets are ordinary scoped secrets (`PUT /secrets/{name}` with scope
`env:<environment>`); `GET /environments/{name}` lists their names. Every change writes an audit row in the
same transaction as the change."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import ERROR_RESPONSES, AdminError, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import environments as store
from kici.orchestrator.store import secrets as secret_store
from kici.orchestrator.store.environments import Environment, EnvironmentError, EnvironmentPolicy

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]

_ROLES_HELP = ("Who may approve: admin-token roles (`owner`, `admin`, …) and GitHub author associations "
               "(`OWNER`, `MEMBER`, `COLLABORATOR`, …). Empty with no `reviewer_users`: owner and admin tokens, "
               "GitHub OWNER and MEMBER")


class EnvironmentFields(BaseModel):
    """The policy fields; on `PUT` only those given are replaced."""

    model_config = ConfigDict(extra="forbid")

    branches: list[str] | None = Field(default=None, description="Branch globs allowed to deploy")
    tags: list[str] | None = Field(default=None, description="Tag globs allowed to deploy. No branch and no "
                                                             "tag glob: every ref may deploy")
    required_approvals: int | None = Field(default=None, description="Approvals a deployment needs (0: none)")
    reviewer_roles: list[str] | None = Field(default=None, description=_ROLES_HELP)
    reviewer_users: list[str] | None = Field(default=None, description="Named reviewers: `token:<id>` or "
                                                                       "`github:<login>`")
    prevent_self_review: bool | None = Field(default=None, description="The run's author may not approve it")
    wait_timer_s: int | None = Field(default=None, description="Seconds to wait after approval before deploying")
    variables: dict[str, str] | None = Field(default=None, description="Plain (not secret) variables put in the "
                                                                       "environment of the environment's jobs")

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class EnvironmentCreate(EnvironmentFields):
    name: str = Field(description="1-100 letters, digits, `_`, `.` or `-`")


class EnvironmentOut(BaseModel):
    name: str
    branches: list[str]
    tags: list[str]
    required_approvals: int
    reviewer_roles: list[str]
    reviewer_users: list[str]
    reviewers: list[str] = Field(description="The reviewer rule in effect (the default roles when none is set)")
    prevent_self_review: bool
    wait_timer_s: int
    variables: dict[str, str]
    secrets: list[str] = Field(description="Names of the secrets in scope `env:<name>` (never values)")
    pending: int = Field(description="Jobs waiting at this environment's gate (approvals or wait timer)")
    created_at: str
    updated_at: str
    created_by: str | None
    updated_by: str | None

    @classmethod
    def of(cls, env: Environment, secrets: list[str], pending: int) -> EnvironmentOut:
        return cls(
            name=env.name, branches=env.branches, tags=env.tags, required_approvals=env.required_approvals,
            reviewer_roles=env.reviewer_roles, reviewer_users=env.reviewer_users, reviewers=env.reviewers,
            prevent_self_review=env.prevent_self_review, wait_timer_s=env.wait_timer_s, variables=env.variables,
            secrets=secrets, pending=pending, created_at=env.created_at.isoformat(),
            updated_at=env.updated_at.isoformat(), created_by=env.created_by, updated_by=env.updated_by,
        )


async def _out(conn: Any, env: Environment) -> EnvironmentOut:
    secrets = await secret_store.list_secrets(conn, org_id=env.org_id, scope=f"env:{env.name}")
    pending = await store.pending_count(conn, env.name, org_id=env.org_id)
    return EnvironmentOut.of(env, sorted(s.name for s in secrets), pending)


def _name(name: str) -> str:
    try:
        return store.validate_name(name)
    except EnvironmentError as exc:
        raise AdminError(422, f"invalid request: name: {exc}") from None


def _summary(env: Environment) -> str:
    refs = ", ".join([*(f"branch {b}" for b in env.branches), *(f"tag {t}" for t in env.tags)]) or "any ref"
    return (f"environment {env.name}: {refs}; {env.required_approvals} approval(s) from {', '.join(env.reviewers)}; "
            f"wait timer {env.wait_timer_s}s; variables {', '.join(sorted(env.variables)) or 'none'}")


@router.get("/environments", summary="List deployment environments")
async def list_environments(
    state: State, principal: Annotated[Principal, Depends(require(Permission.ENVIRONMENTS_READ))]
) -> list[EnvironmentOut]:
    async with state.database.read() as conn:
        return [await _out(conn, env) for env in await store.list_environments(conn, org_id=principal.token.org_id)]


@router.post("/environments", summary="Create a deployment environment", status_code=201,
             responses={409: {"description": "An environment of that name exists"}})
async def create_environment(
    body: EnvironmentCreate,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.ENVIRONMENTS_WRITE))],
) -> EnvironmentOut:
    name = _name(body.name)
    fields = body.given()
    fields.pop("name", None)
    try:
        policy = store.validate_policy(EnvironmentPolicy(**fields))
    except EnvironmentError as exc:
        raise AdminError(422, f"invalid request: {exc}") from None
    async with state.database.transaction() as conn:
        env = await store.create_environment(conn, name, policy, org_id=principal.token.org_id,
                                             actor=principal.token.id)
        if env is None:
            raise AdminError(409, f"environment {name} exists already; change it with PUT /environments/{name}")
        await record_mutation(conn, request, principal, action="environment.create", target=f"environment:{name}",
                              permission=Permission.ENVIRONMENTS_WRITE, status=201, reason=_summary(env))
        out = await _out(conn, env)
    log_event("environment.created", name=name, by_token_id=principal.token.id)
    return out


@router.get("/environments/{name}", summary="Show a deployment environment")
async def get_environment(
    name: str, state: State, principal: Annotated[Principal, Depends(require(Permission.ENVIRONMENTS_READ))]
) -> EnvironmentOut:
    name = _name(name)
    async with state.database.read() as conn:
        env = await store.get_environment(conn, name, org_id=principal.token.org_id)
        if env is None:
            raise AdminError(404, f"no environment {name}")
        return await _out(conn, env)


@router.put("/environments/{name}", summary="Change a deployment environment's policy (fields given replace)")
async def put_environment(
    name: str,
    body: EnvironmentFields,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.ENVIRONMENTS_WRITE))],
) -> EnvironmentOut:
    name = _name(name)
    changes = body.given()
    if not changes:
        raise AdminError(422, "invalid request: nothing to change (give at least one field)")
    try:
        async with state.database.transaction() as conn:
            env = await store.update_environment(conn, name, changes, org_id=principal.token.org_id,
                                                 actor=principal.token.id)
            if env is None:
                raise AdminError(404, f"no environment {name}")
            await record_mutation(conn, request, principal, action="environment.update",
                                  target=f"environment:{name}", permission=Permission.ENVIRONMENTS_WRITE,
                                  reason=f"changed {', '.join(sorted(changes))}; now {_summary(env)}")
            out = await _out(conn, env)
    except EnvironmentError as exc:
        raise AdminError(422, f"invalid request: {exc}") from None
    log_event("environment.updated", name=name, fields=sorted(changes), by_token_id=principal.token.id)
    return out


@router.delete("/environments/{name}", summary="Delete a deployment environment",
               responses={409: {"description": "Jobs are waiting at the environment's gate"}})
async def delete_environment(
    name: str,
    request: Request,
    response: Response,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.ENVIRONMENTS_WRITE))],
) -> EnvironmentOut:
    name = _name(name)
    org_id = principal.token.org_id
    async with state.database.transaction() as conn:
        env = await store.get_environment(conn, name, org_id=org_id)
        if env is None:
            raise AdminError(404, f"no environment {name}")
        out = await _out(conn, env)
        if out.pending:
            raise AdminError(409, f"environment {name} has {out.pending} job(s) waiting at its gate; approve, reject "
                                  "or cancel them first (kici-admin held list)")
        await store.delete_environment(conn, name, org_id=org_id)
        await record_mutation(conn, request, principal, action="environment.delete", target=f"environment:{name}",
                              permission=Permission.ENVIRONMENTS_WRITE, reason=f"environment {name} deleted")
    log_event("environment.deleted", name=name, by_token_id=principal.token.id)
    return out
