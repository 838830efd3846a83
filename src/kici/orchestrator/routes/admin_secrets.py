"""Scoped secrets (`/secrets`) and key rotation (`/rotate-key`).

Write-only for values: `PUT` takes a value, nothing ever returns one — answers carry the name, scope,
fingerprint and dates. Every change writes an audit row naming the secret (never its value) in the same
transaction as the change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import ERROR_RESPONSES, AdminError, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.crypto import CryptoError
from kici.orchestrator.key_rotation import RotationResult, rotate_key
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import secrets as store
from kici.orchestrator.store.secrets import SecretError, SecretInfo

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]

SCOPE_HELP = "`org`, `repo:<owner/name>` or `env:<environment>`"


class SecretWrite(BaseModel):
    scope: str = Field(description=SCOPE_HELP)
    value: str = Field(description="The value (UTF-8, at most 64 KiB); stored encrypted, never returned")


class SecretMetadata(BaseModel):
    name: str
    scope: str
    fingerprint: str = Field(description="12 hex characters of an HMAC of the value under the secret key: "
                                         "compare two values without seeing them")
    created_at: str
    updated_at: str
    created_by: str | None = Field(description="Id of the admin token that created the secret")
    updated_by: str | None = Field(description="Id of the admin token that last set its value")
    created: bool | None = Field(default=None, description="On `PUT`: true when the secret is new")

    @classmethod
    def of(cls, info: SecretInfo, created: bool | None = None) -> SecretMetadata:
        return cls(name=info.name, scope=info.scope, fingerprint=info.fingerprint,
                   created_at=info.created_at.isoformat(), updated_at=info.updated_at.isoformat(),
                   created_by=info.created_by, updated_by=info.updated_by, created=created)


def _checked(check: Callable[[str], str], value: str, field: str) -> str:
    try:
        return check(value)
    except SecretError as exc:
        raise AdminError(422, f"invalid request: {field}: {exc}") from None


@router.get("/secrets", summary="List secrets (names, scopes, fingerprints, dates; never values)")
async def list_secrets(
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.SECRETS_READ_METADATA))],
    scope: Annotated[str | None, Query(description="Only this scope: " + SCOPE_HELP)] = None,
) -> list[SecretMetadata]:
    if scope is not None:
        _checked(store.validate_scope, scope, "scope (query)")
    async with state.database.read() as conn:
        found = await store.list_secrets(conn, org_id=principal.token.org_id, scope=scope)
    return [SecretMetadata.of(s) for s in found]


@router.put("/secrets/{name}", summary="Create or replace a secret", status_code=200,
            responses={201: {"model": SecretMetadata, "description": "Created"}})
async def put_secret(
    name: str,
    body: SecretWrite,
    request: Request,
    response: Response,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.SECRETS_WRITE))],
) -> SecretMetadata:
    _checked(store.validate_name, name, "name (path)")
    _checked(store.validate_scope, body.scope, "scope")
    if state.secret_key is None:
        raise AdminError(503, "no secret key configured on the orchestrator: secrets cannot be stored")
    org_id = principal.token.org_id
    try:
        async with state.database.transaction() as conn:
            info, created = await store.set_secret(conn, state.keyring, name=name, scope=body.scope,
                                                   value=body.value, org_id=org_id, actor=principal.token.id)
            await record_mutation(
                conn, request, principal, action="secret.set", target=f"secret:{name}@{body.scope}",
                permission=Permission.SECRETS_WRITE, status=201 if created else 200,
                reason=f"secret {name} ({body.scope}) {'created' if created else 'updated'}",
            )
    except SecretError as exc:
        raise AdminError(422, f"invalid request: value: {exc}") from None
    log_event("secret.set", name=name, scope=body.scope, created=created, by_token_id=principal.token.id)
    response.status_code = 201 if created else 200
    return SecretMetadata.of(info, created)


@router.delete("/secrets/{name}", summary="Delete a secret")
async def delete_secret(
    name: str,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.SECRETS_WRITE))],
    scope: Annotated[str, Query(description="The secret's scope: " + SCOPE_HELP)],
) -> SecretMetadata:
    _checked(store.validate_name, name, "name (path)")
    _checked(store.validate_scope, scope, "scope (query)")
    org_id = principal.token.org_id
    async with state.database.transaction() as conn:
        info = await store.delete_secret(conn, name=name, scope=scope, org_id=org_id)
        if info is None:
            raise AdminError(404, f"no secret {name} in scope {scope}")
        await record_mutation(
            conn, request, principal, action="secret.delete", target=f"secret:{name}@{scope}",
            permission=Permission.SECRETS_WRITE, reason=f"secret {name} ({scope}) deleted",
        )
    log_event("secret.deleted", name=name, scope=scope, by_token_id=principal.token.id)
    return SecretMetadata.of(info)


@router.post("/rotate-key", summary="Re-encrypt every secret and source secret under the current key")
async def post_rotate_key(
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.KEY_ROTATE))],
) -> RotationResult:
    if state.secret_key is None:
        raise AdminError(503, "no secret key configured on the orchestrator: nothing can be re-encrypted")
    try:
        result = await rotate_key(state.database, state.keyring)
    except CryptoError as exc:
        raise AdminError(503, str(exc)) from None
    async with state.database.transaction() as conn:
        await record_mutation(
            conn, request, principal, action="key.rotate", target=f"key:{result.key_id}",
            permission=Permission.KEY_ROTATE,
            reason=(f"key {result.key_id} (old {result.old_key_id or 'none'}): {result.secrets_resealed} secrets and "
                    f"{result.source_secrets_resealed} source secrets re-encrypted, {len(result.failed)} failed, "
                    f"{result.remaining} remaining"),
        )
    return result
