"""Tokens that expire (issue 9, "Admin tokens can expire"), on SQLite and PostgreSQL.

Expiry is made to have happened by moving `expires_at` into the past in the database (no sleeping until
a real deadline); everything else goes through the real admin API, the real dashboard session lookup and
real agent WebSockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from websockets.asyncio.client import connect

from kici.engine.durations import DurationError, parse_duration, parse_time
from kici.engine.protocol import PROTOCOL_VERSION
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, admin_tokens, agent_tokens, utcnow
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import audit, sessions, tokens

from .dispatch_harness import FAST_TIMEOUTS, SimAgent, serve_orchestrator
from .test_admin_auth import API, Admin, admin  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(60)
OWNER = AdminRole.OWNER


async def _expire(database: Database, table: sa.Table, token_id: str) -> None:
    async with database.transaction() as conn:
        await conn.execute(table.update().where(table.c.id == token_id)
                           .values(expires_at=utcnow() - dt.timedelta(seconds=1)))


def test_durations() -> None:
    assert parse_duration("30d") == dt.timedelta(days=30)
    assert parse_duration(" 90s ") == dt.timedelta(seconds=90)
    assert parse_duration("15m") == dt.timedelta(minutes=15)
    assert parse_duration("24h") == dt.timedelta(hours=24)
    for bad in ("", "30", "d", "1.5h", "-1d", "0d", "3w", "30 days"):
        with pytest.raises(DurationError):
            parse_duration(bad)
    now = dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)
    assert parse_time("24h", now=now) == dt.datetime(2026, 1, 30, 12, tzinfo=dt.UTC)
    assert parse_time("2026-01-01T00:00:00", now=now) == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert parse_time("2026-01-01T02:00:00+02:00", now=now) == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(DurationError, match="ISO 8601"):
        parse_time("yesterday", now=now)


async def test_admin_token_expires_like_a_revoked_one(admin: Admin) -> None:  # noqa: F811
    before = utcnow()
    response = await admin.request(OWNER, "POST", "/tokens", json={"name": "temp", "role": "admin",
                                                                   "expires_in": "30d"})
    assert response.status_code == 201, response.text
    created = response.json()
    expires_at = dt.datetime.fromisoformat(created["expires_at"])
    assert before + dt.timedelta(days=30) <= expires_at <= utcnow() + dt.timedelta(days=30)
    assert created["expired"] is False
    bearer = {"Authorization": f"Bearer {created['token']}"}
    assert (await admin.http.get(API + "/whoami", headers=bearer)).status_code == 200

    await _expire(admin.database, admin_tokens, created["id"])
    refused = await admin.http.get(API + "/whoami", headers=bearer)
    assert refused.status_code == 401
    assert refused.json() == {"error": "missing or invalid admin token"}  # the same answer as a revoked token
    async with admin.database.read() as conn:
        [row] = await audit.list_audit(conn, outcome="denied")
    assert (row.status, row.reason, row.token_id) == (401, "expired_token", created["id"])

    listed = {t["id"]: t for t in (await admin.request(OWNER, "GET", "/tokens")).json()}
    assert listed[created["id"]]["expired"] is True
    never = next(t for t in listed.values() if t["name"] == "owner-token")
    assert (never["expires_at"], never["expired"]) == (None, False)


async def test_expiry_in_the_request_is_checked(admin: Admin) -> None:  # noqa: F811
    cases = [
        ({"expires_in": "soon"}, "expires_in: Value error, invalid duration 'soon'"),
        ({"expires_in": "0d"}, "must be more than zero"),
        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at: Value error, must be in the future"),
        ({"expires_at": "2999-01-01T00:00:00"}, "give a time zone"),
        ({"expires_in": "1d", "expires_at": "2999-01-01T00:00:00Z"}, "not both"),
    ]
    for extra, message in cases:
        response = await admin.request(OWNER, "POST", "/tokens", json={"name": "t", "role": "viewer", **extra})
        assert response.status_code == 422 and message in response.json()["error"], (extra, response.text)
        agent = await admin.request(OWNER, "POST", "/agent-tokens", json={"name": "t", **extra})
        assert agent.status_code == 422 and message in agent.json()["error"], (extra, agent.text)
    async with admin.database.read() as conn:  # nothing written by a refused request
        assert [t.name for t in await tokens.list_admin_tokens(conn)] == [f"{r.value}-token" for r in AdminRole]
        assert await tokens.list_agent_tokens(conn) == []
    absolute = await admin.request(OWNER, "POST", "/tokens", json={"name": "t", "role": "viewer",
                                                                   "expires_at": "2999-01-01T00:00:00Z"})
    assert absolute.status_code == 201
    assert dt.datetime.fromisoformat(absolute.json()["expires_at"]) == dt.datetime(2999, 1, 1, tzinfo=dt.UTC)


async def test_an_expired_owner_does_not_count_as_the_last_owner(admin: Admin) -> None:  # noqa: F811
    second = (await admin.request(OWNER, "POST", "/tokens", json={"name": "o2", "role": "owner",
                                                                  "expires_in": "1d"})).json()
    await _expire(admin.database, admin_tokens, second["id"])
    me = (await admin.request(OWNER, "GET", "/whoami")).json()
    refused = await admin.request(OWNER, "DELETE", f"/tokens/{me['id']}")
    assert refused.status_code == 409 and "last active owner token" in refused.json()["error"]
    # the expired one can be revoked (tidying up), even though it is an owner token
    assert (await admin.request(OWNER, "DELETE", f"/tokens/{second['id']}")).status_code == 200
    async with admin.database.read() as conn:
        assert await tokens.count_active_admin_tokens(conn) == len(AdminRole)


async def test_the_dashboard_session_of_an_expired_token_ends(admin: Admin) -> None:  # noqa: F811
    created = (await admin.request(OWNER, "POST", "/tokens", json={"name": "web", "role": "viewer",
                                                                   "expires_in": "1h"})).json()
    async with admin.database.transaction() as conn:
        token = await tokens.verify_admin_token(conn, created["token"])
        assert token is not None
        secret, _ = await sessions.create_session(conn, token, ttl=dt.timedelta(hours=8), client=None, user_agent=None)
        assert await sessions.find_active_session(conn, secret) is not None
    await _expire(admin.database, admin_tokens, created["id"])
    async with admin.database.read() as conn:
        assert await sessions.find_active_session(conn, secret) is None
    # and signing in again with it is refused
    async with admin.database.transaction() as conn:
        assert await tokens.verify_admin_token(conn, created["token"]) is None


async def test_an_expired_agent_token_is_cut_off_and_refused_at_reconnect(database: Database, tmp_path: Path) -> None:
    timeouts = dataclasses.replace(FAST_TIMEOUTS, token_recheck_s=0.3)
    async with serve_orchestrator(database, tmp_path, timeouts=timeouts) as orch:
        agent = SimAgent(orch, "builder-1", ["linux"])
        await agent.connect()
        async with database.read() as conn:
            token_id = (await agent_store.get_agent(conn, "builder-1")).agent_token_id  # type: ignore[union-attr]
        assert token_id is not None
        await _expire(database, agent_tokens, token_id)
        assert await agent.wait_closed(within=5) == 4010
        assert agent.received("auth.failure")[0]["reason"] == "agent token expired"
        async with connect(orch.ws_url, open_timeout=5, close_timeout=2) as ws:
            await ws.send(json.dumps({"type": "auth.request", "token": orch.agent_tokens["linux"],
                                      "protocolVersion": PROTOCOL_VERSION}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert reply["type"] == "auth.failure" and reply["reason"] == "invalid or revoked agent token"
