"""The audit trail (issue 9, "Audit and retention"), on SQLite and PostgreSQL, through the real admin API.

- every mutating admin route, taken from the app's own route table, writes an `allowed` row naming actor,
  action, target and client (a route added later without one fails here, by name);
- unauthenticated denials are counted into one row per client and window, also under concurrency;
- `GET /audit` filters by action (exact or prefix), actor and time, and pages by cursor.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, AuditOutcome, audit_log, utcnow
from kici.orchestrator.store import audit, tokens

from .test_admin_auth import API, ROUTES, SECRET_KEY, Admin, Route, _format, _targets, admin  # noqa: F401
from .test_dashboard import Dash, _hidden, _seed_run, dash  # noqa: F401

OWNER, AUDITOR = AdminRole.OWNER, AdminRole.AUDITOR
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}

COVERED_ELSEWHERE = {
    # a full manual start needs a git source with a compiled workflow: its audit row is asserted there
    ("POST", "/runs"): "tests/integration/orchestrator/test_manual_runs.py::test_inputs_validated",
}

CHANGES_NOTHING = {
    # variants of mutating routes that change nothing, so write no row (checked: none appears)
    ("POST", "/prune", "(dry run)"),
}


def _mutating_routes(app: Any) -> list[tuple[str, str]]:
    """Every mutating admin route the app serves, from its route table as OpenAPI publishes it."""
    return sorted(
        (method.upper(), path.removeprefix(API))
        for path, operations in app.openapi()["paths"].items()
        if path.startswith(API)
        for method in operations
        if method.upper() in MUTATING
    )


async def test_every_mutating_admin_route_writes_an_audit_row(admin: Admin) -> None:  # noqa: F811
    owner_id = (await admin.request(OWNER, "GET", "/whoami")).json()["id"]
    walked = _mutating_routes(admin.app)
    assert ("DELETE", "/tokens/{token_id}") in walked and ("POST", "/runs/{run_id}/cancel") in walked
    problems = []
    for method, template in walked:
        if (method, template) in COVERED_ELSEWHERE:
            continue
        rows = [r for r in ROUTES if (r.method, r.route) == (method, template) and 200 <= r.ok < 300]
        if not rows:
            problems.append(f"{method} {template}: no successful case in test_admin_auth.ROUTES to exercise it")
            continue
        for row in rows:
            problems += await _check_audited(admin, row, owner_id)
    assert not problems, "mutating admin routes without a proper audit row:\n" + "\n".join(problems)


async def _check_audited(admin: Admin, route: Route, owner_id: str) -> list[str]:  # noqa: F811
    targets = await _targets(admin)
    path = (route.path or route.route).format(**targets)
    async with admin.database.read() as conn:
        before = {e.id for e in await audit.list_audit(conn, outcome="allowed", limit=1000)}
    response = await admin.request(OWNER, route.method, path, json=_format(route.body, targets), params=route.params)
    name = f"{route.method} {route.route}{' ' + route.label if route.label else ''}"
    if response.status_code != route.ok:
        return [f"{name}: answered {response.status_code} ({response.text[:200]}), expected {route.ok}"]
    async with admin.database.read() as conn:
        new = [e for e in await audit.list_audit(conn, outcome="allowed", limit=1000) if e.id not in before]
    mine = [e for e in new if e.path == API + path and e.method == route.method]
    if (route.method, route.route, route.label) in CHANGES_NOTHING:
        return [f"{name}: changes nothing but wrote {len(mine)} audit rows"] if mine else []
    if len(mine) != 1:
        return [f"{name}: {len(mine)} audit rows for {route.method} {API + path} (expected exactly 1)"]
    [row] = mine
    wrong = []
    if row.actor != f"token:{owner_id}" or row.token_id != owner_id or row.role != "owner":
        wrong.append(f"actor {row.actor!r}")
    if not row.action or "." not in row.action:
        wrong.append(f"action {row.action!r}")
    if not row.target or ":" not in row.target:
        wrong.append(f"target {row.target!r}")
    if not row.client:
        wrong.append("no client")
    if row.status != route.ok:
        wrong.append(f"status {row.status} (answered {route.ok})")
    return [f"{name}: " + ", ".join(wrong)] if wrong else []


async def test_secret_values_never_reach_the_audit_log(admin: Admin) -> None:  # noqa: F811
    await admin.request(OWNER, "PUT", "/secrets/DEPLOY_KEY", json={"scope": "org", "value": "hunter2-value"})
    await admin.request(OWNER, "POST", "/sources", json={"kind": "generic", "name": "hooks",
                                                         "config": {"auth": "hmac_sha256"},
                                                         "secrets": {"hmac_secret": "s3cret-value"}})
    await admin.request(OWNER, "PATCH", "/sources/hooks", json={"secrets": {"hmac_secret": "other-value"}})
    async with admin.database.read() as conn:
        text = str([r.model_dump() for r in await audit.list_audit(conn, limit=1000)])
    assert "hunter2-value" not in text and "s3cret-value" not in text and "other-value" not in text
    assert "hmac_secret" in text and "DEPLOY_KEY" in text


# -- aggregated denials ------------------------------------------------------------------------------


@pytest.fixture
async def windowed(database: Database, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Admin]:
    window = getattr(request, "param", 3600)
    async with database.transaction() as conn:
        made = {role: await tokens.create_admin_token(conn, name=f"{role.value}-token", role=role)
                for role in AdminRole}
    settings = Settings(data_dir=tmp_path, database_url=database.url, audit_denial_window_seconds=window)
    app = create_app(settings, database, secret_key=SECRET_KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator") as http:
        yield Admin(http=http, database=database, token={r: c.plaintext for r, c in made.items()}, app=app)


async def _denied(database: Database) -> list[audit.AuditRecord]:
    async with database.read() as conn:
        return await audit.list_audit(conn, outcome="denied", limit=1000)


async def test_a_flood_of_unauthenticated_requests_is_one_counted_row(windowed: Admin) -> None:
    flood = 60
    answers = await asyncio.gather(*[
        windowed.http.get(API + "/runs", headers={"Authorization": f"Bearer kici_{i:064d}"}) for i in range(flood)
    ])
    assert {a.status_code for a in answers} == {401}
    rows = await _denied(windowed.database)
    # one row per window: two only if the flood straddled a window boundary
    assert 1 <= len(rows) <= 2 and sum(r.count for r in rows) == flood, [(r.count, r.reason) for r in rows]
    assert {(r.status, r.reason, r.client, r.token_id) for r in rows} == {(401, "unknown_token", "127.0.0.1", None)}
    assert all(r.last_at is not None and r.last_at >= r.created_at for r in rows)

    # another reason is another row; 403s (which name a token) are one row each
    await windowed.http.get(API + "/runs")
    for _ in range(3):
        assert (await windowed.request(AdminRole.VIEWER, "POST", "/tokens",
                                       json={"name": "x", "role": "viewer"})).status_code == 403
    rows = await _denied(windowed.database)
    assert sorted((r.reason, r.count) for r in rows if r.reason != "unknown_token") == [
        ("missing_token", 1), ("permission_denied", 1), ("permission_denied", 1), ("permission_denied", 1)]


async def test_aggregation_is_per_window_and_per_client(database: Database) -> None:
    t0 = dt.datetime(2026, 1, 1, 12, 0, 10, tzinfo=dt.UTC)
    async with database.transaction() as conn:
        for at, client in ((t0, "10.0.0.1"), (t0 + dt.timedelta(seconds=30), "10.0.0.1"),
                           (t0 + dt.timedelta(seconds=55), "10.0.0.1"),  # next window (12:01:00)
                           (t0, "10.0.0.2")):
            await audit.record_aggregated(conn, action="admin.request", window_s=60, now=at, status=401,
                                          reason="missing_token", client=client, path="/x", method="GET")
    rows = sorted(await _denied(database), key=lambda r: (r.client or "", r.created_at))
    assert [(r.client, r.count, r.created_at, r.last_at) for r in rows] == [
        ("10.0.0.1", 2, t0, t0 + dt.timedelta(seconds=30)),
        ("10.0.0.1", 1, t0 + dt.timedelta(seconds=55), t0 + dt.timedelta(seconds=55)),
        ("10.0.0.2", 1, t0, t0),
    ]


@pytest.mark.parametrize("windowed", [0], indirect=True)
async def test_window_zero_keeps_a_row_per_denial(windowed: Admin) -> None:
    for _ in range(3):
        assert (await windowed.http.get(API + "/runs")).status_code == 401
    assert [r.count for r in await _denied(windowed.database)] == [1, 1, 1]


# -- listing: filters and paging --------------------------------------------------------------------


async def _seed(database: Database) -> None:
    now = utcnow()
    async with database.transaction() as conn:
        for i, (action, actor, age_h) in enumerate([
            ("secret.set", "token:a", 1), ("secret.delete", "token:a", 2), ("secretary.x", "token:b", 3),
            ("token.create", "token:b", 30), ("run.cancel", "system", 50),
        ]):
            await conn.execute(audit_log.insert().values(
                id=f"seed-{i}", org_id="default", action=action, outcome=AuditOutcome.ALLOWED.value, actor=actor,
                target=f"x:{i}", created_at=now - dt.timedelta(hours=age_h)))


async def test_list_filters(admin: Admin) -> None:  # noqa: F811
    await _seed(admin.database)

    async def actions(**params: str) -> list[str]:
        response = await admin.request(AUDITOR, "GET", "/audit", params=params)
        assert response.status_code == 200, response.text
        return [e["action"] for e in response.json()]

    assert await actions(action="secret.") == ["secret.set", "secret.delete"]  # a prefix ends in a dot
    assert await actions(action="secret.set") == ["secret.set"]
    assert await actions(actor="token:b") == ["secretary.x", "token.create"]
    assert await actions(**{"from": "24h"}) == ["secret.set", "secret.delete", "secretary.x"]
    assert await actions(**{"from": "48h", "to": "24h"}) == ["token.create"]
    iso = (utcnow() - dt.timedelta(hours=40)).isoformat()
    assert await actions(to=iso, outcome="allowed") == ["run.cancel"]
    assert await actions(actor="nobody") == []
    for params, message in (
        ({"from": "yesterday"}, "invalid request: from (query): invalid time 'yesterday'"),
        ({"from": "1h", "to": "2h"}, "from (query): must be earlier than to"),
        ({"before": "garbage"}, "invalid request: before (query): not an audit cursor"),
    ):
        response = await admin.request(AUDITOR, "GET", "/audit", params=params)
        assert response.status_code == 422 and message in response.json()["error"], (params, response.text)


async def test_cursor_paging_walks_everything_once(admin: Admin) -> None:  # noqa: F811
    now = utcnow()
    async with admin.database.transaction() as conn:
        for i in range(23):  # some share a timestamp: the id breaks the tie
            await conn.execute(audit_log.insert().values(
                id=f"p-{i:02d}", org_id="default", action="run.rerun", outcome="allowed", actor="system",
                created_at=now - dt.timedelta(seconds=i // 3)))
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params = {"action": "run.rerun", "limit": "5", **({"before": cursor} if cursor else {})}
        response = await admin.request(AUDITOR, "GET", "/audit", params=params)
        seen += [e["id"] for e in response.json()]
        cursor = response.headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert len(seen) == 23 and len(set(seen)) == 23
    async with admin.database.read() as conn:
        ordered = (await conn.execute(sa.select(audit_log.c.id).where(audit_log.c.action == "run.rerun")
                                      .order_by(audit_log.c.created_at.desc(), audit_log.c.id.desc()))).scalars()
        assert seen == list(ordered)


# -- the dashboard ----------------------------------------------------------------------------------


async def test_dashboard_actions_are_audited_with_the_signed_in_token(dash: Dash) -> None:  # noqa: F811
    live, _ = await _seed_run(dash)
    finished, _ = await _seed_run(dash, status="success")
    owner_id = dash.token_ids[OWNER]
    async with dash.session(OWNER) as http:
        csrf = _hidden((await http.get(f"/runs/{live}")).text, "csrf_token")
        assert (await http.post(f"/runs/{live}/cancel", data={"csrf_token": csrf})).status_code == 303
        assert (await http.post(f"/runs/{finished}/rerun", data={"csrf_token": csrf})).status_code == 303
        assert (await http.post("/logout", data={"csrf_token": csrf})).status_code == 303
    async with dash.database.read() as conn:
        rows = {e.action: e for e in await audit.list_audit(conn, outcome="allowed", limit=100)}
    assert set(rows) == {"dashboard.login", "run.cancel", "run.rerun", "dashboard.logout"}
    assert all(r.actor == f"token:{owner_id}" and r.client for r in rows.values())
    assert (rows["run.cancel"].target, rows["run.cancel"].path) == (f"run:{live}", f"/runs/{live}/cancel")
    assert rows["run.rerun"].target == f"run:{finished}" and rows["dashboard.login"].target.startswith("session:")


async def test_failed_sign_ins_are_counted_per_client(dash: Dash) -> None:  # noqa: F811
    async with dash.client() as http:
        for _ in range(5):
            csrf = _hidden((await http.get("/login")).text, "csrf_token")
            assert (await http.post("/login", data={"token": "kici_nope", "csrf_token": csrf})).status_code == 401
    rows = await _denied(dash.database)
    assert len(rows) <= 2 and sum(r.count for r in rows) == 5  # two only across a window boundary
    assert {(r.action, r.reason) for r in rows} == {("dashboard.login", "unknown_or_revoked_token")}
    async with dash.session(OWNER) as http:
        page = (await http.get("/audit")).text
    assert all(f"×{r.count}" in page for r in rows if r.count > 1) and "unknown_or_revoked_token" in page
