"""Dashboard sign-in sessions: an admin token exchanged at `/login` for an opaque session secret that the
browser keeps in a cookie. Only the secret's SHA-256 is stored, so a database dump cannot sign anyone in.

A session is valid while it is not revoked, not expired, and its admin token is not revoked: the lookup
joins the token, so revoking a token ends its sessions at their next request with no extra bookkeeping.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import admin_tokens, dashboard_sessions, new_id, utcnow
from kici.orchestrator.store.tokens import AdminToken

SESSION_PREFIX = "kicis_"
TOUCH_INTERVAL = dt.timedelta(seconds=60)
"""`last_seen_at` is written at most once a minute per session, so page views stay reads."""


def generate_session_secret() -> str:
    return SESSION_PREFIX + secrets.token_urlsafe(32)


def hash_session(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class DashboardSession(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    org_id: str
    token_id: str
    created_at: dt.datetime
    expires_at: dt.datetime
    last_seen_at: dt.datetime | None
    revoked_at: dt.datetime | None
    client: str | None
    user_agent: str | None


class ActiveSession(BaseModel):
    """A valid session with the admin token it acts as."""

    model_config = ConfigDict(frozen=True)

    session: DashboardSession
    token: AdminToken


_SESSION_COLUMNS = [c for c in dashboard_sessions.c if c.name != "session_hash"]
_TOKEN_PREFIX = "admin_token__"
_TOKEN_COLUMNS = [c.label(_TOKEN_PREFIX + c.name) for c in admin_tokens.c if c.name != "token_hash"]


async def create_session(
    conn: AsyncConnection,
    token: AdminToken,
    *,
    ttl: dt.timedelta,
    client: str | None = None,
    user_agent: str | None = None,
) -> tuple[str, DashboardSession]:
    """A new session for `token`; returns the secret (for the cookie, never stored) and the record."""
    secret = generate_session_secret()
    now = utcnow()
    values = {
        "id": new_id(),
        "org_id": token.org_id,
        "token_id": token.id,
        "session_hash": hash_session(secret),
        "created_at": now,
        "expires_at": now + ttl,
        "last_seen_at": now,
        "client": client,
        "user_agent": (user_agent or "")[:300] or None,
    }
    await conn.execute(dashboard_sessions.insert().values(**values))
    values.pop("session_hash")
    return secret, DashboardSession.model_validate({**values, "revoked_at": None})


def _active(row: Any) -> ActiveSession:
    mapping = dict(row._mapping)
    token = {k.removeprefix(_TOKEN_PREFIX): v for k, v in mapping.items() if k.startswith(_TOKEN_PREFIX)}
    session = {c.name: mapping[c.name] for c in _SESSION_COLUMNS}
    return ActiveSession(session=DashboardSession.model_validate(session), token=AdminToken.model_validate(token))


async def find_active_session(
    conn: AsyncConnection, secret: str, *, now: dt.datetime | None = None
) -> ActiveSession | None:
    """The session with this secret if it is valid now (not revoked, not expired, token neither revoked nor
    expired: a session ends with its token)."""
    now = now or utcnow()
    query = (
        sa.select(*_SESSION_COLUMNS, *_TOKEN_COLUMNS)
        .join(admin_tokens, admin_tokens.c.id == dashboard_sessions.c.token_id)
        .where(
            dashboard_sessions.c.session_hash == hash_session(secret),
            dashboard_sessions.c.revoked_at.is_(None),
            dashboard_sessions.c.expires_at > now,
            admin_tokens.c.revoked_at.is_(None),
            sa.or_(admin_tokens.c.expires_at.is_(None), admin_tokens.c.expires_at > now),
        )
    )
    row = (await conn.execute(query)).first()
    return _active(row) if row is not None else None


async def touch_session(conn: AsyncConnection, session_id: str, *, now: dt.datetime | None = None) -> None:
    await conn.execute(
        dashboard_sessions.update()
        .where(dashboard_sessions.c.id == session_id)
        .values(last_seen_at=now or utcnow())
    )


async def revoke_session(conn: AsyncConnection, secret: str) -> bool:
    """Sign out: True when a live session was revoked."""
    result = await conn.execute(
        dashboard_sessions.update()
        .where(dashboard_sessions.c.session_hash == hash_session(secret), dashboard_sessions.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount)


async def delete_expired_sessions(conn: AsyncConnection, *, now: dt.datetime | None = None) -> int:
    """Forget sessions that expired or were revoked more than a day ago (housekeeping at sign-in)."""
    cutoff = (now or utcnow()) - dt.timedelta(days=1)
    result = await conn.execute(
        dashboard_sessions.delete().where(
            sa.or_(dashboard_sessions.c.expires_at < cutoff, dashboard_sessions.c.revoked_at < cutoff)
        )
    )
    return int(result.rowcount or 0)
