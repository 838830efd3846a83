"""Admin API authentication and authorization: bearer admin tokens, roles, permissions, and the uniform
`{"error": message}` shape of every admin response that is not a success.

Every admin route declares what it needs with `Depends(require(Permission.X))` (or `authenticated` for
routes any valid token may call). Each denial — no token, an unknown or revoked token, a role without the
permission — is logged as an `admin.denied` event with the token id, role, permission, method and path, and
written to the `audit_log` table (`_record_denial` decides both; `AdminRoute` writes the row).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.schema import DEFAULT_ORG_ID, AdminRole, AuditOutcome, utcnow
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import audit, tokens
from kici.orchestrator.store.tokens import AdminToken

TOUCH_INTERVAL = dt.timedelta(seconds=60)
"""`last_used_at` is written at most once a minute per token, so read-only requests stay read-only."""


class Permission(StrEnum):
    """What an admin token may do. Names are `resource:action`."""

    TOKENS_READ = "tokens:read"
    """List admin tokens (never their secrets)."""
    TOKENS_WRITE = "tokens:write"
    """Create and revoke admin and auditor tokens."""
    TOKENS_OWNER = "tokens:owner"
    """Create and revoke owner tokens."""
    AGENT_TOKENS_READ = "agent-tokens:read"
    AGENT_TOKENS_WRITE = "agent-tokens:write"
    DB_READ = "db:read"
    DB_MIGRATE = "db:migrate"
    RUNS_READ = "runs:read"
    RUNS_CANCEL = "runs:cancel"
    RUNS_RERUN = "runs:rerun"
    RUNS_WRITE = "runs:write"
    """Start a run by hand (`POST /runs`, a workflow's `dispatch()` trigger)."""
    QUEUE_READ = "queue:read"
    AGENTS_READ = "agents:read"
    SOURCES_READ = "sources:read"
    SOURCES_WRITE = "sources:write"
    EVENTS_READ = "events:read"
    REPORTS_READ = "reports:read"
    """List the reporting outbox (check runs, notifications)."""
    REPORTS_RETRY = "reports:retry"
    """Send a failed report again."""
    AUDIT_READ = "audit:read"
    SECRETS_READ_METADATA = "secrets:read-metadata"
    """List scoped secrets: names, scopes, fingerprints and dates (no route ever returns a value)."""
    SECRETS_WRITE = "secrets:write"
    """Set and delete scoped secrets."""
    KEY_ROTATE = "key:rotate"
    """Re-encrypt every stored secret under the current secret key (`rotate-key`)."""
    ENVIRONMENTS_READ = "environments:read"
    """List and show deployment environments (their policies, variables and secret names)."""
    ENVIRONMENTS_WRITE = "environments:write"
    """Create, change and delete deployment environments."""
    DATA_PRUNE = "data:prune"
    """Delete old runs, events and audit entries now (`prune`; the retention sweep does it on its own)."""
    APPROVALS_WRITE = "approvals:write"
    """Approve or reject held runs and gated jobs (`kici-admin held approve|reject`)."""
    CACHES_READ = "caches:read"
    """List job caches (`kici-admin cache list`)."""
    CACHES_WRITE = "caches:write"
    """Purge job caches (`kici-admin cache purge`)."""


_OWNER_ONLY = frozenset({Permission.TOKENS_OWNER, Permission.KEY_ROTATE})

ROLE_PERMISSIONS: Mapping[AdminRole, frozenset[Permission]] = {
    AdminRole.OWNER: frozenset(Permission),
    AdminRole.ADMIN: frozenset(Permission) - _OWNER_ONLY,
    AdminRole.AUDITOR: frozenset(
        {
            Permission.DB_READ,
            Permission.RUNS_READ,
            Permission.QUEUE_READ,
            Permission.AGENTS_READ,
            Permission.SOURCES_READ,
            Permission.EVENTS_READ,
            Permission.AUDIT_READ,
            Permission.REPORTS_READ,
            Permission.SECRETS_READ_METADATA,
            Permission.ENVIRONMENTS_READ,
            Permission.CACHES_READ,
        }
    ),
    AdminRole.VIEWER: frozenset(
        {
            Permission.RUNS_READ,
            Permission.QUEUE_READ,
            Permission.AGENTS_READ,
        }
    ),
}
"""owner: everything. admin: everything but owner-token management and key rotation. auditor: read-only
(no token listings: who holds which credential is not an auditor's business here). viewer: what a team's
developers need on the dashboard — runs, their jobs and logs, agents, the queue — and nothing else."""


def permissions_of(role: AdminRole | str) -> frozenset[Permission]:
    return ROLE_PERMISSIONS[AdminRole(role)]


@dataclass(frozen=True)
class Principal:
    """The caller of an admin route: its (active) token and what its role allows."""

    token: AdminToken

    @property
    def role(self) -> AdminRole:
        return self.token.role

    @property
    def permissions(self) -> frozenset[Permission]:
        return permissions_of(self.token.role)

    def can(self, permission: Permission) -> bool:
        return permission in self.permissions


# -- errors -----------------------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    """Every admin API error: one human-readable line."""

    error: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, unknown or revoked admin token"},
    403: {"model": ErrorResponse, "description": "The token's role lacks the permission named in `error`"},
    422: {"model": ErrorResponse, "description": "Invalid request (one line naming the field)"},
}


class AdminError(HTTPException):
    """An admin API error; rendered as `{"error": message}` by `AdminRoute`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        denial: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.denial = denial
        """Audit values of an authentication or permission denial (written by `AdminRoute`)."""


UNAUTHENTICATED_MESSAGE = "missing or invalid admin token"


def error_response(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status_code, headers=dict(headers or {}))


def describe_validation_error(exc: RequestValidationError) -> str:
    """`name: Field required; labels.0: …` — the field path without the `body` prefix, one line."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where = loc[0] if loc else ""
        if where in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]
        field = ".".join(loc)
        msg = str(error.get("msg", "invalid value")).replace("\n", " ")
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error")
            parts.append("the request body is not valid JSON" + (f" ({detail})" if detail else ""))
            continue
        if where == "body" and not field:
            field = "request body"
        if where in ("query", "path", "header", "cookie"):
            field = f"{field} ({where})" if field else where
        parts.append(f"{field}: {msg}" if field else msg)
    return "invalid request: " + "; ".join(parts or ["malformed request"])


class AdminRoute(APIRoute):
    """Admin routes answer errors as `{"error": message}`: HTTP errors (ours and FastAPI's) and request
    validation errors (422, one line). Scoped to the admin routers so other routes keep their shapes."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admin_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(422, describe_validation_error(exc))
            except HTTPException as exc:
                if isinstance(exc, AdminError) and exc.denial is not None:
                    await write_denial(request, exc.denial)
                message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
                return error_response(exc.status_code, message, exc.headers)

        return admin_handler


# -- authentication ---------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An admin token (`kici_…`), e.g. from `kici-admin token create`")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
State = Annotated[AppState, Depends(app_state)]


def _record_denial(request: Request, status: int, reason: str, **fields: Any) -> dict[str, Any]:
    """Log a denied admin request; the audit row's values, which `AdminRoute` writes once the route has
    unwound (a denial can happen inside the route's own transaction, which must not be waited on)."""
    client = request.client.host if request.client else None
    log_event(
        "admin.denied",
        level="warning",
        status=status,
        reason=reason,
        method=request.method,
        path=request.url.path,
        client=client,
        **fields,
    )
    return {
        "org_id": fields.get("org_id") or DEFAULT_ORG_ID,
        "status": status,
        "reason": reason,
        "token_id": fields.get("token_id"),
        "role": fields.get("role"),
        "permission": fields.get("permission"),
        "method": request.method,
        "path": request.url.path,
        "client": client,
    }


async def write_denial(request: Request, values: Mapping[str, Any]) -> None:
    """The audit row of a denial: 401s counted into their client's row of the current window
    (`audit_denial_window_seconds`), 403s one row each. A database failure here is logged, not raised: the
    caller is denied either way."""
    state: AppState = request.app.state.kici
    window = state.settings.audit_denial_window_seconds
    try:
        async with state.database.transaction() as conn:
            if values.get("status") == 401 and window > 0:
                # unauthenticated: anyone can send these, so they are counted, not stored one by one
                await audit.record_aggregated(conn, action="admin.request", window_s=window, **values)
            else:
                await audit.record(conn, action="admin.request", outcome=AuditOutcome.DENIED, **values)
    except Exception as exc:
        log_event("audit.write_failed", level="error", error=f"{type(exc).__name__}: {exc}")


def _unauthenticated(request: Request, reason: str, **fields: Any) -> AdminError:
    denial = _record_denial(request, 401, reason, **fields)
    return AdminError(401, UNAUTHENTICATED_MESSAGE, headers={"WWW-Authenticate": "Bearer"}, denial=denial)


async def authenticated(request: Request, state: State, credentials: Credentials) -> Principal:
    """The caller's principal, or 401. Any active admin token passes; routes add `require(...)`."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials.strip():
        raise _unauthenticated(request, "missing_token")
    plaintext = credentials.credentials.strip()
    async with state.database.read() as conn:
        token = await tokens.find_admin_token(conn, plaintext)
    if token is None:
        raise _unauthenticated(request, "unknown_token")
    if not token.active:
        reason = "revoked_token" if token.revoked_at is not None else "expired_token"
        raise _unauthenticated(request, reason, token_id=token.id, token_name=token.name)
    if token.last_used_at is None or utcnow() - token.last_used_at >= TOUCH_INTERVAL:
        async with state.database.transaction() as conn:
            touched = await tokens.verify_admin_token(conn, plaintext, touch=True)
        if touched is None:  # revoked (or expired) in between
            reason = "expired_token" if token.expired else "revoked_token"
            raise _unauthenticated(request, reason, token_id=token.id, token_name=token.name)
        token = touched
    return Principal(token)


Authenticated = Annotated[Principal, Depends(authenticated)]


def forbidden(request: Request, principal: Principal, permission: Permission) -> AdminError:
    """403 naming the missing permission, logged as a denial. For checks that depend on the request body
    (e.g. creating an owner token needs `tokens:owner`)."""
    denial = _record_denial(
        request,
        403,
        "permission_denied",
        org_id=principal.token.org_id,
        token_id=principal.token.id,
        token_name=principal.token.name,
        role=principal.role.value,
        permission=permission.value,
    )
    return AdminError(
        403,
        f"permission '{permission.value}' required; your role '{principal.role.value}' does not have it",
        denial=denial,
    )


def require(permission: Permission) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: the caller's principal if its role has `permission`; else 401 or 403."""

    async def check(request: Request, principal: Authenticated) -> Principal:
        if not principal.can(permission):
            raise forbidden(request, principal, permission)
        return principal

    check.__name__ = f"require_{permission.name.lower()}"
    return check
