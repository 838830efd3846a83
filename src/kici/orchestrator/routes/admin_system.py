"""`/whoami` (the caller's token, role and permissions) and `/db/migrate` (schema status and upgrade)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import (
    ERROR_RESPONSES,
    AdminError,
    AdminRoute,
    Authenticated,
    ErrorResponse,
    Permission,
    Principal,
    require,
)
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.migrate import MigrationError, migrate, migration_status
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.logs import log_event

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]

_migrate_lock = asyncio.Lock()
"""Alembic keeps its context in module globals: one migration at a time in this process (other processes
are excluded by the database lock `migrate()` takes)."""


class WhoAmI(BaseModel):
    id: str
    name: str
    role: AdminRole
    org_id: str
    permissions: list[str] = Field(description="Permissions of the token's role, sorted")


@router.get("/whoami", summary="The calling token: name, role and permissions")
async def whoami(principal: Authenticated) -> WhoAmI:
    token = principal.token
    return WhoAmI(
        id=token.id,
        name=token.name,
        role=token.role,
        org_id=token.org_id,
        permissions=sorted(p.value for p in principal.permissions),
    )


class MigrationStatusResponse(BaseModel):
    current: str | None = Field(description="Revision the database is at; null for an empty database")
    head: str = Field(description="Latest revision this orchestrator knows")
    pending: list[str]
    up_to_date: bool


class MigrationApplied(BaseModel):
    before: str | None
    after: str
    applied: list[str] = Field(description="Revisions applied by this call, oldest first; empty if none")


@router.get("/db/migrate", summary="Schema migration status", responses={409: {"model": ErrorResponse}})
async def db_migration_status(
    state: State, _: Annotated[Principal, Depends(require(Permission.DB_READ))]
) -> MigrationStatusResponse:
    try:
        status = await migration_status(state.database)
    except MigrationError as exc:
        raise AdminError(409, str(exc)) from None
    return MigrationStatusResponse(
        current=status.current, head=status.head, pending=list(status.pending), up_to_date=status.up_to_date
    )


@router.post("/db/migrate", summary="Apply pending schema migrations", responses={409: {"model": ErrorResponse}})
async def db_migrate(
    request: Request, state: State, principal: Annotated[Principal, Depends(require(Permission.DB_MIGRATE))]
) -> MigrationApplied:
    async with _migrate_lock:
        try:
            result = await migrate(state.database)
        except MigrationError as exc:
            raise AdminError(409, str(exc)) from None
    # after the migration (which commits on its own): the row records that it was asked for and what it did
    async with state.database.transaction() as conn:
        await record_mutation(
            conn, request, principal, action="db.migrate", target=f"schema:{result.after}",
            permission=Permission.DB_MIGRATE,
            reason=(f"schema {result.before or 'empty'} -> {result.after}; "
                    f"applied {', '.join(result.applied) or 'none'}"),
        )
    log_event("admin.db_migrate", applied=list(result.applied), after=result.after, by_token_id=principal.token.id)
    return MigrationApplied(before=result.before, after=result.after, applied=list(result.applied))
