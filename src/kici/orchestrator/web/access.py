"""Who is looking at a dashboard page: a signed-in session (an admin token exchanged at `/login`), an
anonymous visitor when `KICI_DASHBOARD_PUBLIC=true`, or nobody (sent to `/login`).

Pages and actions check the same `Permission`s as the admin REST API, through the same `Principal`, and
denials are logged and audited the same way (`kici.orchestrator.auth.forbidden`).

CSRF: every state-changing request carries a token derived from the session secret (HMAC), as a form
field `csrf_token` or an `X-CSRF-Token` header; the server recomputes it, so nothing extra is stored.
The sign-in form, which has no session yet, uses a double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import HTTPException, Request

from kici.orchestrator.auth import Permission, Principal, forbidden, permissions_of, write_denial
from kici.orchestrator.container import AppState
from kici.orchestrator.db.schema import DEFAULT_ORG_ID, AdminRole, utcnow
from kici.orchestrator.store import sessions
from kici.orchestrator.store.tokens import AdminToken

SESSION_COOKIE = "kici_session"
LOGIN_CSRF_COOKIE = "kici_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

ANONYMOUS_TOKEN_ID = "anonymous"


@dataclass(frozen=True)
class Viewer:
    """The person behind a dashboard request. `principal` is what the REST API's route functions take:
    for an anonymous visitor in public mode it is a stand-in `viewer` token that exists nowhere."""

    principal: Principal
    signed_in: bool
    session_secret: str | None = None

    @property
    def name(self) -> str:
        return self.principal.token.name if self.signed_in else "anonymous"

    @property
    def role(self) -> str:
        return self.principal.role.value

    def can(self, permission: Permission) -> bool:
        return self.principal.can(permission)

    @property
    def csrf_token(self) -> str:
        return csrf_for(self.session_secret) if self.session_secret else ""


class LoginRequired(Exception):
    """No session (and the dashboard is not public): pages redirect to `/login`, streams answer 401."""


def csrf_for(session_secret: str) -> str:
    return hmac.new(session_secret.encode(), b"kici-dashboard-csrf", hashlib.sha256).hexdigest()


def _anonymous() -> Principal:
    token = AdminToken(
        id=ANONYMOUS_TOKEN_ID, org_id=DEFAULT_ORG_ID, name="anonymous", role=AdminRole.VIEWER, created_at=utcnow()
    )
    return Principal(token)


async def current_viewer(request: Request, state: AppState) -> Viewer | None:
    """The request's viewer, or None when nobody is signed in and the dashboard is not public."""
    secret = request.cookies.get(SESSION_COOKIE)
    if secret:
        async with state.database.read() as conn:
            found = await sessions.find_active_session(conn, secret)
        if found is not None:
            seen = found.session.last_seen_at
            if seen is None or utcnow() - seen >= sessions.TOUCH_INTERVAL:
                async with state.database.transaction() as conn:
                    await sessions.touch_session(conn, found.session.id)
            return Viewer(principal=Principal(found.token), signed_in=True, session_secret=secret)
    if state.settings.dashboard_public:
        return Viewer(principal=_anonymous(), signed_in=False)
    return None


async def require_viewer(request: Request, state: AppState, permission: Permission) -> Viewer:
    """The viewer if it may `permission`; `LoginRequired` when nobody is signed in; 403 otherwise (logged
    and audited like an admin API denial)."""
    viewer = await current_viewer(request, state)
    if viewer is None:
        raise LoginRequired()
    if not viewer.can(permission):
        if not viewer.signed_in and permission not in permissions_of(AdminRole.VIEWER):
            raise LoginRequired()  # public mode: signing in may give more
        error = forbidden(request, viewer.principal, permission)
        if error.denial is not None:
            await write_denial(request, error.denial)
        raise HTTPException(403, str(error.detail))
    return viewer


async def check_csrf(request: Request, viewer: Viewer, form_value: str | None) -> None:
    """403 unless the request carries this session's CSRF token (form field or header)."""
    presented = form_value or request.headers.get(CSRF_HEADER) or ""
    if not viewer.session_secret or not hmac.compare_digest(presented, csrf_for(viewer.session_secret)):
        raise HTTPException(403, "missing or invalid CSRF token; reload the page and try again")


def new_login_csrf() -> str:
    return secrets.token_urlsafe(24)


def cookie_path(state: AppState) -> str:
    return state.settings.base_path or "/"


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"
