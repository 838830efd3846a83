"""Runs: list (filters), show, jobs, cancel. Reads and the cancel itself are `kici.orchestrator.store.runs`."""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from kici.engine.states import RunStatus, is_terminal
from kici.orchestrator import reruns
from kici.orchestrator.audit_trail import record_mutation
from kici.orchestrator.auth import (
    ERROR_RESPONSES,
    AdminError,
    AdminRoute,
    ErrorResponse,
    Permission,
    Principal,
    require,
)
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.logs import log_context, log_event
from kici.orchestrator.store import runs, sources
from kici.orchestrator.store.runs import JobRecord, RunRecord, StepRecord
from kici.orchestrator.store.secret_deliveries import SecretDelivery, list_run_deliveries
from kici.orchestrator.store.test_reports import TestSummary, job_summaries

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
MAX_LIMIT = 500
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such run"}}


class RunInfo(BaseModel):
    id: str
    workflow: str
    status: str
    repo: str
    ref: str | None
    sha: str
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    delivery_id: str | None
    failure_reason: str | None
    cancelled_by: str | None
    original_run_id: str | None
    parent_run_id: str | None
    branch: str | None = Field(default=None, description="The event's branch (a PR's head branch)")
    trigger: str | None = Field(default=None, description="The event type (`push`, `pr`, `tag`, …)")
    cursor: str = Field(default="", description="Pass as `before` to list the runs older than this one")
    wait_reason: str | None = Field(
        default=None, description="Why a pending run waits, e.g. `concurrency: deploy-main`; null otherwise"
    )
    trust: str = Field(default="trusted", description="What the source's trust policy decided: `trusted`, "
                       "`untrusted` (held, or let run without secrets) or `approved`")
    secrets_allowed: bool = Field(default=True, description="Whether the run's jobs may receive declared secrets")
    hold_reason: str | None = Field(default=None, description="Why the trust policy held the run; null: never held")
    hold_expires_at: dt.datetime | None = Field(default=None, description="When a held run's hold expires")

    @classmethod
    def of(cls, run: RunRecord) -> RunInfo:
        return cls.model_validate(
            {**run.model_dump(include=set(cls.model_fields)), "cursor": runs.run_cursor(run)}
        )


class StepInfo(BaseModel):
    index: int = Field(description="0-based position of the step in its job")
    name: str
    status: str = Field(description="`running`, `success`, `failed`, `skipped`, … as the agent reported it")
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    duration_ms: int | None
    error: str | None

    @classmethod
    def of(cls, step: StepRecord) -> StepInfo:
        return cls(index=step.step_index, name=step.name, status=step.status, started_at=step.started_at,
                   finished_at=step.finished_at, duration_ms=step.duration_ms, error=step.error)


class DeliveredSecret(BaseModel):
    name: str
    scope: str = Field(description="The scope the value came from: `env:<environment>`, `repo:<owner/name>` or `org`")


class SecretDeliveryInfo(BaseModel):
    attempt: int = Field(description="The dispatch attempt the secrets were sent with")
    delivered_at: dt.datetime
    secrets: list[DeliveredSecret] = Field(description="By name; names and scopes only, never values")

    @classmethod
    def of(cls, delivery: SecretDelivery) -> SecretDeliveryInfo:
        return cls(attempt=delivery.attempt, delivered_at=delivery.created_at,
                   secrets=[DeliveredSecret(name=n, scope=s) for n, s in sorted(delivery.secrets.items())])


class JobInfo(BaseModel):
    id: str
    name: str = Field(description="Unique in the run: the lock file's job name plus any matrix suffix")
    job: str = Field(description="The job's name in the lock file")
    status: str
    agent: str | None = Field(description="Id of the agent the job was dispatched to")
    attempt: int
    matrix: dict[str, Any] | None
    error: str | None
    failure_category: str | None
    created_at: dt.datetime
    queued_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    wait_reason: str | None = Field(
        default=None, description="Why a `waiting` job waits, e.g. `concurrency: prod`; null otherwise"
    )
    environment: str | None = Field(
        default=None, description="The deployment environment the job deploys to (`environment=`), if any"
    )
    outputs: dict[str, Any] | None = Field(default=None, description="The job's outputs, once it has finished")
    steps: list[StepInfo] = Field(default_factory=list, description="The job's steps as its agent reported them")
    secret_deliveries: list[SecretDeliveryInfo] = Field(
        default_factory=list,
        description="Each dispatch that sent the job the secrets it declares, oldest first (never values)",
    )
    tests: TestSummary | None = Field(
        default=None,
        description="Totals of the JUnit reports the job sent (`test_reports=`); null when it sent none. "
        "The tests themselves: GET /runs/{run_id}/tests",
    )

    @classmethod
    def of(
        cls,
        job: JobRecord,
        steps: list[StepRecord] | None = None,
        deliveries: list[SecretDelivery] | None = None,
        tests: TestSummary | None = None,
    ) -> JobInfo:
        values = job.model_dump(include=set(cls.model_fields) - {"agent", "steps", "secret_deliveries", "tests"})
        return cls(**values, agent=job.agent_id, steps=[StepInfo.of(s) for s in steps or []],
                   secret_deliveries=[SecretDeliveryInfo.of(d) for d in deliveries or []], tests=tests)


class RunDetail(RunInfo):
    event: dict[str, Any] = Field(description="The normalized event that started the run")
    source_id: str | None
    lock_content_hash: str | None
    workflow_content_hash: str | None
    timeout_ms: int | None
    jobs: list[JobInfo] = Field(default_factory=list, description="The run's jobs in plan order, with their steps")

    @classmethod
    def of(cls, run: RunRecord, jobs: list[JobInfo] | None = None) -> RunDetail:
        return cls.model_validate(
            {**run.model_dump(include=set(cls.model_fields)), "jobs": jobs or [], "cursor": runs.run_cursor(run)}
        )


async def _jobs_with_steps(state: AppState, run_id: str) -> list[JobInfo]:
    async with state.database.read() as conn:
        found = await runs.list_jobs(conn, run_id)
        steps = await runs.list_run_steps(conn, run_id)
        deliveries: dict[str, list[SecretDelivery]] = {}
        for delivery in await list_run_deliveries(conn, run_id):
            deliveries.setdefault(delivery.job_id, []).append(delivery)
        tests = await job_summaries(conn, run_id)
    return [JobInfo.of(j, steps.get(j.id), deliveries.get(j.id), tests.get(j.id)) for j in found]


class CancelRequest(BaseModel):
    force: bool = Field(default=False, description="Agents kill running steps at once instead of after a grace period")


class CancelResponse(BaseModel):
    run_id: str
    status: Literal["cancelling", "cancelled"] = Field(
        description="`cancelled` when nothing was left running; `cancelling` until agents report"
    )
    run_status: str
    cancelled_jobs: list[str] = Field(description="Ids of jobs cancelled at once (not started yet)")
    running_jobs: list[str] = Field(description="Ids of jobs on agents, which are told to cancel")
    force: bool


def _statuses(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    wanted = [s.strip() for s in value.split(",") if s.strip()]
    known = [s.value for s in RunStatus]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise AdminError(
            422, f"invalid request: status (query): unknown run status {unknown[0]!r}; one of {', '.join(known)}"
        )
    return wanted


NEXT_CURSOR_HEADER = "X-Next-Cursor"


@router.get(
    "/runs",
    summary="List runs, newest first",
    description=f"Filters combine with AND. Paging: pass the last run's `cursor` (or the `{NEXT_CURSOR_HEADER}` "
    "response header, present when there are more runs) as `before`.",
)
async def list_runs(
    response: Response,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))],
    status: Annotated[str | None, Query(description="A run status, or several separated by commas")] = None,
    repo: str | None = None,
    workflow: str | None = None,
    branch: Annotated[str | None, Query(description="The event's branch (a PR's head branch)")] = None,
    sha: Annotated[str | None, Query(description="A commit SHA or a prefix of one (hex)")] = None,
    source: Annotated[str | None, Query(description="A source's name or id")] = None,
    trigger: Annotated[str | None, Query(description="The event type: push, pr, tag, schedule, …")] = None,
    before: Annotated[str | None, Query(description="Cursor: runs older than the run it came from")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> list[RunInfo]:
    page = await find_runs_page(
        state, principal.token.org_id, RunQuery(status=status, repo=repo, workflow=workflow, branch=branch,
                                                sha=sha, source=source, trigger=trigger, before=before, limit=limit)
    )
    if page.next is not None:
        response.headers[NEXT_CURSOR_HEADER] = page.next
    return [RunInfo.of(r) for r in page.runs]


class RunQuery(BaseModel):
    """The runs list's query parameters, as the REST route and the dashboard's runs page take them."""

    status: str | None = None
    repo: str | None = None
    workflow: str | None = None
    branch: str | None = None
    sha: str | None = None
    source: str | None = None
    trigger: str | None = None
    before: str | None = None
    limit: int = 50


async def find_runs_page(state: AppState, org_id: str, query: RunQuery) -> runs.RunPage:
    """One page of the runs list (the REST route and the dashboard both call this). Bad values are
    `AdminError(422)` naming the parameter. `source` is a source name, else taken as a source id."""

    def blank(value: str | None) -> str | None:
        return value.strip() if value is not None and value.strip() else None

    statuses = _statuses(query.status)
    source_id = blank(query.source)
    async with state.database.read() as conn:
        if source_id is not None:
            named = await sources.get_source_by_name(conn, org_id, source_id)
            source_id = named.id if named is not None else source_id
        where = runs.RunFilter(
            status=statuses, repo=blank(query.repo), workflow=blank(query.workflow), branch=blank(query.branch),
            sha=blank(query.sha), source_id=source_id, trigger=blank(query.trigger),
        )
        try:
            return await runs.find_runs(conn, org_id=org_id, where=where, limit=query.limit, before=blank(query.before))
        except runs.BadCursor as exc:
            raise AdminError(422, f"invalid request: before (query): {exc}") from None
        except ValueError as exc:
            raise AdminError(422, f"invalid request: sha (query): {exc}") from None


async def _run(state: AppState, principal: Principal, run_id: str) -> RunRecord:
    async with state.database.read() as conn:
        run = await runs.get_run(conn, run_id)
    if run is None or run.org_id != principal.token.org_id:
        raise AdminError(404, f"no run with id {run_id!r}")
    return run


@router.get("/runs/{run_id}", summary="Show a run", responses=_NOT_FOUND)
async def show_run(
    run_id: str, state: State, principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))]
) -> RunDetail:
    run = await _run(state, principal, run_id)
    return RunDetail.of(run, await _jobs_with_steps(state, run_id))


@router.get("/runs/{run_id}/jobs", summary="List a run's jobs", responses=_NOT_FOUND)
async def list_run_jobs(
    run_id: str, state: State, principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))]
) -> list[JobInfo]:
    await _run(state, principal, run_id)
    return await _jobs_with_steps(state, run_id)


@router.post(
    "/runs/{run_id}/cancel",
    summary="Cancel a run",
    responses={**_NOT_FOUND, 409: {"model": ErrorResponse, "description": "The run has already finished"}},
)
async def cancel_run(
    run_id: str,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_CANCEL))],
    body: CancelRequest | None = None,
) -> CancelResponse:
    force = body.force if body is not None else False
    await _run(state, principal, run_id)
    by = f"admin token {principal.token.name!r}"
    with log_context(run_id=run_id):
        try:
            async with state.database.transaction() as conn:
                result = await runs.cancel_run(conn, run_id, by=by, force=force)
                await record_mutation(
                    conn, request, principal, action="run.force_cancel" if force else "run.cancel",
                    target=f"run:{run_id}", permission=Permission.RUNS_CANCEL,
                    reason=(f"run {run_id} {result.status}: {len(result.cancelled_jobs)} jobs cancelled, "
                            f"{len(result.running)} running told to stop"),
                )
        except runs.RunNotFound:
            raise AdminError(404, f"no run with id {run_id!r}") from None
        except runs.RunFinished as exc:
            raise AdminError(409, f"run {run_id} has already finished ({exc.status}); nothing to cancel") from None
        running = [job_id for job_id, _agent in result.running]
        log_event("run.cancel_requested", by_token_id=principal.token.id, force=force, status=result.status,
                  cancelled_jobs=result.cancelled_jobs, running_jobs=running)
        # after the commit: an agent that answers at once must find the run already `cancelling`
        await services_of(request.app).dispatcher.cancel_jobs(run_id, result.running, reason=by, force=force)
    return CancelResponse(
        run_id=run_id,
        status=result.status,
        run_status=result.run_status,
        cancelled_jobs=result.cancelled_jobs,
        running_jobs=running,
        force=force,
    )


class RerunResponse(BaseModel):
    run: RunInfo


@router.post(
    "/runs/{run_id}/rerun",
    status_code=201,
    summary="Run a run's workflow again at the same commit with the same event",
    responses={**_NOT_FOUND, 409: {"model": ErrorResponse, "description": "The run cannot be rerun"}},
)
async def rerun_run(
    run_id: str,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_RERUN))],
) -> RerunResponse:
    original = await _run(state, principal, run_id)
    try:
        async with state.database.transaction() as conn:
            created = await reruns.rerun(conn, state.settings, original)
            await record_mutation(
                conn, request, principal, action="run.rerun", target=f"run:{run_id}", permission=Permission.RUNS_RERUN,
                status=201, reason=f"run {run_id} rerun as run {created.run.id}",
            )
    except reruns.RerunRefused as exc:
        raise AdminError(409, str(exc)) from None
    rerun = created.run
    log_event("run.rerun", run_id=rerun.id, original_run_id=run_id, by_token_id=principal.token.id)
    dispatcher = services_of(request.app).dispatcher
    await dispatcher.cancel_superseded(created.superseded)
    await dispatcher.runs_created([rerun.id])
    return RerunResponse(run=RunInfo.of(rerun))


MAX_LOG_WAIT_S = 30.0
"""The longest `wait` of a log read: a long poll ends well within HTTP clients' and proxies' timeouts."""


class LogLineInfo(BaseModel):
    n: int = Field(description="1-based line number in the job's log")
    step: int = Field(description="Step index; -1 for setup output (clone, drift check)")
    line: str


class JobLogPage(BaseModel):
    job_id: str
    lines: list[LogLineInfo]
    next: int = Field(description="Opaque cursor: pass it back as `after` to get the lines that follow (any "
                      "orchestrator of a cluster accepts it)")
    complete: bool = Field(description="The job has finished and there are no more lines")


@router.get(
    "/runs/{run_id}/jobs/{job}/logs",
    summary="Read a job's log from a cursor (poll with `after=next` to follow it)",
    responses=_NOT_FOUND,
)
async def job_logs(
    run_id: str,
    job: str,
    request: Request,
    state: State,
    principal: Annotated[Principal, Depends(require(Permission.RUNS_READ))],
    after: Annotated[int, Query(ge=0, description="Opaque cursor from a previous page's `next`; 0 = the start")] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    wait: Annotated[float, Query(ge=0, le=MAX_LOG_WAIT_S, description=(
        "Seconds to wait for lines when there are none after `after` yet and the job has not finished "
        "(a long poll: the answer comes as soon as lines are stored, on any node of a cluster)"))] = 0,
) -> JobLogPage:
    await _run(state, principal, run_id)
    async with state.database.read() as conn:
        found = next((j for j in await runs.list_jobs(conn, run_id) if job in (j.id, j.name)), None)
    if found is None:
        raise AdminError(404, f"run {run_id} has no job {job!r}")
    logs = services_of(request.app).logs
    deadline = time.monotonic() + wait
    poll_s = state.settings.log_follow_poll_ms / 1000
    while True:
        watched = logs.watch(found.id)  # before the read: lines stored after it end the wait below
        page = await logs.read(run_id, found.id, after=after, limit=limit)
        remaining = deadline - time.monotonic()
        if page.lines or is_terminal(found.status) or remaining <= 0:
            break
        await logs.wait_for_data(found.id, timeout=min(remaining, poll_s), event=watched)
        async with state.database.read() as conn:  # it may have finished meanwhile, without more lines
            found = await runs.get_job(conn, found.id) or found
    return JobLogPage(
        job_id=found.id,
        lines=[LogLineInfo(n=line.n, step=line.step, line=line.line) for line in page.lines],
        next=page.next,
        complete=page.at_end and is_terminal(found.status),
    )
