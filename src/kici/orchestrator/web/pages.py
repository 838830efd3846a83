"""The dashboard's pages and actions (server-rendered, Jinja2) under `KICI_BASE_PATH`.

Every page reads through the admin REST API's own functions (`find_runs_page`, the route functions of
agents, queue, sources and audit) or the same store calls, and every action calls the REST route function
itself after the same permission check, so the dashboard cannot show or do anything the API would not.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from kici.engine.states import RunStatus, is_run_terminal, is_terminal
from kici.orchestrator.audit_trail import client_of
from kici.orchestrator.auth import AdminError, Permission
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.db.schema import AuditOutcome
from kici.orchestrator.logs import log_event
from kici.orchestrator.routes import (
    admin_agents,
    admin_audit,
    admin_queue,
    admin_reports,
    admin_runs,
    admin_schedules,
    admin_sources,
)
from kici.orchestrator.storage.logs import LogLineOut
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import audit, outbox, runs, sessions, tokens
from kici.orchestrator.store import test_reports as report_store
from kici.orchestrator.store.runs import JobRecord, RunRecord, StepRecord
from kici.orchestrator.web import graph as job_graph
from kici.orchestrator.web.access import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    LoginRequired,
    Viewer,
    check_csrf,
    cookie_path,
    current_viewer,
    is_https,
    new_login_csrf,
    require_viewer,
)
from kici.orchestrator.web.ansi import ansi_to_html

HERE = Path(__file__).parent
LOG_PAGE_LINES = 1000
"""Lines per log page: what the browser holds in its DOM at once, whatever the log's length."""
SEARCH_LIMIT = 200
LIVE_STATUS_EVERY_S = 1.0
LIVE_MAX_S = 3600.0
"""A stream ends after this long; the browser's EventSource reconnects from its last cursor."""
RUNS_PAGE_SIZE = 50
REPORTS_LIMIT = 100
FAILING_TESTS_SHOWN = 50
"""Failing tests listed under a job's steps; `kici-admin runs tests RUN_ID --failed` has them all."""
"""A run's reports shown on its page (check-run updates and notifications; newest first)."""

State = Annotated[AppState, Depends(app_state)]

_env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _short(value: str | None, n: int = 8) -> str:
    return (value or "")[:n]


def _duration(start: dt.datetime | None, end: dt.datetime | None) -> str:
    if start is None:
        return ""
    seconds = int(((end or dt.datetime.now(dt.UTC)) - start).total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


def _ms(value: int | None) -> str:
    return "" if value is None else _duration(dt.datetime.fromtimestamp(0, dt.UTC),
                                              dt.datetime.fromtimestamp(value / 1000, dt.UTC))


def _time(value: dt.datetime | None) -> Markup:
    """A <time> the page's script shows in the viewer's zone; the absolute UTC time stays on hover."""
    if value is None:
        return Markup("")
    utc = value.astimezone(dt.UTC)
    iso = utc.isoformat(timespec="seconds").replace("+00:00", "Z")
    text = utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{0}" title="{1}">{1}</time>').format(iso, text)


def _url_origin(url: str | None) -> str:
    """Only the scheme and host of a notification URL: its path or query often is the receiver's secret
    (chat webhooks), and the dashboard renders no secret."""
    if not url:
        return ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


_env.filters.update(short=_short, when=_time, ms=_ms, origin=_url_origin)
_env.globals.update(duration=_duration, Permission=Permission)


def _commit_message(run: RunRecord) -> str | None:
    payload = run.event.get("payload") or {}
    head = payload.get("head_commit") if isinstance(payload, dict) else None
    message = head.get("message") if isinstance(head, dict) else None
    if message is None and isinstance(payload, dict):
        pr = payload.get("pull_request")
        message = pr.get("title") if isinstance(pr, dict) else None
    return str(message).splitlines()[0][:120] if message else None


_env.globals.update(commit_message=_commit_message, status_text=job_graph.status_text)


class PageRoute(APIRoute):
    """Dashboard routes answer errors as HTML pages, and send signed-out visitors to `/login`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                state: AppState = request.app.state.kici
                if request.method != "GET" or request.headers.get("accept") == "text/event-stream" or (
                    "fragment" in request.query_params
                ):
                    return PlainTextResponse("sign in first", status_code=401)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(
                    f"{state.settings.base_path}/login?{urlencode({'next': target})}", status_code=303
                )
            except HTTPException as exc:
                message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
                viewer = await current_viewer(request, request.app.state.kici)
                return _render(request, "error.html", viewer, status_code=exc.status_code,
                               status=exc.status_code, message=message)

        return page_handler


router = APIRouter(route_class=PageRoute, include_in_schema=False)


def _render(request: Request, template: str, viewer: Viewer | None, *, status_code: int = 200,
            **context: Any) -> HTMLResponse:
    state: AppState = request.app.state.kici
    html = _env.get_template(template).render(
        base=state.settings.base_path, viewer=viewer, csrf_field=CSRF_FIELD, version=state.version,
        path=request.url.path, **context,
    )
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


# -- sign-in ----------------------------------------------------------------------------------------


def _safe_next(state: AppState, target: str | None) -> str:
    """Only a path on this dashboard (no scheme, no other host) is followed after sign-in."""
    base = state.settings.base_path
    if (
        target
        and target.startswith((base + "/") if base else "/")
        and not target.startswith("//")
        and "\\" not in target
        and not any(ord(c) < 32 or ord(c) == 127 for c in target)  # browsers drop tabs: "/\t/evil" → "//evil"
    ):
        return target
    return base + "/"


@router.get("/login")
async def login_page(request: Request, state: State, next: str | None = None) -> Response:
    token = new_login_csrf()
    response = _render(request, "login.html", None, login_csrf=token, next=_safe_next(state, next), error=None)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax", secure=is_https(request),
                        path=cookie_path(state), max_age=3600)
    return response


async def _form(request: Request) -> dict[str, str]:
    """The fields of a urlencoded form post (the only kind the dashboard's forms send); first value wins."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", "application/x-www-form-urlencoded"):
        raise HTTPException(415, "send the form as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > 64 * 1024:
        raise HTTPException(413, "form too large")
    fields: dict[str, str] = {}
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        fields.setdefault(key, value)
    return fields


@router.post("/login")
async def login(request: Request, state: State) -> Response:
    form = await _form(request)
    token, csrf_token, next = form.get("token", ""), form.get(CSRF_FIELD, ""), form.get("next", "")
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not csrf_token or cookie != csrf_token:
        raise HTTPException(403, "missing or invalid CSRF token; reload the sign-in page and try again")
    plaintext = token.strip()
    async with state.database.transaction() as conn:
        found = await tokens.verify_admin_token(conn, plaintext, touch=True) if plaintext else None
        client = client_of(request)
        if found is None:
            denial: dict[str, Any] = {"status": 401, "reason": "unknown_or_revoked_token", "method": "POST",
                                      "path": request.url.path, "client": client}
            window = state.settings.audit_denial_window_seconds
            if window > 0:  # anyone can post here: counted per client and window, not a row each
                await audit.record_aggregated(conn, action="dashboard.login", window_s=window, **denial)
            else:
                await audit.record(conn, action="dashboard.login", outcome=AuditOutcome.DENIED, **denial)
        else:
            await sessions.delete_expired_sessions(conn)
            secret, session = await sessions.create_session(
                conn, found, ttl=dt.timedelta(seconds=state.settings.dashboard_session_ttl_seconds),
                client=client, user_agent=request.headers.get("user-agent"),
            )
            await audit.record(conn, action="dashboard.login", outcome=AuditOutcome.ALLOWED, org_id=found.org_id,
                               status=303, token_id=found.id, role=found.role.value, method="POST",
                               path=request.url.path, client=client, actor=f"token:{found.id}",
                               target=f"session:{session.id}", reason=f"signed in as {found.name!r}")
    if found is None:
        log_event("dashboard.login_denied", level="warning", client=client)
        fresh = new_login_csrf()
        response = _render(request, "login.html", None, status_code=401, login_csrf=fresh,
                           next=_safe_next(state, next), error="That token is unknown or revoked.")
        response.set_cookie(LOGIN_CSRF_COOKIE, fresh, httponly=True, samesite="lax", secure=is_https(request),
                            path=cookie_path(state), max_age=3600)
        return response
    log_event("dashboard.login", token_id=found.id, session_id=session.id, client=client)
    redirect = RedirectResponse(_safe_next(state, next), status_code=303)
    redirect.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="lax", secure=is_https(request),
                        path=cookie_path(state), max_age=state.settings.dashboard_session_ttl_seconds)
    redirect.delete_cookie(LOGIN_CSRF_COOKIE, path=cookie_path(state))
    return redirect


@router.post("/logout")
async def logout(request: Request, state: State) -> Response:
    csrf_token = (await _form(request)).get(CSRF_FIELD, "")
    viewer = await current_viewer(request, state)
    if viewer is None or not viewer.signed_in or viewer.session_secret is None:
        raise LoginRequired()
    await check_csrf(request, viewer, csrf_token)
    async with state.database.transaction() as conn:
        if await sessions.revoke_session(conn, viewer.session_secret):
            token = viewer.principal.token
            await audit.record(conn, action="dashboard.logout", outcome=AuditOutcome.ALLOWED, org_id=token.org_id,
                               status=303, token_id=token.id, role=token.role.value, method="POST",
                               path=request.url.path, client=client_of(request),
                               actor=f"token:{token.id}", target=f"token:{token.id}", reason="signed out")
    response = RedirectResponse(f"{state.settings.base_path}/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=cookie_path(state))
    return response


# -- runs -------------------------------------------------------------------------------------------


def _runs_query(request: Request) -> admin_runs.RunQuery:
    q = request.query_params
    return admin_runs.RunQuery(
        status=q.get("status") or None, repo=q.get("repo") or None, workflow=q.get("workflow") or None,
        branch=q.get("branch") or None, sha=q.get("sha") or None, source=q.get("source") or None,
        trigger=q.get("trigger") or None, before=q.get("before") or None, limit=RUNS_PAGE_SIZE,
    )


@router.get("/")
async def runs_page(request: Request, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.RUNS_READ)
    query = _runs_query(request)
    try:
        page = await admin_runs.find_runs_page(state, viewer.principal.token.org_id, query)
    except AdminError as exc:
        raise HTTPException(422, str(exc.detail)) from None
    filters = query.model_dump(exclude={"before", "limit"}, exclude_none=True)
    next_url = "?" + urlencode({**filters, "before": page.next}) if page.next else None
    context: dict[str, Any] = dict(runs=page.runs, filters=filters, next_url=next_url, paged=query.before is not None,
                   statuses=[s.value for s in RunStatus])
    if request.query_params.get("fragment") == "rows":
        return _render(request, "_runs_rows.html", viewer, **context)
    return _render(request, "runs.html", viewer, **context)


async def _run_of(state: AppState, viewer: Viewer, run_id: str) -> RunRecord:
    async with state.database.read() as conn:
        run = await runs.get_run(conn, run_id)
    if run is None or run.org_id != viewer.principal.token.org_id:
        raise HTTPException(404, f"no run with id {run_id!r}")
    return run


def _pick_job(jobs: list[JobRecord], wanted: str | None) -> JobRecord | None:
    if wanted:
        return next((j for j in jobs if wanted in (j.id, j.name)), None)
    # the first failed job, else the first running one, else the first
    return next((j for j in jobs if j.status == "failed"), None) or next(
        (j for j in jobs if not is_terminal(j.status)), None) or (jobs[0] if jobs else None)


class LogView:
    """One page of a job's log, rendered: step headers, numbered lines, and where the live stream resumes."""

    def __init__(self, lines: list[LogLineOut], steps: list[StepRecord], *, page: int, pages: int, total: int,
                 cursor: int, first_step: int | None) -> None:
        self.page, self.pages, self.total, self.cursor = page, pages, total, cursor
        names = {s.step_index: s.name for s in steps}
        self.rows: list[tuple[str, Any]] = []
        current = first_step
        for line in lines:
            if line.step != current:
                self.rows.append(("step", _step_title(line.step, names)))
                current = line.step
            self.rows.append(("line", (line.n, Markup(ansi_to_html(line.line)))))  # escaped by ansi_to_html
        self.last_step = current
        self.last_line = lines[-1].n if lines else 0


def _step_title(step: int, names: dict[int, str]) -> str:
    return "Set up job" if step < 0 else f"{step + 1}. {names.get(step, f'step {step + 1}')}"


async def _log_view(request: Request, run: RunRecord, job: JobRecord, steps: list[StepRecord],
                    page: int | None, line: int | None) -> LogView:
    logs = services_of(request.app).logs
    total = await logs.line_count(run.id, job.id)
    pages = max(1, -(-total // LOG_PAGE_LINES))
    if line is not None:
        page = (max(1, line) - 1) // LOG_PAGE_LINES + 1
    page = pages if page is None else max(1, min(page, pages))
    first = (page - 1) * LOG_PAGE_LINES + 1
    last = page * LOG_PAGE_LINES
    cursor = await logs.seek_line(run.id, job.id, first)
    lines: list[LogLineOut] = []
    while True:
        chunk = await logs.read(run.id, job.id, after=cursor, limit=LOG_PAGE_LINES + 100)
        lines.extend(x for x in chunk.lines if first <= x.n <= last)
        if not chunk.lines or chunk.lines[-1].n > last or chunk.at_end:
            if chunk.lines and chunk.lines[-1].n <= last:
                cursor = chunk.next
            break
        cursor = chunk.next
    # every page opens with the header of the step its first line belongs to
    return LogView(lines, steps, page=page, pages=pages, total=total, cursor=cursor, first_step=None)


@router.get("/runs/{run_id}")
async def run_page(request: Request, run_id: str, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.RUNS_READ)
    run = await _run_of(state, viewer, run_id)
    q = request.query_params
    async with state.database.read() as conn:
        jobs = await runs.list_jobs(conn, run.id)
        needs = await runs.list_needs(conn, run.id)
        job = _pick_job(jobs, q.get("job"))
        steps = await runs.list_steps(conn, job.id) if job is not None else []
        tests = await report_store.job_summary(conn, run.id, job.id) if job is not None else None
        failures = (await report_store.job_failures(conn, job.id, limit=FAILING_TESTS_SHOWN)
                    if job is not None and tests is not None and (tests.failed or tests.errors) else [])
    graph = job_graph.build_graph(jobs, needs)
    context: dict[str, Any] = dict(run=run, jobs=jobs, job=job, steps=steps, graph=graph, jg=job_graph,
                                   live=not is_run_terminal(run.status), notice=q.get("notice"),
                                   tests=tests, failures=failures)
    if q.get("fragment") == "jobs":
        return _render(request, "_run_jobs.html", viewer, **context)
    log: LogView | None = None
    matches: list[tuple[int, str]] | None = None
    more_matches = False
    search = (q.get("q") or "").strip()
    if job is not None:
        if search:
            found, more_matches = await services_of(request.app).logs.search(run.id, job.id, search,
                                                                                limit=SEARCH_LIMIT)
            matches = [(x.n, Markup(ansi_to_html(x.line))) for x in found]  # escaped by ansi_to_html
        else:
            log = await _log_view(request, run, job, steps, _int(q.get("page")), _int(q.get("line")))
    reports = None
    if viewer.can(Permission.REPORTS_READ):  # as GET /api/v1/admin/reports?run_id=
        reports = await admin_reports.list_reports(state, viewer.principal, None, run.id, REPORTS_LIMIT)
    context.update(log=log, matches=matches, more_matches=more_matches, search=search,
                   job_live=job is not None and not is_terminal(job.status), reports=reports,
                   job_names={j.id: j.name for j in jobs})
    return _render(request, "run.html", viewer, **context)


def _int(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise HTTPException(422, f"not a number: {value[:20]!r}") from None


async def _job_of(state: AppState, run: RunRecord, job: str) -> JobRecord:
    async with state.database.read() as conn:
        found = next((j for j in await runs.list_jobs(conn, run.id) if job in (j.id, j.name)), None)
    if found is None:
        raise HTTPException(404, f"run {run.id} has no job {job!r}")
    return found


@router.get("/runs/{run_id}/jobs/{job}/log.txt")
async def raw_log(request: Request, run_id: str, job: str, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.RUNS_READ)
    run = await _run_of(state, viewer, run_id)
    found = await _job_of(state, run, job)
    logs = services_of(request.app).logs

    async def body() -> AsyncIterator[bytes]:
        cursor = 0
        while True:
            page = await logs.read(run.id, found.id, after=cursor, limit=5000)
            if page.lines:
                yield ("\n".join(x.line for x in page.lines) + "\n").encode("utf-8")
            if page.at_end or not page.lines:
                return
            cursor = page.next

    name = f"{run.workflow}-{found.name}-{run.id[:8]}.log".replace(" ", "_").replace("/", "_")
    safe = "".join(c for c in name if c.isalnum() or c in "._-()=,")
    return StreamingResponse(body(), media_type="text/plain; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{safe}"'})


@router.get("/runs/{run_id}/jobs/{job}/live")
async def live_log(request: Request, run_id: str, job: str, state: State) -> Response:
    """Server-sent events: `event: lines` with rendered rows (`id:` = the storage cursor, so a reconnecting
    EventSource resumes with `Last-Event-ID`), `event: end` once the job finished and its log is read."""
    viewer = await require_viewer(request, state, Permission.RUNS_READ)
    run = await _run_of(state, viewer, run_id)
    found = await _job_of(state, run, job)
    logs = services_of(request.app).logs
    start = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    cursor = _int(start) or 0
    step = _int(request.query_params.get("step"))
    # the last line number the page already shows (the cursor may point at the chunk holding it)
    shown = _int(request.query_params.get("shown")) or 0
    async with state.database.read() as conn:
        steps = await runs.list_steps(conn, found.id)
    template = _env.get_template("_log_rows.html")

    async def events() -> AsyncIterator[str]:
        nonlocal cursor, step, steps, shown
        started = time.monotonic()
        checked = 0.0
        finished = is_terminal(found.status)
        yield "retry: 1000\n\n"
        while time.monotonic() - started < LIVE_MAX_S:
            watched = logs.watch(found.id)  # before the read: lines stored after it wake the wait below
            page = await logs.read(run.id, found.id, after=cursor, limit=1000)
            fresh = [x for x in page.lines if x.n > shown]
            if not fresh and page.lines:
                cursor = page.next
                continue
            if fresh:
                shown = fresh[-1].n
                if any(x.step not in {s.step_index for s in steps} and x.step >= 0 for x in fresh):
                    async with state.database.read() as conn:
                        steps = await runs.list_steps(conn, found.id)
                view = LogView(fresh, steps, page=0, pages=0, total=0, cursor=page.next, first_step=step)
                step = view.last_step
                html = template.render(log=view, link_base="?" + urlencode({"job": found.name}))
                cursor = page.next
                data = "".join(f"data: {part}\n" for part in html.splitlines() or [""])
                yield f"id: {cursor}\nevent: lines\n{data}\n"
                continue
            if finished and page.at_end:
                yield "event: end\ndata: \n\n"
                return
            if await request.is_disconnected():
                return
            now = time.monotonic()
            if now - checked >= LIVE_STATUS_EVERY_S:
                checked = now
                async with state.database.read() as conn:
                    current = await runs.get_job(conn, found.id)
                finished = current is None or is_terminal(current.status)
                if finished:
                    continue  # read once more: lines written just before the job finished
            # woken at once by lines stored here or (through the cluster bus) on another node; the poll
            # covers a lost wake-up
            await logs.wait_for_data(found.id, timeout=state.settings.log_follow_poll_ms / 1000, event=watched)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _action(request: Request, state: AppState, run_id: str, permission: Permission,
                  csrf_token: str) -> tuple[Viewer, RunRecord]:
    viewer = await require_viewer(request, state, permission)
    await check_csrf(request, viewer, csrf_token)
    return viewer, await _run_of(state, viewer, run_id)


@router.post("/runs/{run_id}/cancel")
async def cancel(request: Request, run_id: str, state: State) -> Response:
    form = await _form(request)
    csrf_token, force = form.get(CSRF_FIELD, ""), form.get("force", "")
    viewer, run = await _action(request, state, run_id, Permission.RUNS_CANCEL, csrf_token)
    try:
        await admin_runs.cancel_run(run.id, request, state, viewer.principal,
                                    admin_runs.CancelRequest(force=force == "true"))
    except AdminError as exc:
        raise HTTPException(exc.status_code, str(exc.detail)) from None
    notice = "force-cancel-requested" if force == "true" else "cancel-requested"
    return RedirectResponse(f"{state.settings.base_path}/runs/{run.id}?notice={notice}", status_code=303)


@router.post("/runs/{run_id}/rerun")
async def rerun(request: Request, run_id: str, state: State) -> Response:
    csrf_token = (await _form(request)).get(CSRF_FIELD, "")
    viewer, run = await _action(request, state, run_id, Permission.RUNS_RERUN, csrf_token)
    try:
        result = await admin_runs.rerun_run(run.id, request, state, viewer.principal)
    except AdminError as exc:
        raise HTTPException(exc.status_code, str(exc.detail)) from None
    return RedirectResponse(f"{state.settings.base_path}/runs/{result.run.id}?notice=rerun-started",
                            status_code=303)


@router.post("/runs/{run_id}/reports/{report_id}/retry")
async def retry_report(request: Request, run_id: str, report_id: int, state: State) -> Response:
    csrf_token = (await _form(request)).get(CSRF_FIELD, "")
    viewer, run = await _action(request, state, run_id, Permission.REPORTS_RETRY, csrf_token)
    async with state.database.read() as conn:
        found = await outbox.get_report(conn, report_id)
    if found is None or found.run_id != run.id:  # the run is the viewer's org's (checked by _action)
        raise HTTPException(404, f"run {run.id} has no report {report_id}")
    try:
        await admin_reports.retry_report(report_id, request, state, viewer.principal)
    except AdminError as exc:
        raise HTTPException(exc.status_code, str(exc.detail)) from None
    return RedirectResponse(f"{state.settings.base_path}/runs/{run.id}?notice=report-retried#reports-h",
                            status_code=303)


# -- agents, queue, sources, audit ------------------------------------------------------------------


@router.get("/agents")
async def agents_page(request: Request, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.AGENTS_READ)
    found = await admin_agents.list_agents(state, viewer.principal)
    async with state.database.read() as conn:
        busy = await agent_store.busy_jobs(conn, [a.id for a in found])
    return _render(request, "agents.html", viewer, agents=found, busy=busy)


def _why_waiting(entry: admin_queue.QueueEntry, agents: list[admin_agents.AgentInfo]) -> str:
    if entry.status != "pending":
        return f"{entry.status} on agent {entry.agent or '?'}"
    wanted = set(entry.runs_on_labels)
    excluded = set(entry.exclude_labels)
    fitting = [a for a in agents if a.connected and wanted <= set(a.labels) and not (excluded & set(a.labels))]
    if not fitting:
        labels = ", ".join(sorted(wanted)) or "(none)"
        return f"no connected agent has the labels {labels}"
    if all(a.running_jobs >= a.max_concurrency for a in fitting):
        return f"all {len(fitting)} matching agent(s) are busy"
    return "about to be dispatched"


@router.get("/queue")
async def queue_page(request: Request, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.QUEUE_READ)
    entries = await admin_queue.list_queue(state, viewer.principal, None, 500)
    agents = await admin_agents.list_agents(state, viewer.principal) if viewer.can(Permission.AGENTS_READ) else []
    rows = [(e, _why_waiting(e, agents)) for e in entries]
    async with state.database.read() as conn:
        waiting = await runs.list_waiting_jobs(conn, org_id=viewer.principal.token.org_id, limit=500)
    return _render(request, "queue.html", viewer, rows=rows, waiting=waiting)


@router.get("/sources")
async def sources_page(request: Request, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.SOURCES_READ)
    found = await admin_sources.list_sources(state, viewer.principal, None)
    return _render(request, "sources.html", viewer, sources=found)


@router.get("/schedules")
async def schedules_page(request: Request, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.RUNS_READ)  # as GET /api/v1/admin/schedules
    found = await admin_schedules.list_schedules(state, viewer.principal, None)
    return _render(request, "schedules.html", viewer, schedules=found)


@router.get("/audit")
async def audit_page(request: Request, state: State) -> Response:
    viewer = await require_viewer(request, state, Permission.AUDIT_READ)
    found = (await admin_audit.find_audit_page(state, viewer.principal, limit=200)).entries
    return _render(request, "audit.html", viewer, entries=found)
