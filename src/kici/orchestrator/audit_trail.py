"""One way for an admin route to record the mutation it made: an `allowed` audit row naming the actor, the
action, the target and the client, written in the route's own transaction (so the row exists exactly when
the change does)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from kici.orchestrator.auth import Permission, Principal
from kici.orchestrator.db.schema import AuditOutcome
from kici.orchestrator.store import audit


def client_of(request: Request) -> str | None:
    return request.client.host if request.client else None


def token_actor(principal: Principal) -> str:
    return f"token:{principal.token.id}"


async def record_mutation(
    conn: AsyncConnection,
    request: Request,
    principal: Principal,
    *,
    action: str,
    target: str,
    permission: Permission,
    status: int = 200,
    reason: str | None = None,
) -> str:
    """Write the audit row of a successful mutation made through an admin route; returns its id."""
    return await audit.record(
        conn,
        action=action,
        outcome=AuditOutcome.ALLOWED,
        org_id=principal.token.org_id,
        status=status,
        reason=reason,
        token_id=principal.token.id,
        role=principal.role.value,
        permission=permission.value,
        method=request.method,
        path=request.url.path,
        client=client_of(request),
        actor=token_actor(principal),
        target=target,
    )
