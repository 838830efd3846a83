"""The web dashboard in process, on SQLite and PostgreSQL: sign-in sessions (cookie flags, expiry, logout,
revocation), CSRF, security headers, public mode, the RBAC matrix over every page and action for every
role with and without a session, and the pages' content (escaping, ANSI, log paging, search, live log,
schedules, wait reasons, draining agents, a run's reports).
The browser tests (tests/browser/test_dashboard.py) drive the same pages in Chromium."""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.engine.junit import parse_junit
from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.container import services_of
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.store import audit, tokens
from kici.orchestrator.store import schedules as schedule_store
from kici.orchestrator.store import test_reports as report_store
from kici.orchestrator.store.sources import create_source
from kici.orchestrator.web import CONTENT_SECURITY_POLICY
from kici.orchestrator.web.access import SESSION_COOKIE

from .conftest import WORKFLOW_SPEC, insert_job, insert_run

ROLES = list(AdminRole)
T0 = dt.datetime(2026, 11, 27, 8, 0, tzinfo=dt.UTC)


@dataclass
class Dash:
    app: Any
    database: Database
    tokens: dict[AdminRole, str]
    token_ids: dict[AdminRole, str]
    tmp_path: Path
    base_url: str = "http://dash.test"

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=self.base_url,
                                 follow_redirects=False, **kwargs)

    async def login(self, http: httpx.AsyncClient, role: AdminRole, *, next: str = "/") -> httpx.Response:
        page = await http.get("/login", params={"next": next})
        assert page.status_code == 200
        csrf = _hidden(page.text, "csrf_token")
        return await http.post("/login", data={"token": self.tokens[role], "csrf_token": csrf, "next": next})

    @asynccontextmanager
    async def session(self, role: AdminRole) -> AsyncIterator[httpx.AsyncClient]:
        async with self.client() as http:
            response = await self.login(http, role)
            assert response.status_code == 303, response.text
            yield http


def _hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name} in page"
    return match.group(1)


async def _make_app(database: Database, tmp_path: Path, **settings: Any) -> tuple[Any, Dash]:
    async with database.transaction() as conn:
        made = {role: await tokens.create_admin_token(conn, name=f"{role.value}-person", role=role) for role in ROLES}
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url, **settings), database,
                     secret_key=b"k" * 32)
    return app, Dash(app=app, database=database, tokens={r: m.plaintext for r, m in made.items()},
                     token_ids={r: m.token.id for r, m in made.items()}, tmp_path=tmp_path)


@pytest.fixture
async def dash(database: Database, tmp_path: Path) -> AsyncIterator[Dash]:
    app, made = await _make_app(database, tmp_path)
    try:
        yield made
    finally:
        await services_of(app).logs.close()


@pytest.fixture
async def public_dash(database: Database, tmp_path: Path) -> AsyncIterator[Dash]:
    app, made = await _make_app(database, tmp_path, dashboard_public=True)
    try:
        yield made
    finally:
        await services_of(app).logs.close()


async def _seed_run(dash: Dash, **values: Any) -> tuple[str, str]:
    async with dash.database.transaction() as conn:
        values.setdefault("event", {"type": "push", "branch": "main", "ref": "refs/heads/main"})
        run_id = await insert_run(conn, workflow_spec=WORKFLOW_SPEC, started_at=T0, **values)
        job_id = await insert_job(conn, run_id, "build", status=values.get("status", "running"))
    return run_id, job_id


async def _seed_report(dash: Dash, run_id: str, job_id: str | None, *, status: str, kind: str = "check_run",
                       target: str | None = None, error: str | None = None) -> int:
    async with dash.database.transaction() as conn:
        result = await conn.execute(sa.insert(schema.report_outbox).values(
            org_id="default", kind=kind, ordering_key=f"{kind}:{job_id or run_id}:{target}", run_id=run_id,
            job_id=job_id, event="completed" if kind == "check_run" else "run.finished", target=target,
            delivery_id=f"d-{run_id}-{kind}", status=status, attempts=3 if status == "failed" else 0,
            next_attempt_at=T0, created_at=T0, sent_at=T0 if status == "sent" else None, last_error=error,
        ).returning(schema.report_outbox.c.id))
        return int(result.scalar_one())


# -- sign-in and sessions ----------------------------------------------------------------------------


async def test_root_sends_signed_out_visitors_to_login(dash: Dash) -> None:
    async with dash.client() as http:
        response = await http.get("/", params={"workflow": "ci"})
        assert response.status_code == 303
        assert response.headers["location"] == "/login?next=%2F%3Fworkflow%3Dci"
        assert (await http.get("/login")).status_code == 200


async def test_login_creates_a_hashed_expiring_session_with_a_safe_cookie(dash: Dash) -> None:
    async with dash.client() as http:
        response = await dash.login(http, AdminRole.VIEWER, next="/agents")
        assert response.status_code == 303 and response.headers["location"] == "/agents"
        cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "="))
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP here; see the HTTPS test
        secret = http.cookies[SESSION_COOKIE]
        assert (await http.get("/")).status_code == 200
    async with dash.database.read() as conn:
        rows = (await conn.execute(sa.select(schema.dashboard_sessions))).mappings().all()
    assert len(rows) == 1 and secret not in str(dict(rows[0]))  # only its hash is stored
    assert rows[0]["token_id"] == dash.token_ids[AdminRole.VIEWER]
    assert dt.timedelta(hours=11) < rows[0]["expires_at"] - rows[0]["created_at"] <= dt.timedelta(hours=12)


async def test_cookie_is_secure_over_https(database: Database, tmp_path: Path) -> None:
    app, made = await _make_app(database, tmp_path)
    try:
        made.base_url = "https://dash.test"
        async with made.client() as http:
            response = await made.login(http, AdminRole.VIEWER)
            cookie = next(h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
            assert "Secure" in cookie
    finally:
        await services_of(app).logs.close()


async def test_open_redirects_are_refused(dash: Dash) -> None:
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example", "/\t/evil.example"):
        async with dash.client() as http:
            response = await dash.login(http, AdminRole.VIEWER, next=target)
            assert response.headers["location"] == "/", target


async def test_bad_token_is_401_and_audited(dash: Dash) -> None:
    async with dash.client() as http:
        page = await http.get("/login")
        csrf = _hidden(page.text, "csrf_token")
        response = await http.post("/login", data={"token": "kici_nope", "csrf_token": csrf})
        assert response.status_code == 401 and "unknown or revoked" in response.text
        assert SESSION_COOKIE not in http.cookies
    async with dash.database.read() as conn:
        entries = await audit.list_audit(conn, limit=10)
    assert [(e.action, e.status) for e in entries] == [("dashboard.login", 401)]


async def test_login_without_csrf_is_refused(dash: Dash) -> None:
    async with dash.client() as http:
        response = await http.post("/login", data={"token": dash.tokens[AdminRole.OWNER]})
        assert response.status_code == 403 and "CSRF" in response.text
        assert SESSION_COOKIE not in http.cookies


async def test_logout_needs_csrf_and_ends_the_session(dash: Dash) -> None:
    async with dash.session(AdminRole.VIEWER) as http:
        page = await http.get("/")
        csrf = _hidden(page.text, "csrf_token")
        assert (await http.post("/logout")).status_code == 403
        assert (await http.get("/")).status_code == 200
        secret = http.cookies[SESSION_COOKIE]
        response = await http.post("/logout", data={"csrf_token": csrf})
        assert response.status_code == 303 and response.headers["location"] == "/login"
    async with dash.client(cookies={SESSION_COOKIE: secret}) as replay:  # the old cookie is dead server-side
        assert (await replay.get("/")).status_code == 303


async def test_revoking_the_token_ends_its_sessions(dash: Dash) -> None:
    async with dash.session(AdminRole.ADMIN) as http:
        assert (await http.get("/")).status_code == 200
        revoked = await httpx.AsyncClient(transport=httpx.ASGITransport(app=dash.app), base_url=dash.base_url).delete(
            f"/api/v1/admin/tokens/{dash.token_ids[AdminRole.ADMIN]}",
            headers={"Authorization": f"Bearer {dash.tokens[AdminRole.OWNER]}"},
        )
        assert revoked.status_code == 200, revoked.text
        assert (await http.get("/")).status_code == 303


async def test_expired_sessions_are_refused(dash: Dash) -> None:
    async with dash.session(AdminRole.VIEWER) as http:
        async with dash.database.transaction() as conn:
            await conn.execute(sa.update(schema.dashboard_sessions).values(expires_at=T0))
        assert (await http.get("/")).status_code == 303


async def test_security_headers_on_pages_and_api(dash: Dash) -> None:
    async with dash.client() as http:
        for path in ("/login", "/health", "/static/app.js"):
            response = await http.get(path)
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "same-origin"
            assert response.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY


async def test_pages_have_no_inline_script_or_style(dash: Dash) -> None:
    run_id, _ = await _seed_run(dash)
    async with dash.session(AdminRole.OWNER) as http:
        for path in ("/", f"/runs/{run_id}", "/schedules", "/agents", "/queue", "/sources", "/audit", "/login"):
            html = (await http.get(path)).text
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), path
            assert " style=" not in html and "<style" not in html, path
            assert not re.search(r"\son[a-z]+=", html), path


# -- RBAC matrix -------------------------------------------------------------------------------------

ANON = "anonymous"
PAGES: list[tuple[str, str, str | None]] = [
    # (method, path, permission needed; None = anyone)
    ("GET", "/", "runs:read"),
    ("GET", "/runs/{run}", "runs:read"),
    ("GET", "/runs/{run}/jobs/{job}/log.txt", "runs:read"),
    ("GET", "/runs/{finished}/jobs/{finished_job}/live", "runs:read"),
    ("GET", "/?fragment=rows", "runs:read"),
    ("GET", "/schedules", "runs:read"),
    ("GET", "/agents", "agents:read"),
    ("GET", "/queue", "queue:read"),
    ("GET", "/sources", "sources:read"),
    ("GET", "/audit", "audit:read"),
    ("POST", "/runs/{run}/cancel", "runs:cancel"),
    ("POST", "/runs/{finished}/rerun", "runs:rerun"),
    ("POST", "/runs/{finished}/reports/{report}/retry", "reports:retry"),
    ("POST", "/logout", None),
]


def _allowed(role: AdminRole, permission: str | None) -> bool:
    from kici.orchestrator.auth import ROLE_PERMISSIONS

    return permission is None or permission in {p.value for p in ROLE_PERMISSIONS[role]}


async def _request_as(dash: Dash, who: AdminRole | str, method: str, path: str, run_id: str) -> httpx.Response:
    """`method path` as `who`: signed in (with the session's CSRF token on posts) or anonymous."""
    if not isinstance(who, AdminRole):
        async with dash.client() as http:
            return await http.request(method, path, data={"csrf_token": ""} if method == "POST" else None)
    async with dash.session(who) as http:
        csrf = ""
        if method == "POST":
            csrf = _hidden((await http.get(f"/runs/{run_id}")).text, "csrf_token")  # every role may read runs
        return await http.request(method, path, data={"csrf_token": csrf} if method == "POST" else None)


@pytest.mark.parametrize("public", [False, True], ids=["private", "public"])
async def test_rbac_matrix(database: Database, tmp_path: Path, public: bool) -> None:
    app, made = await _make_app(database, tmp_path, dashboard_public=public)
    try:
        for who in [*ROLES, ANON]:
            for method, template, permission in PAGES:
                run_id, job_id = await _seed_run(made)
                finished, finished_job = await _seed_run(made, status="success")
                report = await _seed_report(made, finished, finished_job, status="failed")
                path = template.format(run=run_id, job=job_id, finished=finished, finished_job=finished_job,
                                       report=report)
                response = await _request_as(made, who, method, path, run_id)
                if who == ANON:
                    ok = public and permission in ("runs:read", "agents:read", "queue:read")
                    signed_out = {401} if method == "POST" or "fragment" in path else {303}
                    expected = {200} if ok else signed_out
                elif _allowed(who, permission):
                    expected = {303} if method == "POST" else {200}
                else:
                    expected = {403}
                assert response.status_code in expected, (who, method, path, response.status_code, response.text[:300])
    finally:
        await services_of(app).logs.close()


@pytest.mark.parametrize("role", ROLES)
async def test_buttons_only_for_roles_that_may(dash: Dash, role: AdminRole) -> None:
    running, _ = await _seed_run(dash)
    finished, _ = await _seed_run(dash, status="success")
    async with dash.session(role) as http:
        live = (await http.get(f"/runs/{running}")).text
        done = (await http.get(f"/runs/{finished}")).text
        nav = re.findall(r'<nav aria-label="Main">(.*?)</nav>', live, re.S)[0]
    may_cancel = _allowed(role, "runs:cancel")
    assert ('id="cancel"' in live) == may_cancel and ('id="force-cancel"' in live) == may_cancel
    assert ('id="rerun"' in done) == _allowed(role, "runs:rerun")
    assert 'id="cancel"' not in done and 'id="rerun"' not in live
    assert (">Audit<" in nav) == _allowed(role, "audit:read")
    assert (">Sources<" in nav) == _allowed(role, "sources:read")
    assert ">Schedules<" in nav  # every role may read runs, hence schedules (as GET /api/v1/admin/schedules)


async def test_post_without_csrf_is_refused_and_does_nothing(dash: Dash) -> None:
    run_id, _ = await _seed_run(dash)
    async with dash.session(AdminRole.OWNER) as http:
        for data in (None, {"csrf_token": "0" * 64}):
            response = await http.post(f"/runs/{run_id}/cancel", data=data)
            assert response.status_code == 403 and "CSRF" in response.text
        page = await http.get(f"/runs/{run_id}")
        response = await http.post(f"/runs/{run_id}/cancel", headers={"X-CSRF-Token": _hidden(page.text, "csrf_token")})
        assert response.status_code == 303
    async with dash.database.read() as conn:
        status = (await conn.execute(sa.select(schema.runs.c.status).where(schema.runs.c.id == run_id))).scalar_one()
    assert status in ("cancelling", "cancelled")


async def test_viewer_forcing_a_cancel_gets_403_and_an_audit_row(dash: Dash) -> None:
    run_id, _ = await _seed_run(dash)
    async with dash.session(AdminRole.VIEWER) as http:
        csrf = _hidden((await http.get(f"/runs/{run_id}")).text, "csrf_token")
        response = await http.post(f"/runs/{run_id}/cancel", data={"csrf_token": csrf, "force": "true"})
    assert response.status_code == 403
    assert "permission &#39;runs:cancel&#39; required" in response.text
    async with dash.database.read() as conn:
        entries = await audit.list_audit(conn, outcome="denied", limit=10)
        status = (await conn.execute(sa.select(schema.runs.c.status).where(schema.runs.c.id == run_id))).scalar_one()
    assert [(e.role, e.permission, e.path) for e in entries] == [("viewer", "runs:cancel", f"/runs/{run_id}/cancel")]
    assert status == "pending" or status == "running"


# -- pages -------------------------------------------------------------------------------------------


async def test_runs_page_filters_escapes_and_live_fragment(dash: Dash) -> None:
    evil = "<script>alert(1)</script>"
    await _seed_run(dash, workflow="ci", branch="main", repo="acme/app")
    await _seed_run(dash, workflow=evil, branch="dev",
                    event={"type": "push", "payload": {"head_commit": {"message": evil + "\nmore"}}})
    async with dash.session(AdminRole.VIEWER) as http:
        page = (await http.get("/")).text
        assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        only_main = (await http.get("/", params={"branch": "main"})).text
        assert "acme/app" in only_main and "&lt;script&gt;" not in only_main
        fragment = await http.get("/", params={"branch": "main", "fragment": "rows"})
        assert fragment.status_code == 200 and fragment.text.lstrip().startswith("<tr")
        bad = await http.get("/", params={"sha": "zz"})
        assert bad.status_code == 422 and "sha (query)" in bad.text
        assert (await http.get("/", params={"before": "not-a-cursor"})).status_code == 422


async def test_runs_page_pages_by_cursor(dash: Dash) -> None:
    for i in range(55):
        async with dash.database.transaction() as conn:
            await insert_run(conn, workflow=f"w{i:02d}", created_at=T0 + dt.timedelta(minutes=i))
    async with dash.session(AdminRole.VIEWER) as http:
        first = (await http.get("/")).text
        assert "w54" in first and "w04" not in first
        older = re.search(r'href="(\?before=[^"]+)" rel="next"', first)
        assert older
        second = (await http.get("/" + older.group(1).replace("&amp;", "&"))).text
        assert "w04" in second and "w05" not in second and "data-live-url" not in second


async def test_run_page_graph_steps_log_ansi_and_escaping(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        run_id = await insert_run(conn, workflow_spec=WORKFLOW_SPEC, status="running", started_at=T0)
        build_a = await insert_job(conn, run_id, "build (a)", job="build", status="success", matrix={"x": "a"})
        await insert_job(conn, run_id, "build (b)", job="build", status="running", matrix={"x": "b"})
        await insert_job(conn, run_id, "deploy", status="pending")
        await conn.execute(sa.insert(schema.job_needs).values(run_id=run_id, job_name="deploy", upstream_name="build",
                                                               run_on=["success"]))
        await conn.execute(sa.insert(schema.steps).values(job_id=build_a, step_index=0, name="compile",
                                                           status="success", duration_ms=61_000))
    logs = services_of(dash.app).logs
    await logs.append(run_id, build_a, -1, ["cloning"], 0)
    await logs.append(run_id, build_a, 0, ["\x1b[31mred <b>\x1b[0m plain", "secret is ***"], 1)
    async with dash.session(AdminRole.VIEWER) as http:
        page = (await http.get(f"/runs/{run_id}", params={"job": "build (a)"})).text
    assert "build ×2" in page and 'class="edge"' in page  # matrix grouped, one needs edge
    assert "matrix, 2 jobs" in page and "compile" in page and "1m 1s" in page
    assert '<span class="a-fg1">red &lt;b&gt;</span> plain' in page
    assert "secret is ***" in page
    assert 'id="L2"' in page and "line=2#L2" in page
    assert "Set up job" in page and "1. compile" in page
    assert f"/runs/{run_id}/jobs/{build_a}/log.txt" in page


async def test_big_log_is_paged_searchable_and_downloadable(dash: Dash) -> None:
    run_id, job_id = await _seed_run(dash, status="success")
    logs = services_of(dash.app).logs
    total = 200_000
    for seq, start in enumerate(range(0, total, 50)):
        await logs.append(run_id, job_id, 0, [f"line {n + 1}" for n in range(start, start + 50)], seq)
    async with dash.session(AdminRole.VIEWER) as http:
        last = (await http.get(f"/runs/{run_id}")).text
        assert "Page 200 of 200" in last and 'id="L200000"' in last and 'id="L199000"' not in last
        assert last.count('class="ln"') == 1000
        middle = (await http.get(f"/runs/{run_id}", params={"job": "build", "line": 120_345})).text
        assert 'id="L120345"' in middle and "Page 121 of 200" in middle and middle.count('class="ln"') == 1000
        assert 'id="L120001"' in middle and 'id="L121000"' in middle and 'id="L121001"' not in middle
        found = (await http.get(f"/runs/{run_id}", params={"job": "build", "q": "LINE 19999"})).text
        assert "11 matching lines" in found and "line=199990#L199990" in found
        raw = await http.get(f"/runs/{run_id}/jobs/{job_id}/log.txt")
        assert raw.headers["content-disposition"].startswith("attachment;")
        lines = raw.text.splitlines()
        assert len(lines) == total and lines[0] == "line 1" and lines[-1] == "line 200000"


async def test_live_log_streams_rendered_lines_and_ends(dash: Dash) -> None:
    run_id, job_id = await _seed_run(dash)
    logs = services_of(dash.app).logs
    await logs.append(run_id, job_id, 0, ["first <x>"], 0)
    async with dash.database.transaction() as conn:
        await conn.execute(sa.update(schema.jobs).where(schema.jobs.c.id == job_id).values(status="success"))
    async with dash.session(AdminRole.VIEWER) as http:
        response = await http.get(f"/runs/{run_id}/jobs/{job_id}/live", params={"after": 0})
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert "event: lines" in body and "first &lt;x&gt;" in body and body.rstrip().endswith("event: end\ndata:")
    cursor = re.search(r"^id: (\d+)$", body, re.M)
    assert cursor and int(cursor.group(1)) > 0


async def test_sources_page_shows_no_secret(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        await create_source(conn, key=b"k" * 32, name="hooks", kind="generic",
                            config={"auth": "hmac_sha256"}, secrets={"hmac_secret": "TOPSECRET-value-123"})
    async with dash.session(AdminRole.AUDITOR) as http:
        page = (await http.get("/sources")).text
    assert "hooks" in page and "hmac_secret" in page and "TOPSECRET" not in page


async def test_public_mode_reads_without_session_but_acts_with_one(public_dash: Dash) -> None:
    run_id, _ = await _seed_run(public_dash)
    async with public_dash.client() as http:
        page = await http.get(f"/runs/{run_id}")
        assert page.status_code == 200 and "anonymous · read-only" in page.text and 'id="cancel"' not in page.text
        assert (await http.get("/sources")).status_code == 303
        assert (await http.post(f"/runs/{run_id}/cancel")).status_code == 401
    async with public_dash.session(AdminRole.OWNER) as http:
        assert 'id="cancel"' in (await http.get(f"/runs/{run_id}")).text


async def test_under_a_base_path(database: Database, tmp_path: Path) -> None:
    app, made = await _make_app(database, tmp_path, base_path="/ci")
    try:
        run_id, job_id = await _seed_run(made)
        async with database.transaction() as conn:
            await conn.execute(sa.update(schema.jobs).where(schema.jobs.c.id == job_id)
                               .values(outputs={"greet": {"greeting": "hi"}}))
        async with made.client() as http:
            response = await http.get(f"/ci/runs/{run_id}")
            assert response.status_code == 303
            assert response.headers["location"] == f"/ci/login?next=%2Fci%2Fruns%2F{run_id}"
            page = await http.get("/ci/login")
            assert 'href="/ci/static/app.css' in page.text and 'action="/ci/login"' in page.text
            signed = await http.post("/ci/login", data={"token": made.tokens[AdminRole.VIEWER],
                                                        "csrf_token": _hidden(page.text, "csrf_token"),
                                                        "next": f"/ci/runs/{run_id}"})
            assert signed.headers["location"] == f"/ci/runs/{run_id}"
            cookie = next(h for h in signed.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
            assert "Path=/ci" in cookie
            run_page = (await http.get(f"/ci/runs/{run_id}")).text
            assert 'href="/ci/agents"' in run_page and f"/ci/runs/{run_id}/jobs/{job_id}/log.txt" in run_page
            assert "Outputs of build" in run_page and "greeting" in run_page
            assert (await http.get("/ci/static/app.js")).status_code == 200
            assert (await http.get("/")).status_code == 404
    finally:
        await services_of(app).logs.close()


async def test_run_that_failed_before_it_had_jobs(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        run_id = await insert_run(conn, status="failed", failure_reason="lock_resolution: <bad> lock file")
    async with dash.session(AdminRole.VIEWER) as http:
        page = await http.get(f"/runs/{run_id}")
        assert page.status_code == 200
        assert "lock_resolution: &lt;bad&gt; lock file" in page.text and 'id="log"' not in page.text
        assert (await http.get("/runs/nope")).status_code == 404


async def test_agents_page_lists_busy_jobs(dash: Dash) -> None:
    run_id, job_id = await _seed_run(dash)
    async with dash.database.transaction() as conn:
        await conn.execute(sa.insert(schema.agents).values(id="linux-1", labels=["linux", "<x>"], max_concurrency=2,
                                                           version="9.9", hostname="box", connected=True,
                                                           last_seen_at=T0, registered_at=T0))
        await conn.execute(sa.update(schema.jobs).where(schema.jobs.c.id == job_id).values(agent_id="linux-1"))
    async with dash.session(AdminRole.VIEWER) as http:
        page = (await http.get("/agents")).text
    assert "linux-1" in page and "&lt;x&gt;" in page and "1 / 2" in page and "9.9" in page
    assert f'href="/runs/{run_id}?job=build"' in page


async def test_schedules_page(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        source = await create_source(conn, key=b"k" * 32, name="hooks", kind="generic", config={}, secrets={})
        await schedule_store.replace_registrations(
            conn, source_id=source.id, repo="acme/<app>", branch="main", lock_commit="f" * 40,
            registrations=[schedule_store.Registration("nightly", 0, "0 3 * * *", "Europe/Berlin", {}),
                           schedule_store.Registration("hourly", 1, "5 * * * *", "UTC", {})],
            next_fire=lambda cron, tz, after: T0 + dt.timedelta(hours=1), now=T0,
        )
        [nightly] = [s for s in await schedule_store.list_schedules(conn) if s.workflow == "nightly"]
        run_id = await insert_run(conn, workflow="nightly", repo="acme/<app>",
                                  event={"type": "schedule", "branch": "main"}, trigger="schedule")
        assert await schedule_store.claim_fire(conn, nightly.id, seen=nightly.next_fire_at, slot=T0,
                                               next_at=T0 + dt.timedelta(days=1))
        await schedule_store.set_last_run(conn, nightly.id, run_id)
    async with dash.session(AdminRole.VIEWER) as http:
        page = await http.get("/schedules")
    assert page.status_code == 200
    html = page.text
    assert "acme/&lt;app&gt;" in html and "acme/<app>" not in html
    assert "<code>0 3 * * *</code>" in html and "Europe/Berlin" in html and "<code>5 * * * *</code>" in html
    assert f'href="/runs/{run_id}">last run</a>' in html and "never" in html  # hourly has not fired
    assert 'datetime="2026-11-28T08:00:00Z"' in html  # nightly's next fire (moved on by a day)
    assert 'datetime="2026-11-27T08:00:00Z"' in html  # its last fire
    assert "hooks" in html and "ffffffff" in html
    assert "trigger=schedule" in html and "workflow=nightly" in html
    assert html.count("data-schedule=") == 2


async def test_schedules_page_empty(dash: Dash) -> None:
    async with dash.session(AdminRole.VIEWER) as http:
        page = await http.get("/schedules")
    assert page.status_code == 200 and "No schedule is registered." in page.text


async def test_wait_reasons_on_the_runs_list_and_run_page(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        run_id = await insert_run(conn, workflow_spec=WORKFLOW_SPEC, status="pending", workflow="deploy",
                                  wait_reason="concurrency: prod <eu>")
        await insert_job(conn, run_id, "ship", status="pending", wait_reason="concurrency: ship-lock")
        running = await insert_run(conn, workflow="other", status="running", wait_reason=None)
    async with dash.session(AdminRole.VIEWER) as http:
        listing = (await http.get("/")).text
        fragment = (await http.get("/", params={"fragment": "rows"})).text
        page = (await http.get(f"/runs/{run_id}")).text
    for html in (listing, fragment):
        assert "waiting (concurrency: prod &lt;eu&gt;)" in html
        row = re.search(rf'<tr data-run="{running}">.*?</tr>', html, re.S)
        assert row and ">running<" in row.group(0) and "waiting" not in row.group(0)
    assert "waiting (concurrency: prod &lt;eu&gt;)" in page  # the run's header
    assert "waiting (concurrency: ship-lock)" in page  # the job's row and graph node


async def test_agents_page_shows_draining_agents(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        for agent_id, connected, draining in (("drainer", True, True), ("worker", True, False),
                                              ("gone", False, True)):
            await conn.execute(sa.insert(schema.agents).values(
                id=agent_id, labels=["linux"], max_concurrency=1, connected=connected, draining=draining,
                last_seen_at=T0, registered_at=T0))
    async with dash.session(AdminRole.VIEWER) as http:
        page = (await http.get("/agents")).text
    states = dict(re.findall(r'<code title="([^"]+)">.*?<span class="badge [^"]+"[^>]*>([a-z]+)</span>', page, re.S))
    assert states == {"drainer": "draining", "worker": "connected", "gone": "disconnected"}


async def test_queue_page_lists_jobs_waiting_for_a_concurrency_group(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        run_id = await insert_run(conn, workflow="deploy", repo="acme/app", status="running")
        await insert_job(conn, run_id, "ship (eu)", job="ship", status="waiting", wait_reason="concurrency: prod <1>")
        await insert_job(conn, run_id, "lint", status="success")
    async with dash.session(AdminRole.VIEWER) as http:
        page = (await http.get("/queue")).text
    rows = re.search(r'<tbody id="waiting-rows">(.*?)</tbody>', page, re.S)
    assert rows and rows.group(1).count("<tr>") == 1
    waiting = rows.group(1)
    assert f'href="/runs/{run_id}?job=ship+%28eu%29"' in waiting and "deploy · acme/app" in waiting
    assert "waiting (concurrency: prod &lt;1&gt;)" in waiting and "group prod &lt;1&gt;" in waiting
    assert "lint" not in waiting


async def test_queue_page_says_a_job_waits_for_its_environment(dash: Dash) -> None:
    async with dash.database.transaction() as conn:
        run_id = await insert_run(conn, workflow="deploy", repo="acme/app", status="running")
        await insert_job(conn, run_id, "ship", status="waiting",
                         wait_reason="environment: production, needs 1 approval")
    async with dash.session(AdminRole.VIEWER) as http:
        page = (await http.get("/queue")).text
        run_page = (await http.get(f"/runs/{run_id}")).text
    rows = re.search(r'<tbody id="waiting-rows">(.*?)</tbody>', page, re.S)
    assert rows and "<td>environment: production, needs 1 approval</td>" in rows.group(1)
    assert "concurrency group" not in rows.group(1)
    assert "waiting (environment: production, needs 1 approval)" in run_page


async def test_run_page_reports_and_retry(dash: Dash) -> None:
    run_id, job_id = await _seed_run(dash, status="failed")
    await _seed_report(dash, run_id, job_id, status="sent")
    failed = await _seed_report(dash, run_id, None, status="failed", kind="notification", error="HTTP 500 <boom>",
                                target="https://hooks.chat.example/services/T0/B0/SECRETXYZ?token=abc")
    other_run, other_job = await _seed_run(dash, status="success")
    foreign = await _seed_report(dash, other_run, other_job, status="failed")
    async with dash.session(AdminRole.VIEWER) as http:
        assert 'id="reports-h"' not in (await http.get(f"/runs/{run_id}")).text  # reports:read only
    async with dash.session(AdminRole.AUDITOR) as http:
        page = (await http.get(f"/runs/{run_id}")).text
        assert 'id="reports-h"' in page and "check run" in page and "notification" in page
        assert "https://hooks.chat.example" in page and "SECRETXYZ" not in page and "token=abc" not in page
        assert "HTTP 500 &lt;boom&gt;" in page and ">Retry<" not in page
    async with dash.session(AdminRole.ADMIN) as http:
        page = (await http.get(f"/runs/{run_id}")).text
        assert page.count(">Retry<") == 1 and f"/reports/{failed}/retry" in page
        csrf = _hidden(page, "csrf_token")
        assert (await http.post(f"/runs/{run_id}/reports/{failed}/retry")).status_code == 403  # no CSRF token
        elsewhere = await http.post(f"/runs/{run_id}/reports/{foreign}/retry", data={"csrf_token": csrf})
        assert elsewhere.status_code == 404
        response = await http.post(f"/runs/{run_id}/reports/{failed}/retry", data={"csrf_token": csrf})
        assert response.status_code == 303 and "notice=report-retried" in response.headers["location"]
        again = await http.post(f"/runs/{run_id}/reports/{failed}/retry", data={"csrf_token": csrf})
        assert again.status_code == 409 and "only a failed report can be retried" in again.text
    async with dash.database.read() as conn:
        statuses = dict((await conn.execute(sa.select(schema.report_outbox.c.id, schema.report_outbox.c.status))).all())
        retried = await audit.list_audit(conn, outcome="allowed", limit=10)
    assert statuses[failed] == "pending" and statuses[foreign] == "failed"
    assert [(e.action, e.reason) for e in retried if e.action != "dashboard.login"] == [
        ("report.retry", f"report {failed}")]


async def test_a_held_run_page_says_why_it_is_held(public_dash: Dash) -> None:
    reason = "pull request #2 from fork alice/app by alice (CONTRIBUTOR): held for approval"
    run_id, _ = await _seed_run(public_dash, status="held", trust="untrusted", secrets_allowed=False,
                                hold_reason=reason, hold_expires_at=T0 + dt.timedelta(hours=72))
    approved_id, _ = await _seed_run(public_dash, status="running", trust="approved", secrets_allowed=False,
                                     hold_reason=reason)
    async with public_dash.client() as http:
        page = await http.get(f"/runs/{run_id}")
        approved = await http.get(f"/runs/{approved_id}")
    assert page.status_code == 200
    assert f'<p class="held" id="hold-reason">held: {reason} · expires' in page.text
    assert f"kici-admin held approve {run_id}" in page.text
    assert 'id="hold-reason"' not in approved.text  # no longer held
    assert "Untrusted code, approved at this commit (no secrets)" in approved.text


async def test_run_page_shows_a_job_s_tests_and_failures_escaped(dash: Dash) -> None:
    report = parse_junit(io.BytesIO(
        b'<testsuite><testcase classname="t" name="test_ok"/><testcase classname="t" name="test_&lt;b&gt;">'
        b'<failure message="expected &lt;script&gt;">tb</failure></testcase></testsuite>'), max_bytes=10_000)
    run_id, job_id = await _seed_run(dash, status="failed")
    async with dash.database.transaction() as conn:
        await report_store.replace_report_file(
            conn, file_id=schema.new_id(), org_id="default", run_id=run_id, job_id=job_id, path="r.xml", size=1,
            sha256=None, blob_key=None, report=report, error=None)
        await report_store.replace_report_file(
            conn, file_id=schema.new_id(), org_id="default", run_id=run_id, job_id=job_id, path="bad.xml", size=1,
            sha256=None, blob_key=None, report=None, error="not well-formed XML")
    async with dash.session(AdminRole.VIEWER) as http:
        page = (await http.get(f"/runs/{run_id}", params={"job": "build"})).text
        fragment = (await http.get(f"/runs/{run_id}", params={"job": "build", "fragment": "jobs"})).text
    assert "Tests of build" in page and "1 passed, 1 failed" in page
    assert "2 tests in 2 report files" in page and "1 file not read" in page
    assert "<code>t::test_&lt;b&gt;</code>" in page and "expected &lt;script&gt;" in page
    assert "<script>" not in page.split("expected", 1)[1][:40]
    assert 'id="failing-tests"' in fragment  # the live part of the page keeps them
    async with dash.database.transaction() as conn:
        other = await insert_job(conn, run_id, "lint", status="success")
    async with dash.session(AdminRole.VIEWER) as http:
        quiet = (await http.get(f"/runs/{run_id}", params={"job": "lint"})).text
    assert other and "Tests of" not in quiet
