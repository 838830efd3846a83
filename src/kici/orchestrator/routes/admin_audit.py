"""The audit log (`/audit`): every successful mutation and every denied request, newest first, filtered by
outcome, action, actor and time, keyset-paged like the runs list."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response

from kici.engine.durations import DurationError, parse_time
from kici.orchestrator.auth import ERROR_RESPONSES, AdminError, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.store import audit
from kici.orchestrator.store.audit import AuditFilter, AuditRecord

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
NEXT_CURSOR_HEADER = "X-Next-Cursor"
TIME_HELP = "An ISO 8601 time (UTC when it has no offset) or an age like `24h`, `7d` (that long ago)"


@router.get(
    "/audit",
    summary="List audit entries (mutations and denied requests), newest first",
    description=f"Filters combine with AND. Paging: pass the `{NEXT_CURSOR_HEADER}` response header (present "
    "when there are older entries) as `before`.",
)
async def list_audit(
    response: Response,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.AUDIT_READ))],
    outcome: Literal["denied", "allowed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    action: Annotated[str | None, Query(description="An action (`secret.set`), or a prefix ending in a dot "
                                                    "(`secret.`) for all of its actions")] = None,
    actor: Annotated[str | None, Query(description="`token:<id>`, `github:<login>` or `system`")] = None,
    from_: Annotated[str | None, Query(alias="from", description="Entries at or after: " + TIME_HELP)] = None,
    to: Annotated[str | None, Query(description="Entries before: " + TIME_HELP)] = None,
    before: Annotated[str | None, Query(description="Cursor: entries older than the page it came from")] = None,
) -> list[AuditRecord]:
    page = await find_audit_page(state, principal, outcome=outcome, limit=limit, action=action, actor=actor,
                                 from_=from_, to=to, before=before)
    if page.next is not None:
        response.headers[NEXT_CURSOR_HEADER] = page.next
    return page.entries


async def find_audit_page(
    state: AppState,
    principal: Principal,
    *,
    outcome: str | None = None,
    limit: int = 100,
    action: str | None = None,
    actor: str | None = None,
    from_: str | None = None,
    to: str | None = None,
    before: str | None = None,
) -> audit.AuditPage:
    """One page of the audit log (the REST route and the dashboard both call this). Bad values are
    `AdminError(422)` naming the parameter."""
    now = utcnow()

    def when(value: str | None, name: str) -> dt.datetime | None:
        if value is None or not value.strip():
            return None
        try:
            return parse_time(value, now=now)
        except DurationError as exc:
            raise AdminError(422, f"invalid request: {name} (query): {exc}") from None

    where = AuditFilter(
        outcome=outcome, action=(action or "").strip() or None, actor=(actor or "").strip() or None,
        since=when(from_, "from"), until=when(to, "to"),
    )
    if where.since is not None and where.until is not None and where.since >= where.until:
        raise AdminError(422, "invalid request: from (query): must be earlier than to")
    async with state.database.read() as conn:
        try:
            return await audit.find_audit(conn, org_id=principal.token.org_id, where=where, limit=limit,
                                          before=(before or "").strip() or None)
        except audit.BadCursor as exc:
            raise AdminError(422, f"invalid request: before (query): {exc}") from None
