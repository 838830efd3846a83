"""Runs and their jobs: creation, tracking, the needs scheduler, run aggregation, cancel and sweeps.

Every function takes an `AsyncConnection` inside the caller's transaction (`Database.transaction()`),
so a webhook's run creation, an agent's status message or a sweep commits as one unit.

Rules kept by this module:
- Every job status write goes through `store.jobs.set_job_status` (guarded by the engine's state
  machine): terminal states never change, late/duplicate/foreign messages update zero rows and are
  reported as `False`.
- Anything that can change a run's jobs first locks the run row (`SELECT … FOR UPDATE` on PostgreSQL;
  SQLite's `BEGIN IMMEDIATE` already serializes writers). Two jobs of one run finishing in concurrent
  transactions therefore settle one after the other, and the second sees the first's result, so a run
  can never be left unfinished with all of its jobs terminal. Lock order is run → queue rows → jobs
  everywhere (a claim, which locks no run, takes queue row → job), so these writers cannot deadlock.
- `settle_run` is the only place that enqueues dependents, skips them and finishes a run; it recomputes
  everything from the database, so calling it again (or after a restart) is harmless.
- Concurrency groups (`store.concurrency`) are entered and left inside `settle_run` too: a run or job
  that ends leaves its group and the next waiting member is admitted in the same transaction. Their lock
  (one per organization) is taken after the run's row; while it is held, other runs' rows are only taken
  with SKIP LOCKED, so the order run rows → concurrency lock holds everywhere.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.events import Event
from kici.engine.inline_expr import InlineExprError, resolve_str
from kici.engine.labels import effective_runs_on
from kici.engine.lockfile import LabelMatcher, Workflow
from kici.engine.needs import decide
from kici.engine.plan import PlannedJob, plan_workflow
from kici.engine.states import (
    JobEvent,
    JobState,
    RunStatus,
    RunTrust,
    aggregate_run_status,
    is_run_terminal,
    is_terminal,
)
from kici.orchestrator.db.schema import (
    DEFAULT_ORG_ID,
    ConcurrencyScope,
    ConcurrencyState,
    QueueStatus,
    agents,
    dispatch_queue,
    job_needs,
    jobs,
    new_id,
    nodes,
    runs,
    steps,
    utcnow,
)
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import concurrency as groups
from kici.orchestrator.store import environments as env_store
from kici.orchestrator.store import outbox
from kici.orchestrator.store.check_runs import forget_check_runs
from kici.orchestrator.store.jobs import KeepFirst, set_job_status, set_jobs_status

QUEUE_FULL_ERROR = "queue full"
RECOVERY_TIMEOUT_ERROR = "recovery timeout exceeded"


class RunNotFound(LookupError):
    """No run with this id."""


class RunFinished(Exception):
    """The run is already terminal (the admin API answers 409)."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} already finished ({status})")
        self.run_id = run_id
        self.status = status


@dataclass(frozen=True)
class QueueLimits:
    """The queue settings enqueueing needs (`queue_max_depth`, `queue_timeout_ms` of the configuration)."""

    max_depth: int = 1000
    timeout_ms: int = 3_600_000
    """How long a row may wait for an agent; 0 = forever."""


DEFAULT_QUEUE_LIMITS = QueueLimits()


# -- records -----------------------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class RunRecord(_Frozen):
    id: str
    org_id: str
    workflow: str
    status: str
    repo: str
    ref: str | None
    sha: str
    event: dict[str, Any]
    delivery_id: str | None
    source_id: str | None
    lock_content_hash: str | None
    workflow_content_hash: str | None
    parent_run_id: str | None
    original_run_id: str | None
    cancelled_by: str | None
    failure_reason: str | None
    timeout_ms: int | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    workflow_spec: dict[str, Any] | None = None
    """The workflow's lock-file entry (None for a run that failed before it had one)."""
    reporting: dict[str, Any] | None = None
    """Where the run is reported (`kici.orchestrator.reporting.targets`); None: nowhere."""
    branch: str | None = None
    """The event's branch (a PR's head branch), copied for the runs list's filter."""
    trigger: str | None = None
    """The event's type (`push`, `pr`, …), copied for the runs list's filter."""
    concurrency_group_id: str | None = None
    concurrency_state: str | None = None
    wait_reason: str | None = None
    """`concurrency: <group>` while the run waits for its workflow concurrency group."""
    trust: str = "trusted"
    """`RunTrust`: what the source's trust policy decided for the run's event."""
    secrets_allowed: bool = True
    """Whether dispatch may resolve the secrets the run's jobs declare."""
    hold_reason: str | None = None
    """Why the source's trust policy held the run (None: never held)."""
    hold_expires_at: dt.datetime | None = None
    """When the sweeper expires the hold of a run still `held`."""
    approved_at: dt.datetime | None = None
    """When a held run was approved (its workflow timeout counts from then)."""

    @property
    def finished(self) -> bool:
        return is_run_terminal(self.status)


class JobRecord(_Frozen):
    id: str
    run_id: str
    org_id: str
    name: str
    """Unique in the run: the lock job name, or `job (a, b)` for a matrix child."""
    job: str
    """The job's name in the lock file."""
    matrix: dict[str, Any] | None
    status: str
    agent_id: str | None
    attempt: int
    needs_satisfied: bool
    outputs: dict[str, Any] | None
    error: str | None
    failure_category: str | None
    runs_on: list[dict[str, Any]]
    """Label matchers as in the lock file (`{"kind": "exact", "value": "linux"}`)."""
    exclude_labels: list[dict[str, Any]]
    last_heartbeat_at: dt.datetime | None
    created_at: dt.datetime
    queued_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    concurrency_group_id: str | None = None
    concurrency_state: str | None = None
    wait_reason: str | None = None
    """`concurrency: <group>` while the job waits (for its run's group or its own); `environment: <name>, …`
    while it waits at its deployment environment's gate."""
    environment: str | None = None
    """The deployment environment the job deploys to, resolved when its run was created."""


class StepRecord(_Frozen):
    job_id: str
    step_index: int
    name: str
    status: str
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    duration_ms: int | None
    error: str | None
    log_bytes: int


# -- inputs and results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewRun:
    org_id: str
    workflow: Workflow
    event: Event
    repo: str
    ref: str | None
    sha: str
    lock_content_hash: str | None
    delivery_id: str | None
    source_id: str | None
    parent_run_id: str | None = None
    original_run_id: str | None = None
    reporting: Mapping[str, Any] | None = None
    """Where the run is reported (GitHub check runs, notification URLs); None or empty: nowhere."""
    trust: str = "trusted"
    """`RunTrust` value decided by the source's trust policy."""
    secrets_allowed: bool = True
    hold_reason: str | None = None
    """Set: the run is created `held` (its root jobs `held`, the others `pending`) and nothing is enqueued
    until `release_held_run`; the reason is shown wherever the run is."""
    hold_expiry: dt.timedelta | None = None
    """How long the hold lasts from the run's creation (None: until decided)."""


@dataclass(frozen=True)
class CreatedRun:
    run_id: str
    job_ids: dict[str, str]
    """Planned job name → job id."""
    queued: list[str]
    """Job ids enqueued now (the roots, unless the queue was full)."""
    failed: list[str]
    """Job ids that could not be enqueued ("queue full")."""
    skipped: list[str] = field(default_factory=list)
    """Job ids skipped because an upstream failed to enqueue."""
    run_status: str = RunStatus.PENDING.value
    """The run's status after creation: `pending`, or final when nothing could be queued."""
    superseded: list[Superseded] = field(default_factory=list)
    """Older runs of its concurrency group this run cancelled (`cancel_in_progress`): the caller sends
    `job.cancel` for their `running` jobs once the transaction has committed."""
    waiting: str | None = None
    """`concurrency: <group>` when the run waits for its group."""


@dataclass(frozen=True)
class Superseded:
    run_id: str
    reason: str
    running: list[tuple[str, str]]
    """`(job_id, agent_id)` pairs to send `job.cancel` to."""


@dataclass(frozen=True)
class SettleResult:
    newly_queued: list[str]
    skipped: list[str]
    run_status: str | None
    """The run's status after settling; None when the run does not exist."""
    failed: list[str] = field(default_factory=list)
    """Dependents that became ready but could not be enqueued ("queue full")."""
    cancelled: list[str] = field(default_factory=list)
    """Pending dependents cancelled because the run is being cancelled."""
    finished: bool = False
    """True when this call moved the run to its final status (report it, e.g. as a check conclusion)."""


@dataclass(frozen=True)
class CancelResult:
    status: Literal["cancelling", "cancelled"]
    """`cancelled` when nothing was left running; else `cancelling` until the agents report."""
    cancelled_jobs: list[str]
    """Job ids cancelled at once (not started yet)."""
    running: list[tuple[str, str]]
    """`(job_id, agent_id)` pairs to send `job.cancel` to: jobs running (or recovering) on an agent, and
    jobs already handed to an agent that had not started them (those are cancelled here already)."""
    run_status: str = RunStatus.CANCELLING.value
    """The run's status afterwards (`failed` wins over `cancelled` when a job had already failed)."""


JobReport = Literal["running", "success", "failed", "cancelled", "skipped"]

# The events an agent's report may use, tried in order (their source states are disjoint).
_REPORT_EVENTS: Mapping[str, tuple[JobEvent, ...]] = {
    "running": (JobEvent.START,),
    "success": (JobEvent.SUCCEED,),
    "failed": (JobEvent.FAIL,),
    "cancelled": (JobEvent.CANCEL, JobEvent.COMPLETE),
    "skipped": (JobEvent.SKIP,),
}

_ACTIVE_RUN_STATUSES = (RunStatus.PENDING.value, RunStatus.RUNNING.value, RunStatus.CANCELLING.value, "held")
_NOT_STARTED = (JobState.PENDING.value, JobState.QUEUED.value, JobState.HELD.value, JobState.WAITING.value)
_ON_AGENT = (JobState.RUNNING.value, JobState.RECOVERING.value, JobState.CANCELLING.value)


# -- helpers -----------------------------------------------------------------------------------------


def _matchers_json(matchers: Iterable[LabelMatcher] | None) -> list[dict[str, Any]]:
    return [m.model_dump(by_alias=True, exclude_none=True, mode="json") for m in matchers or ()]


def _exact_values(matchers: Iterable[dict[str, Any]]) -> list[str]:
    return [str(m["value"]) for m in matchers if m.get("kind") == "exact" and m.get("value")]


@dataclass(frozen=True)
class LockedRun:
    """What the locking read of a run returns: its status and its place in a concurrency group."""

    id: str
    status: str
    org_id: str = DEFAULT_ORG_ID
    group_id: str | None = None
    slot: str | None = None
    wait_reason: str | None = None

    @property
    def gated(self) -> bool:
        """The run waits for its workflow concurrency group: its ready jobs wait too."""
        return self.slot == ConcurrencyState.WAITING.value


_RUN_LOCK_COLUMNS = (
    runs.c.id, runs.c.org_id, runs.c.status, runs.c.concurrency_group_id, runs.c.concurrency_state, runs.c.wait_reason,
    runs.c.reporting,
)
_LOCK_RUN = sa.select(*_RUN_LOCK_COLUMNS).where(runs.c.id == sa.bindparam("v_run_id")).with_for_update()


def _locked(row: Any) -> LockedRun:
    _remember_reporting(str(row.id), str(row.org_id), row.reporting)
    return LockedRun(
        str(row.id), str(row.status), str(row.org_id), row.concurrency_group_id, row.concurrency_state, row.wait_reason
    )


async def lock_run_row(conn: AsyncConnection, run_id: str) -> LockedRun | None:
    """`lock_run` with the run's concurrency place."""
    row = (await conn.execute(_LOCK_RUN, {"v_run_id": run_id})).first()
    return _locked(row) if row is not None else None


async def lock_run(conn: AsyncConnection, run_id: str) -> str | None:
    """Lock the run row for the rest of the transaction (PostgreSQL; SQLite writers are serialized
    already) and return its status, or None when there is no such run."""
    locked = await lock_run_row(conn, run_id)
    return None if locked is None else locked.status


# A run's reporting targets are decided when it is created and never change, so every orchestrator may
# keep them (read for free by the lock statements below): a status change of an unreported run then
# costs no statement at all for reporting, and a reported one a single outbox INSERT.
_REPORTING: OrderedDict[str, tuple[str, dict[str, Any] | None]] = OrderedDict()
REPORTING_CACHED_RUNS = 4096


def _remember_reporting(run_id: str, org_id: str, reporting: Mapping[str, Any] | None) -> None:
    _REPORTING[run_id] = (org_id, dict(reporting) if reporting else None)
    _REPORTING.move_to_end(run_id)
    while len(_REPORTING) > REPORTING_CACHED_RUNS:
        _REPORTING.popitem(last=False)


def may_be_reported(run_id: str) -> bool:
    """Whether a state change of the run may have written outbox rows: False only for a run this process
    knows to be reported nowhere (a run's targets never change), so the reporting worker is not woken —
    and does not query the outbox — for every job event of runs nobody reports."""
    found = _REPORTING.get(run_id)
    return found is None or found[1] is not None


async def _reporting_of(conn: AsyncConnection, run_id: str) -> tuple[str, dict[str, Any] | None]:
    found = _REPORTING.get(run_id)
    if found is None:  # evicted between the lock and now: read it again
        row = (await conn.execute(sa.select(runs.c.org_id, runs.c.reporting).where(runs.c.id == run_id))).first()
        org_id, reporting = (str(row.org_id), row.reporting) if row is not None else (DEFAULT_ORG_ID, None)
        _remember_reporting(run_id, org_id, reporting)
        found = _REPORTING[run_id]
    return found


async def report_jobs(
    conn: AsyncConnection, run_id: str, job_ids: Sequence[str], event: str, *, run_finished: bool = False
) -> None:
    """Write the outbox rows owed for `job_ids` reaching `event` (and for the run finishing), in the
    caller's transaction. Nothing at all for a run reported nowhere."""
    org_id, reporting = await _reporting_of(conn, run_id)
    if not reporting:
        return
    rows = outbox.job_rows(reporting, org_id, run_id, job_ids, event)
    if run_finished:
        rows += outbox.run_finished_rows(reporting, org_id, run_id)
    await outbox.insert_rows(conn, rows)


async def lock_job(conn: AsyncConnection, job_id: str) -> str | None:
    """Take the locks a change to one job needs, in the module's order — its run, then its queue row —
    and return the run id (None for an unknown job)."""
    locked = await _lock_job_run(conn, job_id)
    return locked.id if locked is not None else None


_LOCK_JOB_WITH_ROW = (
    sa.select(*_RUN_LOCK_COLUMNS)
    .select_from(jobs.join(runs, runs.c.id == jobs.c.run_id).join(dispatch_queue, dispatch_queue.c.job_id == jobs.c.id))
    .where(jobs.c.id == sa.bindparam("v_job_id"))
    .with_for_update(of=[runs, dispatch_queue])
)
_LOCK_JOB_RUN_ONLY = (
    sa.select(*_RUN_LOCK_COLUMNS)
    .join(jobs, jobs.c.run_id == runs.c.id)
    .where(jobs.c.id == sa.bindparam("v_job_id"))
    .with_for_update(of=runs)
)
# (the hot statements of the dispatch path are built once, at import: see store/jobs.py `_status_update`)


async def _lock_job_run(conn: AsyncConnection, job_id: str) -> LockedRun | None:
    """`lock_job`, also returning what the run's lock read.

    A job that has a queue row (every job an agent reports on) is locked with its run and row in one
    statement; one that has none yet (still `pending`) by locking just its run."""
    both = (await conn.execute(_LOCK_JOB_WITH_ROW, {"v_job_id": job_id})).first()
    if both is not None:
        return _locked(both)
    row = (await conn.execute(_LOCK_JOB_RUN_ONLY, {"v_job_id": job_id})).first()
    return _locked(row) if row is not None else None


_CLOSE_QUEUE_ROW = (
    dispatch_queue.update()
    .where(
        dispatch_queue.c.job_id == sa.bindparam("v_job_id"),
        dispatch_queue.c.status.in_(
            [QueueStatus.PENDING.value, QueueStatus.DISPATCHED.value, QueueStatus.RECOVERING.value]
        ),
    )
    .values(
        status=sa.case(
            (dispatch_queue.c.status == QueueStatus.PENDING.value, QueueStatus.EXPIRED.value),
            else_=sa.bindparam("v_handed_out", type_=sa.Text),
        ),
        ack_deadline=None,
        recovery_deadline=None,
    )
)


async def close_queue_row(conn: AsyncConnection, job_id: str, job_status: str) -> None:
    """The job reached a terminal status: its queue row leaves the active states.

    A row still `pending` (never handed out) becomes `expired`; a handed-out row `completed`, or `failed`
    when the job failed or went stale."""
    failed = job_status in (JobState.FAILED.value, JobState.TIMED_OUT_STALE.value, JobState.DRIFT_DROPPED.value)
    handed_out = (QueueStatus.FAILED if failed else QueueStatus.COMPLETED).value
    await conn.execute(_CLOSE_QUEUE_ROW, {"v_job_id": job_id, "v_handed_out": handed_out})


async def queue_depth(conn: AsyncConnection) -> int:
    """Rows waiting for an agent (`pending`), the number `queue_max_depth` limits."""
    query = sa.select(sa.func.count()).select_from(dispatch_queue).where(
        dispatch_queue.c.status == QueueStatus.PENDING.value
    )
    return int((await conn.execute(query)).scalar_one())


@dataclass
class _Enqueuer:
    """Enqueues ready jobs for one settle: `enqueue` decides (counting the queue's depth once), `flush`
    writes every decision with one job UPDATE and one multi-row queue INSERT."""

    limits: QueueLimits
    now: dt.datetime
    depth: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    released: list[str] = field(default_factory=list)
    """Jobs leaving `waiting` (TIMER_DONE), flushed with their own guarded UPDATE."""
    approved: list[str] = field(default_factory=list)
    """Jobs leaving `held` (APPROVE) because their run was approved, flushed with their own UPDATE."""

    async def enqueue(
        self, conn: AsyncConnection, row: Any, *, from_waiting: bool = False, from_held: bool = False
    ) -> bool:
        """`pending → queued` plus a `pending` queue row (written by `flush`); or `pending → failed`
        ("queue full") at once. True when queued.

        `from_waiting`: a job released from a concurrency wait (`waiting → queued`). It skips the depth
        check: it was accepted when its run was created and has only waited its turn since, and the
        state machine has no `waiting → failed` edge to record a refusal with."""
        if from_waiting or from_held:
            # (`from_held`: accepted when its run was created, like a waiting job; the state machine has
            # no `held → failed` edge either)
            (self.approved if from_held else self.released).append(row.id)
            self._row(row)
            return True
        if self.depth is None:
            self.depth = await queue_depth(conn)
        if self.depth >= self.limits.max_depth:
            await set_job_status(
                conn,
                row.id,
                JobState.FAILED,
                JobEvent.FAIL,
                values={"error": QUEUE_FULL_ERROR, "failure_category": "queue_full", "finished_at": self.now},
            )
            return False
        self._row(row)
        return True

    def _row(self, row: Any) -> None:
        timeout = self.limits.timeout_ms
        self.rows.append(
            {
                "id": new_id(),
                "job_id": row.id,
                "run_id": row.run_id,
                "org_id": row.org_id,
                "status": QueueStatus.PENDING.value,
                "runs_on_labels": _exact_values(row.runs_on or []),
                "exclude_labels": _exact_values(row.exclude_labels or []),
                "dispatch_attempts": 0,
                "expires_at": self.now + dt.timedelta(milliseconds=timeout) if timeout > 0 else None,
                # a microsecond apart: rows enqueued together are claimed in plan order
                "created_at": self.now + dt.timedelta(microseconds=len(self.rows)),
            }
        )
        if self.depth is not None:
            self.depth += 1

    async def flush(self, conn: AsyncConnection) -> None:
        if not self.rows:
            return
        released = set(self.released) | set(self.approved)
        fresh = [r["job_id"] for r in self.rows if r["job_id"] not in released]
        values = {"queued_at": self.now, "needs_satisfied": True, "wait_reason": None}
        moved = await set_jobs_status(conn, fresh, JobState.QUEUED, JobEvent.ENQUEUE, values=values)
        moved += await set_jobs_status(conn, self.released, JobState.QUEUED, JobEvent.TIMER_DONE, values=values)
        moved += await set_jobs_status(conn, self.approved, JobState.QUEUED, JobEvent.APPROVE, values=values)
        if moved != len(self.rows):  # every job was read `pending`/`waiting` under its run's lock: all move
            raise RuntimeError(f"enqueue moved {moved} of {len(self.rows)} jobs")
        await conn.execute(dispatch_queue.insert(), self.rows)
        self.rows = []
        self.released = []
        self.approved = []


# -- creation ----------------------------------------------------------------------------------------


_INSERT_RUN = runs.insert()


async def create_run(
    conn: AsyncConnection, new: NewRun, *, queue_max_depth: int, queue_timeout_ms: int
) -> CreatedRun:
    """Insert a run with its planned jobs and needs edges, and enqueue the jobs without needs.

    A root job that finds the queue full is recorded `failed` ("queue full"); its dependents are skipped
    and, when nothing else is left, the run ends `failed` right here rather than hanging. `ValueError`
    from planning (a matrix that cannot expand) propagates before anything is written.
    """
    planned = plan_workflow(new.workflow)
    run_group, job_group_names = _concurrency_groups(new, planned)
    job_environments = _job_environments(new, planned, job_group_names)
    held = new.hold_reason is not None
    now = utcnow()
    run_id = new_id()
    await conn.execute(  # parameters, not .values(): building a 20-column VALUES clause per run is costly
        _INSERT_RUN,
        {
            "id": run_id,
            "org_id": new.org_id,
            "workflow": new.workflow.name,
            "status": (RunStatus.HELD if held else RunStatus.PENDING).value,
            "repo": new.repo,
            "ref": new.ref,
            "sha": new.sha,
            "event": new.event.model_dump(mode="json"),
            "delivery_id": new.delivery_id,
            "source_id": new.source_id,
            "lock_content_hash": new.lock_content_hash,
            "workflow_content_hash": new.workflow.content_hash,
            "parent_run_id": new.parent_run_id,
            "original_run_id": new.original_run_id,
            "timeout_ms": new.workflow.timeout,
            "workflow_spec": new.workflow.model_dump(by_alias=True, exclude_none=True, mode="json"),
            "reporting": dict(new.reporting) if new.reporting else None,
            "created_at": now,
            "branch": new.event.branch,
            "trigger": new.event.type,
            "trust": new.trust,
            "secrets_allowed": new.secrets_allowed,
            "hold_reason": new.hold_reason,
            "hold_expires_at": now + new.hold_expiry if held and new.hold_expiry is not None else None,
        },
    )
    _remember_reporting(run_id, new.org_id, new.reporting)
    job_group_ids: dict[str, str] = {}
    for name in sorted(set(job_group_names.values())):
        group = await groups.ensure_group(
            conn, org_id=new.org_id, scope=ConcurrencyScope.JOB, repo=new.repo, name=name, max_running=1
        )
        job_group_ids[name] = group.id
    # a job deploying to an environment joins the environment's group: one deployment at a time, org-wide
    env_group_ids: dict[str, str] = {}
    for name in sorted(set(job_environments.values())):
        group = await groups.ensure_group(
            conn, org_id=new.org_id, scope=ConcurrencyScope.JOB, repo=env_store.GROUP_REPO,
            name=env_store.group_name(name), max_running=1,
        )
        env_group_ids[name] = group.id
    job_ids: dict[str, str] = {}
    job_rows: list[dict[str, Any]] = []
    need_rows: list[dict[str, Any]] = []
    for index, job in enumerate(planned):
        job_id = new_id()
        job_ids[job.name] = job_id
        lock_job = job.lock_job
        job_rows.append(
            {
                "id": job_id,
                "run_id": run_id,
                "org_id": new.org_id,
                "name": job.name,
                "job": job.job,
                "matrix": job.matrix,
                # a held run: its root jobs wait for the approval in `held`; dependents stay `pending`
                "status": (JobState.HELD if held and not job.needs else JobState.PENDING).value,
                "attempt": 1,
                "needs_satisfied": not job.needs,
                "runs_on": _matchers_json(effective_runs_on(lock_job.runs_on, lock_job.python) if lock_job else None),
                "exclude_labels": _matchers_json(lock_job.exclude_labels if lock_job else None),
                "concurrency_group_id": (
                    env_group_ids[job_environments[job.name]] if job.name in job_environments
                    else job_group_ids.get(job_group_names.get(job.name, ""))
                ),
                "environment": job_environments.get(job.name),
                # one microsecond apart: jobs list (and queue) in plan order
                "created_at": now + dt.timedelta(microseconds=index),
            }
        )
        for need in job.needs:
            need_rows.append(
                {"run_id": run_id, "job_name": job.name, "upstream_name": need.name, "run_on": list(need.run_on)}
            )
    if job_rows:
        await conn.execute(jobs.insert(), job_rows)
    if need_rows:
        await conn.execute(job_needs.insert(), need_rows)
    edges: dict[str, list[tuple[str, list[str]]]] = {}
    for need_row in need_rows:
        edges.setdefault(need_row["job_name"], []).append((need_row["upstream_name"], need_row["run_on"]))
    _remember_edges(run_id, edges)  # (a run created by this process never needs to read its edges back)
    # before settling: a job that fails or is skipped right here must report `queued` first
    await outbox.insert_rows(
        conn, outbox.job_rows(new.reporting, new.org_id, run_id, job_ids.values(), outbox.CHECK_QUEUED, now=now)
    )
    if held:
        # nothing is enqueued and no concurrency group is joined until a trusted person approves
        return CreatedRun(run_id=run_id, job_ids=job_ids, queued=[], failed=[], run_status=RunStatus.HELD.value)
    limits = QueueLimits(max_depth=queue_max_depth, timeout_ms=queue_timeout_ms)
    superseded: list[Superseded] = []
    if run_group is None:
        settled = await settle_run(conn, run_id, limits=limits, now=now, locked=LockedRun(
            run_id, RunStatus.PENDING.value, new.org_id))
    else:
        settled, superseded = await _join_workflow_group(conn, run_id, new, run_group, limits=limits, now=now)
    waiting = None
    if run_group is not None:
        state = await lock_run_row(conn, run_id)
        waiting = state.wait_reason if state is not None and state.gated else None
    return CreatedRun(
        run_id=run_id,
        job_ids=job_ids,
        queued=settled.newly_queued,
        failed=settled.failed,
        skipped=settled.skipped,
        run_status=settled.run_status or RunStatus.PENDING.value,
        superseded=superseded,
        waiting=waiting,
    )


def _concurrency_groups(new: NewRun, planned: list[PlannedJob]) -> tuple[str | None, dict[str, str]]:
    """The run's workflow concurrency group and each planned job's `concurrency_group`, evaluated
    against the run's event (static strings, or `lambda event: …` through the restricted evaluator). An
    empty name means no group. `ValueError` naming the workflow or job when an expression fails."""
    run_group: str | None = None
    conc = new.workflow.concurrency
    if conc is not None and conc.group is not None:
        try:
            run_group = resolve_str(conc.group, new.event) or None
        except InlineExprError as exc:
            raise ValueError(f"workflow {new.workflow.name!r}: concurrency group: {exc}") from None
    job_groups: dict[str, str] = {}
    for job in planned:
        spec = job.lock_job.concurrency_group if job.lock_job is not None else None
        if spec is None:
            continue
        try:
            name = resolve_str(spec, new.event)
        except InlineExprError as exc:
            raise ValueError(f"workflow {new.workflow.name!r}: job {job.job!r}: concurrency_group: {exc}") from None
        if name:
            job_groups[job.name] = name
    return run_group, job_groups


def _job_environments(new: NewRun, planned: list[PlannedJob], job_groups: Mapping[str, str]) -> dict[str, str]:
    """Each planned job's deployment environment, resolved once against the run's event (a static name, or
    `lambda event: …` through the restricted evaluator); an empty name means none. `ValueError` naming the
    workflow and job when an expression fails, produces an invalid name, or the job also names a
    `concurrency_group` (its environment is its group)."""
    found: dict[str, str] = {}
    for job in planned:
        refs = job.lock_job.environments if job.lock_job is not None else None
        if not refs:
            continue
        where = f"workflow {new.workflow.name!r}: job {job.job!r}: environment"
        if len(refs) > 1:
            raise ValueError(f"{where}: a job deploys to one environment, not {len(refs)}")
        try:
            name = resolve_str(refs[0].value, new.event)
        except InlineExprError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not name:
            continue
        if not env_store.NAME.match(name):
            raise ValueError(f"{where}: {name[:100]!r} is not a valid environment name")
        if job.name in job_groups:
            raise ValueError(f"{where}: cannot be combined with concurrency_group (an environment runs one "
                             "deployment at a time)")
        found[job.name] = name
    return found


async def _join_workflow_group(
    conn: AsyncConnection, run_id: str, new: NewRun, name: str, *, limits: QueueLimits, now: dt.datetime
) -> tuple[SettleResult, list[Superseded]]:
    """A new run enters its workflow concurrency group: with `cancel_in_progress` it first cancels the
    group's older runs (waiting ones at once; running ones keep their place until their jobs stop), then
    it is admitted when the group has a free place, else it waits in FIFO order."""
    conc = new.workflow.concurrency
    assert conc is not None
    group = await groups.ensure_group(
        conn, org_id=new.org_id, scope=ConcurrencyScope.RUN, repo=new.repo, name=name, max_running=conc.max or 1
    )
    older: list[str] = []
    wanted: list[str] = []
    if conc.cancel_in_progress:
        # lock order is run rows → concurrency lock: lock the runs to cancel first (without waiting when
        # this transaction holds the concurrency lock already, e.g. for an earlier run of one delivery)
        wanted = [rid for rid, _ in await groups.active_runs(conn, group.id, exclude=run_id)]
        older = await groups.lock_runs(conn, wanted, skip_locked=groups.holds_lock(conn))
    await groups.serialize(conn, new.org_id)
    await groups.join_run(conn, run_id, group)
    superseded: list[Superseded] = []
    if conc.cancel_in_progress:
        # a run another orchestrator created meanwhile: under the lock now, so take it if it is free
        raced = [rid for rid, _ in await groups.active_runs(conn, group.id, exclude=run_id) if rid not in older]
        older += await groups.lock_runs(conn, raced, skip_locked=True)
        missed = sorted(set(wanted + raced) - set(older))
        if missed:
            log_event("concurrency.supersede_skipped", level="warning", run_id=run_id, group=name, runs=missed)
        reason = f"superseded by run {run_id} ({groups.wait_reason(name)})"
        # newest first: a waiting run cancelled never frees a place for an older one about to be cancelled
        for old in reversed(older):
            try:
                result = await cancel_run(conn, old, by=f"run {run_id}", force=False, reason=reason)
            except (RunNotFound, RunFinished):
                continue
            superseded.append(Superseded(old, reason, result.running))
    admitted = await admit_runs(conn, group, limits=limits, now=now)
    if run_id in admitted:
        return admitted[run_id], superseded
    return await settle_run(conn, run_id, limits=limits, now=now), superseded


async def create_failed_run(
    conn: AsyncConnection,
    *,
    org_id: str = DEFAULT_ORG_ID,
    workflow_name: str,
    event: Event | Mapping[str, Any] | None,
    repo: str,
    ref: str | None,
    sha: str,
    delivery_id: str | None,
    source_id: str | None,
    reason: str,
    lock_content_hash: str | None = None,
    reporting: Mapping[str, Any] | None = None,
) -> str:
    """A run that failed before it had jobs (e.g. a corrupt lock file: `lock_resolution`); its id."""
    now = utcnow()
    run_id = new_id()
    event_json = event.model_dump(mode="json") if isinstance(event, Event) else dict(event or {})
    await conn.execute(
        runs.insert().values(
            id=run_id,
            org_id=org_id,
            workflow=workflow_name,
            status=RunStatus.FAILED.value,
            repo=repo,
            ref=ref,
            sha=sha,
            event=event_json,
            delivery_id=delivery_id,
            source_id=source_id,
            lock_content_hash=lock_content_hash,
            failure_reason=reason,
            reporting=dict(reporting) if reporting else None,
            created_at=now,
            finished_at=now,
            branch=event_json.get("branch"),
            trigger=event_json.get("type"),
        )
    )
    _remember_reporting(run_id, org_id, reporting)
    await outbox.insert_rows(conn, outbox.failed_run_rows(reporting, org_id, run_id, now=now))
    return run_id


# -- reads -------------------------------------------------------------------------------------------


async def get_run(conn: AsyncConnection, run_id: str) -> RunRecord | None:
    row = (await conn.execute(sa.select(runs).where(runs.c.id == run_id))).first()
    return RunRecord.model_validate(dict(row._mapping)) if row is not None else None


async def list_runs(
    conn: AsyncConnection,
    *,
    org_id: str = DEFAULT_ORG_ID,
    status: str | Sequence[str] | None = None,
    repo: str | None = None,
    workflow: str | None = None,
    limit: int = 50,
    before: dt.datetime | None = None,
) -> list[RunRecord]:
    """Runs newest first. `before` pages: pass the `created_at` of the last run of the previous page."""
    query = sa.select(runs).where(runs.c.org_id == org_id)
    if status is not None:
        query = query.where(runs.c.status.in_([status] if isinstance(status, str) else list(status)))
    if repo is not None:
        query = query.where(runs.c.repo == repo)
    if workflow is not None:
        query = query.where(runs.c.workflow == workflow)
    if before is not None:
        query = query.where(runs.c.created_at < before)
    query = query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(max(0, limit))
    return [RunRecord.model_validate(dict(row._mapping)) for row in await conn.execute(query)]


async def latest_runs_at(
    conn: AsyncConnection, *, org_id: str, repo: str, sha: str, source_id: str | None = None
) -> list[RunRecord]:
    """The newest run of each workflow at commit `sha` of `repo` (of `source_id` when given), by workflow."""
    query = sa.select(runs).where(runs.c.org_id == org_id, runs.c.repo == repo, runs.c.sha == sha)
    if source_id is not None:
        query = query.where(runs.c.source_id == source_id)
    newest: dict[str, RunRecord] = {}
    for row in await conn.execute(query.order_by(runs.c.created_at, runs.c.id)):
        record = RunRecord.model_validate(dict(row._mapping))
        newest[record.workflow] = record
    return [newest[name] for name in sorted(newest)]
@dataclass(frozen=True)
class RunFilter:
    """What the runs list (REST, CLI, dashboard) narrows on; None = any. `sha` is a full SHA or a prefix."""

    status: Sequence[str] | None = None
    repo: str | None = None
    workflow: str | None = None
    branch: str | None = None
    sha: str | None = None
    source_id: str | None = None
    trigger: str | None = None


@dataclass(frozen=True)
class RunPage:
    runs: list[RunRecord]
    next: str | None
    """Cursor of the page after this one (pass as `before`); None on the last page."""


class BadCursor(ValueError):
    """A `before` cursor that this module did not make."""


def run_cursor(run: RunRecord) -> str:
    """An opaque cursor just past `run` in the newest-first order: its (created_at, id), base64url."""
    raw = json.dumps([run.created_at.astimezone(dt.UTC).isoformat(), run.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, run_id = json.loads(raw)
        at = dt.datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(run_id, str):
            raise ValueError
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error):
        raise BadCursor(f"not a runs cursor: {cursor[:40]!r}") from None
    return at, run_id


_HEX = frozenset("0123456789abcdef")


async def find_runs(
    conn: AsyncConnection,
    *,
    org_id: str = DEFAULT_ORG_ID,
    where: RunFilter = RunFilter(),
    limit: int = 50,
    before: str | None = None,
) -> RunPage:
    """One page of runs, newest first, in one query: each filter has an index ending in `created_at`, and
    the cursor is keyset paging on (created_at, id), so a page deep in history costs what the first does.
    Raises `BadCursor` for a cursor not made by `run_cursor` and `ValueError` for a `sha` that is not hex."""
    query = sa.select(runs).where(runs.c.org_id == org_id)
    if where.status:
        query = query.where(runs.c.status.in_(list(where.status)))
    for column, value in (
        (runs.c.repo, where.repo),
        (runs.c.workflow, where.workflow),
        (runs.c.branch, where.branch),
        (runs.c.source_id, where.source_id),
        (runs.c.trigger, where.trigger),
    ):
        if value is not None:
            query = query.where(column == value)
    if where.sha is not None:
        sha = where.sha.lower()
        if not sha or not set(sha) <= _HEX:
            raise ValueError(f"not a commit SHA or SHA prefix: {where.sha!r}")
        # a prefix as a range, which the (org_id, sha) index serves on both databases (LIKE would not)
        query = query.where(runs.c.sha == sha) if len(sha) >= 40 else query.where(
            runs.c.sha >= sha, runs.c.sha < sha + "g"
        )
    if before is not None:
        at, run_id = _decode_cursor(before)
        query = query.where(sa.or_(runs.c.created_at < at, sa.and_(runs.c.created_at == at, runs.c.id < run_id)))
    query = query.order_by(runs.c.created_at.desc(), runs.c.id.desc()).limit(max(0, limit) + 1)
    found = [RunRecord.model_validate(dict(row._mapping)) for row in await conn.execute(query)]
    more = len(found) > limit
    found = found[:limit]
    return RunPage(runs=found, next=run_cursor(found[-1]) if more and found else None)


def _job(row: Any) -> JobRecord:
    values = dict(row._mapping)
    values["runs_on"] = values.get("runs_on") or []
    values["exclude_labels"] = values.get("exclude_labels") or []
    return JobRecord.model_validate(values)


async def list_jobs(conn: AsyncConnection, run_id: str) -> list[JobRecord]:
    """The run's jobs in plan order."""
    query = sa.select(jobs).where(jobs.c.run_id == run_id).order_by(jobs.c.created_at, jobs.c.name)
    return [_job(row) for row in await conn.execute(query)]


async def get_job(conn: AsyncConnection, job_id: str) -> JobRecord | None:
    row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).first()
    return _job(row) if row is not None else None


@dataclass(frozen=True)
class WaitingJob:
    job: JobRecord
    workflow: str
    repo: str


async def list_waiting_jobs(conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID,
                            limit: int = 500) -> list[WaitingJob]:
    """Jobs waiting for a concurrency group (their run's or their own), oldest first: they are not in
    the dispatch queue yet, and the dashboard's Queue page says why they wait."""
    query = (
        sa.select(jobs, runs.c.workflow.label("w_workflow"), runs.c.repo.label("w_repo"))
        .join(runs, runs.c.id == jobs.c.run_id)
        .where(jobs.c.status == JobState.WAITING.value, jobs.c.org_id == org_id)
        .order_by(jobs.c.created_at, jobs.c.id)
        .limit(limit)
    )
    found = []
    for row in await conn.execute(query):
        values = dict(row._mapping)
        workflow, repo = values.pop("w_workflow"), values.pop("w_repo")
        values["runs_on"] = values.get("runs_on") or []
        values["exclude_labels"] = values.get("exclude_labels") or []
        found.append(WaitingJob(JobRecord.model_validate(values), str(workflow), str(repo)))
    return found


async def list_steps(conn: AsyncConnection, job_id: str) -> list[StepRecord]:
    query = sa.select(steps).where(steps.c.job_id == job_id).order_by(steps.c.step_index)
    return [StepRecord.model_validate(dict(row._mapping)) for row in await conn.execute(query)]


async def list_run_steps(conn: AsyncConnection, run_id: str) -> dict[str, list[StepRecord]]:
    """Every step of every job of the run, in one query: job id → its steps in order."""
    query = (
        sa.select(steps)
        .join(jobs, jobs.c.id == steps.c.job_id)
        .where(jobs.c.run_id == run_id)
        .order_by(steps.c.job_id, steps.c.step_index)
    )
    found: dict[str, list[StepRecord]] = {}
    for row in await conn.execute(query):
        record = StepRecord.model_validate(dict(row._mapping))
        found.setdefault(record.job_id, []).append(record)
    return found


# -- tracking ----------------------------------------------------------------------------------------


_STARTED_QUEUE_ROW = (
    dispatch_queue.update()
    .where(
        dispatch_queue.c.job_id == sa.bindparam("v_job_id"),
        dispatch_queue.c.status.in_([QueueStatus.DISPATCHED.value, QueueStatus.RECOVERING.value]),
    )
    .values(status=QueueStatus.DISPATCHED.value, ack_deadline=None, recovery_deadline=None)
)


async def record_job_state(
    conn: AsyncConnection,
    job_id: str,
    *,
    state: JobReport,
    agent_id: str | None,
    error: str | None = None,
    failure_category: str | None = None,
    outputs: Mapping[str, Any] | None = None,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
) -> SettleResult | None:
    """Apply a job status report: the run's settle result, or None when the report is ignored (late,
    duplicate, from another agent, or an edge the state machine does not have).

    `agent_id` given → only that agent's job moves (agent messages); None → an orchestrator decision.
    `running` acknowledges the dispatch and moves the run to `running`. A terminal state closes the queue
    row and settles the run (dependents enqueued or skipped, run finished when all jobs are). `limits`
    apply to dependents enqueued now.
    """
    if state not in _REPORT_EVENTS:
        raise ValueError(f"unknown job state report {state!r}")
    locked = await _lock_job_run(conn, job_id)
    if locked is None:
        return None
    run_id, run_status = locked.id, locked.status
    now = utcnow()
    values: dict[str, Any] = {}
    if state == "running":
        values = {"started_at": KeepFirst(now), "last_heartbeat_at": now}
    else:
        values = {"finished_at": now}
        if error is not None:
            values["error"] = error
        if failure_category is not None:
            values["failure_category"] = failure_category
        if outputs is not None:
            values["outputs"] = dict(outputs)
    target = JobState(state)
    moved = False
    for event in _REPORT_EVENTS[state]:
        if await set_job_status(conn, job_id, target, event, values=values, owned_by=agent_id):
            moved = True
            break
    if not moved:
        return None
    if state == "running":
        # the job started: its dispatch is acknowledged, and the row follows an agent-side recovery too
        await conn.execute(_STARTED_QUEUE_ROW, {"v_job_id": job_id})
        await report_jobs(conn, run_id, [job_id], outbox.CHECK_IN_PROGRESS)
        # A job starting makes no other job ready and finishes nothing: all a full settle would do is move
        # a pending run to running, so do just that (the run row is locked, its status read above).
        if run_status != RunStatus.PENDING.value:
            return SettleResult([], [], run_status)
        await conn.execute(
            runs.update()
            .where(runs.c.id == run_id, runs.c.status == RunStatus.PENDING.value)
            .values(status=RunStatus.RUNNING.value, started_at=sa.func.coalesce(runs.c.started_at, now))
        )
        return SettleResult([], [], RunStatus.RUNNING.value)
    await close_queue_row(conn, job_id, target.value)
    return await settle_run(conn, run_id, limits=limits, now=now, locked=locked, finished_jobs=[job_id])


async def finish_job(
    conn: AsyncConnection,
    job_id: str,
    target: JobState,
    event: JobEvent,
    *,
    error: str | None,
    failure_category: str | None = None,
    owned_by: str | None = None,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
) -> bool:
    """An orchestrator-side terminal decision (stale, unacknowledged, unrecovered, expired): guarded
    move, queue row closed, run settled. False when the job had already moved on."""
    run_id = await lock_job(conn, job_id)
    if run_id is None:
        return False
    values: dict[str, Any] = {"error": error}
    if failure_category is not None:
        values["failure_category"] = failure_category
    if not await set_job_status(conn, job_id, target, event, values=values, owned_by=owned_by):
        return False
    await close_queue_row(conn, job_id, target.value)
    await settle_run(conn, run_id, limits=limits, finished_jobs=[job_id])
    return True


_SETTLE_JOBS = (
    sa.select(
        jobs.c.id, jobs.c.run_id, jobs.c.org_id, jobs.c.name, jobs.c.job, jobs.c.status,
        jobs.c.runs_on, jobs.c.exclude_labels, jobs.c.error, jobs.c.concurrency_group_id, jobs.c.concurrency_state,
        jobs.c.environment,
    )
    .where(jobs.c.run_id == sa.bindparam("v_run_id"))
    .order_by(jobs.c.created_at, jobs.c.name)
)
_SETTLE_NEEDS = sa.select(job_needs.c.job_name, job_needs.c.upstream_name, job_needs.c.run_on).where(
    job_needs.c.run_id == sa.bindparam("v_run_id")
)


_EDGES: OrderedDict[str, dict[str, list[tuple[str, list[str]]]]] = OrderedDict()
EDGES_CACHED_RUNS = 2048


async def _needs_edges(conn: AsyncConnection, run_id: str) -> dict[str, list[tuple[str, list[str]]]]:
    """job name → [(upstream name, statuses it may run on)]. A run's needs edges are written once, with
    the run, and never change, so every orchestrator may keep them (a settle per finished job would
    otherwise read them again each time)."""
    found = _EDGES.get(run_id)
    if found is not None:
        _EDGES.move_to_end(run_id)
        return found
    edges: dict[str, list[tuple[str, list[str]]]] = {}
    for need in await conn.execute(_SETTLE_NEEDS, {"v_run_id": run_id}):
        edges.setdefault(need.job_name, []).append((need.upstream_name, list(need.run_on)))
    _remember_edges(run_id, edges)
    return edges


async def list_needs(conn: AsyncConnection, run_id: str) -> dict[str, list[str]]:
    """A run's needs edges for display: planned job name → the lock job names it waits for."""
    return {name: [upstream for upstream, _ in ups] for name, ups in (await _needs_edges(conn, run_id)).items()}


def _remember_edges(run_id: str, edges: dict[str, list[tuple[str, list[str]]]]) -> None:
    _EDGES[run_id] = edges
    while len(_EDGES) > EDGES_CACHED_RUNS:
        _EDGES.popitem(last=False)


async def settle_run(
    conn: AsyncConnection,
    run_id: str,
    *,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    now: dt.datetime | None = None,
    locked: LockedRun | None = None,
    finished_jobs: Sequence[str] = (),
) -> SettleResult:
    """Run the needs scheduler for the run until nothing changes, then aggregate its status.

    A pending job whose upstreams (every matrix child of each needed lock job) are all terminal is
    enqueued when each ended in its edge's `run_on`, else skipped; skips cascade. In a `cancelling` run
    pending jobs are cancelled instead. When every job is terminal the run gets
    `aggregate_run_status` (a cancelling run that would be `success` is `cancelled`) and `finished_at`;
    the first started job moves a pending run to `running`.

    `finished_jobs`: jobs the caller just moved to a terminal state; their reports are written with the
    ones this settle owes (jobs skipped, cancelled or failed here, the run finishing), in one INSERT.

    Concurrency: in a run waiting for its workflow group, ready jobs go `waiting` instead of `queued`
    (and leave it when the run is admitted); a ready job with a `concurrency_group` joins its group and
    is queued only when admitted. A job that ends leaves its group, a run that ends leaves its group, and
    the next waiting members are admitted in the same transaction.
    """
    now = now or utcnow()
    # `locked`: the caller locked the run in this transaction already and read it
    if locked is None:
        locked = await lock_run_row(conn, run_id)
    if locked is None:
        return SettleResult([], [], None)
    run_status = locked.status
    if is_run_terminal(run_status):
        if finished_jobs:
            await report_jobs(conn, run_id, finished_jobs, outbox.CHECK_COMPLETED)
        return SettleResult([], [], run_status)
    if run_status == RunStatus.HELD.value:  # nothing moves until the hold is approved, rejected or expires
        if finished_jobs:
            await report_jobs(conn, run_id, finished_jobs, outbox.CHECK_COMPLETED)
        return SettleResult([], [], run_status)
    rows = list(await conn.execute(_SETTLE_JOBS, {"v_run_id": run_id}))
    edges = await _needs_edges(conn, run_id)
    children: dict[str, list[str]] = {}
    for row in rows:
        children.setdefault(row.job, []).append(row.name)
    status = {row.name: str(row.status) for row in rows}
    errors = {row.name: row.error for row in rows}

    queued: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    cancelled: list[str] = []
    gate: list[Any] = []
    """Ready jobs with a `concurrency_group`: they join it below and are queued if admitted."""
    gated: set[str] = set()
    enqueuer = _Enqueuer(limits, now)
    cancelling = run_status == RunStatus.CANCELLING.value
    # deployment environments: a job with one passes its gate (approvals, wait timer) before it may queue
    env_gates = await env_store.gates_of_run(conn, run_id) if any(row.environment for row in rows) else {}
    run_facts: dict[str, Any] | None = None
    for _ in range(len(rows) + 1):
        changed = False
        for row in rows:
            current = status[row.name]
            # a job waiting only because its run waited is ready again once the run is admitted
            released = (
                current == JobState.WAITING.value and row.concurrency_state is None and not locked.gated
                and not cancelling and row.id not in gated
                and (row.environment is None or (row.id in env_gates and env_gates[row.id].passed))
            )
            # a root job of a held run that was approved (the run is no longer `held`): ready now
            approved = current == JobState.HELD.value and not cancelling and row.id not in gated
            if current != JobState.PENDING.value and not released and not approved:
                continue
            if cancelling:
                if await set_job_status(conn, row.id, JobState.CANCELLED, JobEvent.CANCEL):
                    status[row.name] = JobState.CANCELLED.value
                    cancelled.append(row.id)
                    changed = True
                continue
            if not released and not approved:
                # a need on a lock job is a need on each of its children; a job with no children is satisfied
                needs = [
                    (child, run_on)
                    for upstream, run_on in edges.get(row.name, [])
                    for child in children.get(upstream, [])
                ]
                decision = decide(needs, status)
                if decision == "wait":
                    continue
                if decision == "skip":
                    if await set_job_status(conn, row.id, JobState.SKIPPED, JobEvent.SKIP):
                        status[row.name] = JobState.SKIPPED.value
                        skipped.append(row.id)
                        changed = True
                    continue
            if not released:  # (an approved held job passes its environment's gate like any other)
                if row.environment is not None and row.id not in env_gates:
                    if run_facts is None:
                        run_facts = await env_store.run_facts(conn, run_id)
                    entry = await env_store.enter(
                        conn, job_id=row.id, run_id=run_id, org_id=row.org_id, environment=row.environment,
                        now=now, run=run_facts,
                    )
                    env_gates = await env_store.gates_of_run(conn, run_id)
                    if entry.error is not None:
                        failure = {"error": entry.error, "failure_category": "environment", "finished_at": now}
                        if await set_job_status(conn, row.id, JobState.FAILED, JobEvent.FAIL, values=failure):
                            status[row.name] = JobState.FAILED.value
                            errors[row.name] = entry.error
                            failed.append(row.id)
                            changed = True
                        continue
                    if entry.wait_reason is not None:
                        wait = {"wait_reason": entry.wait_reason, "needs_satisfied": True}
                        if await set_job_status(conn, row.id, JobState.WAITING, JobEvent.WAIT, values=wait):
                            status[row.name] = JobState.WAITING.value
                        continue
                elif row.environment is not None and not env_gates[row.id].passed:
                    continue  # never queued past an undecided or rejected gate
            if locked.gated:  # the run waits for its workflow concurrency group: the job waits with it
                wait = {"wait_reason": locked.wait_reason, "needs_satisfied": True}
                if await set_job_status(conn, row.id, JobState.WAITING, JobEvent.WAIT, values=wait):
                    status[row.name] = JobState.WAITING.value
                continue
            if row.concurrency_group_id is not None:
                if row.id not in gated:
                    gate.append(row)
                    gated.add(row.id)
                continue
            if await enqueuer.enqueue(conn, row, from_waiting=released, from_held=approved):
                status[row.name] = JobState.QUEUED.value
                queued.append(row.id)
            else:
                status[row.name] = JobState.FAILED.value
                errors[row.name] = QUEUE_FULL_ERROR
                failed.append(row.id)
            changed = True
        if not changed:
            break
    leaving = [
        row for row in rows
        if row.concurrency_group_id is not None and row.concurrency_state in _IN_GROUP and is_terminal(status[row.name])
    ]
    if gate or leaving:
        await _job_groups(conn, locked, gate, leaving, status, enqueuer, queued)
    await enqueuer.flush(conn)

    final_status = run_status
    finished = False
    aggregate = aggregate_run_status(status.values())
    if all(is_terminal(s) for s in status.values()):
        target = aggregate
        if cancelling and target == RunStatus.SUCCESS:
            target = RunStatus.CANCELLED
        values: dict[str, Any] = {"status": target.value, "finished_at": now}
        if target == RunStatus.FAILED:
            reason = next(
                (
                    f"job {row.name}: {errors[row.name] or status[row.name]}"
                    for row in rows
                    if status[row.name] in (JobState.FAILED, JobState.TIMED_OUT_STALE, JobState.DRIFT_DROPPED)
                ),
                None,
            )
            values["failure_reason"] = sa.func.coalesce(runs.c.failure_reason, reason)
        result = await conn.execute(
            runs.update().where(runs.c.id == run_id, runs.c.status.in_(_ACTIVE_RUN_STATUSES)).values(**values)
        )
        if result.rowcount == 1:
            final_status, finished = target.value, True
            if locked.group_id is not None and locked.slot in _IN_GROUP:
                await _leave_run_group(conn, locked, limits=limits, now=now)
    elif aggregate == RunStatus.RUNNING and run_status == RunStatus.PENDING.value:
        result = await conn.execute(
            runs.update()
            .where(runs.c.id == run_id, runs.c.status == RunStatus.PENDING.value)
            .values(status=RunStatus.RUNNING.value, started_at=sa.func.coalesce(runs.c.started_at, now))
        )
        if result.rowcount == 1:
            final_status = RunStatus.RUNNING.value
    completed = [*finished_jobs, *skipped, *failed, *cancelled]
    if completed or finished:
        await report_jobs(conn, run_id, completed, outbox.CHECK_COMPLETED, run_finished=finished)
    return SettleResult(queued, skipped, final_status, failed=failed, cancelled=cancelled, finished=finished)


_IN_GROUP = (ConcurrencyState.WAITING.value, ConcurrencyState.HOLDING.value)

_WAITING_JOB = sa.select(
    jobs.c.id, jobs.c.run_id, jobs.c.org_id, jobs.c.name, jobs.c.status, jobs.c.runs_on, jobs.c.exclude_labels
).where(jobs.c.id == sa.bindparam("v_job_id"))


async def _job_groups(
    conn: AsyncConnection,
    locked: LockedRun,
    gate: list[Any],
    leaving: list[Any],
    status: dict[str, str],
    enqueuer: _Enqueuer,
    queued: list[str],
) -> None:
    """Job concurrency groups for one settle: jobs that ended leave their group, ready ones join theirs,
    then each touched group admits its oldest waiting jobs into its free places (this run's own ready
    jobs included: FIFO across runs). Own jobs not admitted wait (`pending → waiting`)."""
    await groups.serialize(conn, locked.org_id)
    await groups.set_job_state(conn, [row.id for row in leaving], ConcurrencyState.RELEASED)
    touched = {row.concurrency_group_id for row in leaving} | {row.concurrency_group_id for row in gate}
    found = {gid: await groups.get_group(conn, gid) for gid in sorted(touched)}
    for row in gate:
        group = found[row.concurrency_group_id]
        if group is not None:
            await groups.join_job(conn, row.id, group)
    own = {row.id: row for row in gate}
    admitted: set[str] = set()
    for gid in sorted(touched):
        group = found[gid]
        if group is not None:
            admitted |= await _admit_jobs(conn, group, own, status, enqueuer, locked.id)
    for row in gate:
        if row.id in admitted:
            status[row.name] = JobState.QUEUED.value
            queued.append(row.id)
        elif status[row.name] in (JobState.PENDING.value, JobState.HELD.value):
            group = found[row.concurrency_group_id]
            reason = groups.wait_reason(group.name) if group is not None else None
            values = {"wait_reason": reason, "needs_satisfied": True}
            if await set_job_status(conn, row.id, JobState.WAITING, JobEvent.WAIT, values=values):
                status[row.name] = JobState.WAITING.value


async def _admit_jobs(
    conn: AsyncConnection,
    group: groups.Group,
    own: dict[str, Any],
    status: dict[str, str],
    enqueuer: _Enqueuer,
    run_id: str,
) -> set[str]:
    """Admit the group's oldest waiting jobs while it has free places; the ids of `own` jobs admitted."""
    admitted: set[str] = set()
    while True:
        waiting = await groups.next_waiting_jobs(conn, group)
        if not waiting:
            return admitted
        first = waiting[0]
        row = own.get(first.id)
        if row is None:
            # another run's job (or one of this run's from an earlier settle): lock its run without waiting
            # (lock order); a run held elsewhere is being changed right now — its holder or the reconcile
            # sweep admits the job later, and FIFO says nobody may overtake it meanwhile
            if first.run_id != run_id and not await groups.lock_runs(conn, [first.run_id], skip_locked=True):
                return admitted
            row = (await conn.execute(_WAITING_JOB, {"v_job_id": first.id})).first()
            if row is None or str(row.status) != JobState.WAITING.value:
                await groups.set_job_state(conn, [first.id], ConcurrencyState.RELEASED)
                continue
            await groups.set_job_state(conn, [first.id], ConcurrencyState.HOLDING)
            await enqueuer.enqueue(conn, row, from_waiting=True)
            if row.name in status and first.run_id == run_id:
                status[row.name] = JobState.QUEUED.value
            continue
        await groups.set_job_state(conn, [first.id], ConcurrencyState.HOLDING)
        from_waiting = status[row.name] == JobState.WAITING.value
        from_held = status[row.name] == JobState.HELD.value
        if await enqueuer.enqueue(conn, row, from_waiting=from_waiting, from_held=from_held):
            admitted.add(first.id)
        else:  # the queue is full: the job failed, and its place goes to the next one
            status[row.name] = JobState.FAILED.value
            await groups.set_job_state(conn, [first.id], ConcurrencyState.RELEASED)


async def _leave_run_group(conn: AsyncConnection, locked: LockedRun, *, limits: QueueLimits, now: dt.datetime) -> None:
    """The run ended: its place in its workflow concurrency group goes to the next waiting run."""
    assert locked.group_id is not None
    await groups.serialize(conn, locked.org_id)
    await groups.set_run_state(conn, locked.id, ConcurrencyState.RELEASED)
    group = await groups.get_group(conn, locked.group_id)
    if group is not None:
        await admit_runs(conn, group, limits=limits, now=now)


async def admit_runs(
    conn: AsyncConnection, group: groups.Group, *, limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    now: dt.datetime | None = None,
) -> dict[str, SettleResult]:
    """Admit the group's oldest waiting runs while it has free places (the caller holds the concurrency
    lock): each goes `holding` and is settled, which queues its ready jobs. Stops at a waiting run whose
    row another transaction holds (see `store.concurrency`)."""
    results: dict[str, SettleResult] = {}
    while True:
        waiting = await groups.next_waiting_runs(conn, group)
        if not waiting or not await groups.lock_runs(conn, waiting[:1], skip_locked=True):
            return results
        await groups.set_run_state(conn, waiting[0], ConcurrencyState.HOLDING)
        locked = await lock_run_row(conn, waiting[0])
        if locked is not None:
            results[waiting[0]] = await settle_run(conn, waiting[0], limits=limits, now=now, locked=locked)


async def admit_waiting_jobs(
    conn: AsyncConnection, group: groups.Group, *, limits: QueueLimits = DEFAULT_QUEUE_LIMITS
) -> int:
    """The reconcile sweep's job-group pass: admit waiting jobs into free places (caller holds the lock)."""
    enqueuer = _Enqueuer(limits, utcnow())
    await _admit_jobs(conn, group, {}, {}, enqueuer, "")
    count = len(enqueuer.rows)
    await enqueuer.flush(conn)
    return count


async def record_step(
    conn: AsyncConnection,
    job_id: str,
    step_index: int,
    name: str,
    state: str,
    *,
    duration_ms: int | None = None,
    error: str | None = None,
    agent_id: str | None = None,
) -> bool:
    """Insert or update a step's row. `agent_id` given → only for a job that agent owns. False when the
    job does not exist (or belongs to another agent)."""
    query = sa.select(jobs.c.agent_id).where(jobs.c.id == job_id)
    found = (await conn.execute(query)).first()
    if found is None or (agent_id is not None and found.agent_id != agent_id):
        return False
    now = utcnow()
    running = state == "running"
    values: dict[str, Any] = {"name": name, "status": state}
    if duration_ms is not None:
        values["duration_ms"] = duration_ms
    if error is not None:
        values["error"] = error
    insert_values = {
        "job_id": job_id,
        "step_index": step_index,
        "log_bytes": 0,
        "started_at": now if running else None,
        "finished_at": None if running else now,
        **values,
    }
    update_values: dict[str, Any] = dict(values)
    if running:
        update_values["started_at"] = sa.func.coalesce(steps.c.started_at, now)
    else:
        update_values["finished_at"] = now
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        pg_statement = pg_insert(steps).values(**insert_values)
        await conn.execute(
            pg_statement.on_conflict_do_update(index_elements=[steps.c.job_id, steps.c.step_index], set_=update_values)
        )
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite_statement = sqlite_insert(steps).values(**insert_values)
        await conn.execute(
            lite_statement.on_conflict_do_update(
                index_elements=[steps.c.job_id, steps.c.step_index], set_=update_values
            )
        )
    return True


# -- cancel ------------------------------------------------------------------------------------------


async def cancel_run(
    conn: AsyncConnection, run_id: str, *, by: str, force: bool, reason: str | None = None
) -> CancelResult:
    """Cancel a run: jobs not started yet are cancelled now (their pending queue rows expire); jobs on an
    agent are left for it (the caller sends `job.cancel`, with `force`) and the run goes `cancelling`
    until they report. `RunNotFound`, or `RunFinished` for a terminal run. Cancelling an already
    cancelling run is allowed (a retry, or a `force` escalation)."""
    del force  # the agent applies it; nothing differs in the database
    run_status = await lock_run(conn, run_id)
    if run_status is None:
        raise RunNotFound(run_id)
    if is_run_terminal(run_status):
        raise RunFinished(run_id, run_status)
    now = utcnow()
    # queue rows before jobs (lock order): a claim racing with us either finished first (the row is no
    # longer pending and its agent is told below) or finds the row expired
    await conn.execute(sa.select(dispatch_queue.c.id).where(dispatch_queue.c.run_id == run_id).with_for_update())
    await conn.execute(
        dispatch_queue.update()
        .where(dispatch_queue.c.run_id == run_id, dispatch_queue.c.status == QueueStatus.PENDING.value)
        .values(status=QueueStatus.EXPIRED.value)
    )
    rows = list(
        await conn.execute(
            sa.select(jobs.c.id, jobs.c.status, jobs.c.agent_id)
            .where(jobs.c.run_id == run_id)
            .order_by(jobs.c.created_at, jobs.c.name)
        )
    )
    cancel_reason = reason or f"cancelled by {by}"
    cancelled_jobs: list[str] = []
    running: list[tuple[str, str]] = []
    for row in rows:
        if row.status in _NOT_STARTED:
            if await set_job_status(
                conn, row.id, JobState.CANCELLED, JobEvent.CANCEL, values={"error": cancel_reason}
            ):
                cancelled_jobs.append(row.id)
                await close_queue_row(conn, row.id, JobState.CANCELLED.value)
                if row.agent_id is not None:  # handed out but not started: tell the agent too
                    running.append((row.id, row.agent_id))
        elif row.status in _ON_AGENT and row.agent_id is not None:
            running.append((row.id, row.agent_id))
    await conn.execute(
        runs.update()
        .where(runs.c.id == run_id)
        .values(
            status=RunStatus.CANCELLING.value,
            cancelled_by=by,
            failure_reason=sa.func.coalesce(runs.c.failure_reason, cancel_reason),
        )
    )
    settled = await settle_run(conn, run_id, now=now, finished_jobs=cancelled_jobs)
    final = settled.run_status or RunStatus.CANCELLING.value
    status: Literal["cancelling", "cancelled"] = "cancelling" if final == RunStatus.CANCELLING.value else "cancelled"
    return CancelResult(status=status, cancelled_jobs=cancelled_jobs + settled.cancelled, running=running,
                        run_status=final)


# -- heartbeats, stale jobs, workflow timeouts -----------------------------------------------------------


async def touch_heartbeat(conn: AsyncConnection, job_id: str, agent_id: str, now: dt.datetime) -> bool:
    """Record a `job.heartbeat` from the job's agent; False for a job it does not own or not running."""
    result = await conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id, jobs.c.agent_id == agent_id, jobs.c.status.in_(_ON_AGENT))
        .values(last_heartbeat_at=now)
    )
    return result.rowcount == 1


async def find_stale_jobs(
    conn: AsyncConnection, *, now: dt.datetime, stale_after_ms: int, clock_floor: dt.datetime | None = None,
    node_lease: dt.timedelta | None = None,
) -> list[str]:
    """Job ids gone silent: running (or cancelling) jobs whose last heartbeat — or start, without one — is
    older than `stale_after_ms`, and jobs acknowledged by an agent that never reported them running.

    `clock_floor` (the time this orchestrator started): no job's silence is counted from before it.
    While no orchestrator was running nobody could receive a heartbeat, so an agent must not be presumed
    lost for that time: every stale clock restarts when the orchestrator does.

    `node_lease` (`KICI_NODE_LEASE_SECONDS`): likewise in a cluster, a job's silence counts only while the
    node holding its agent's connection was known alive (up to its last lease renewal): heartbeats sent
    through a dead node reached nobody. A job whose agent is held by a node that died before the
    threshold was reached is left to the node's takeover, which makes it `recovering` with the full
    reconnect window (`kici.orchestrator.cluster.node`); without this, a stale threshold close to the
    lease fails the jobs of every agent whose node was killed."""
    cutoff = now - dt.timedelta(milliseconds=stale_after_ms)
    if clock_floor is not None and clock_floor >= cutoff:
        return []
    since = sa.func.coalesce(jobs.c.last_heartbeat_at, jobs.c.started_at, jobs.c.queued_at)
    silent = sa.select(jobs.c.id, since.label("since"), jobs.c.agent_id).where(
        jobs.c.status.in_([JobState.RUNNING.value, JobState.CANCELLING.value]),
        since < cutoff,
    )
    never_started = (
        sa.select(jobs.c.id, dispatch_queue.c.dispatched_at.label("since"), dispatch_queue.c.agent_id)
        .join(dispatch_queue, dispatch_queue.c.job_id == jobs.c.id)
        .where(
            jobs.c.status == JobState.QUEUED.value,
            dispatch_queue.c.status == QueueStatus.DISPATCHED.value,
            dispatch_queue.c.ack_deadline.is_(None),
            dispatch_queue.c.dispatched_at < cutoff,
        )
    )
    found: list[str] = []
    for query in (silent, never_started):
        candidates = query.subquery()
        rows = await conn.execute(
            sa.select(candidates.c.id, candidates.c.since, agents.c.connected, agents.c.node_id,
                      nodes.c.lease_expires_at)
            .select_from(candidates)
            .outerjoin(agents, agents.c.id == candidates.c.agent_id)
            .outerjoin(nodes, nodes.c.id == agents.c.node_id)
        )
        for row in rows:
            job_id = str(row.id)
            if job_id in found:
                continue
            if node_lease is not None and row.connected and row.node_id is not None:
                if row.lease_expires_at is None:
                    continue  # its node was declared dead: the takeover settles the job
                alive_until = _aware(row.lease_expires_at) - node_lease
                if alive_until - _aware(row.since) < dt.timedelta(milliseconds=stale_after_ms):
                    continue
            found.append(job_id)
    return found


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


async def mark_job_stale(
    conn: AsyncConnection, job_id: str, reason: str, *, limits: QueueLimits = DEFAULT_QUEUE_LIMITS
) -> bool:
    """`timed_out_stale` through a guarded update (a job that finished meanwhile stays as it is), queue
    row failed, run settled. False when ignored."""
    return await finish_job(
        conn, job_id, JobState.TIMED_OUT_STALE, JobEvent.STALE, error=reason, failure_category="stale", limits=limits
    )


async def find_overdue_runs(conn: AsyncConnection, *, now: dt.datetime) -> list[str]:
    """Ids of pending/running runs older than their workflow timeout (counted from the run's creation, or
    from its approval for a run that was held); the caller cancels them with reason `workflow_timeout`."""
    rows = await conn.execute(
        sa.select(runs.c.id, runs.c.created_at, runs.c.approved_at, runs.c.timeout_ms)
        .where(
            runs.c.status.in_([RunStatus.PENDING.value, RunStatus.RUNNING.value]),
            runs.c.timeout_ms.is_not(None),
            runs.c.timeout_ms > 0,
        )
        .order_by(runs.c.created_at)
    )
    return [
        str(row.id) for row in rows
        if (row.approved_at or row.created_at) + dt.timedelta(milliseconds=int(row.timeout_ms)) <= now
    ]


# -- held runs (trust) -----------------------------------------------------------------------------------


class RunNotHeld(Exception):
    """The run is not `held` (never was, or was decided already: approved, rejected, expired, cancelled)."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is not held (status {status})")
        self.run_id = run_id
        self.status = status


@dataclass(frozen=True)
class ReleasedRun:
    settled: SettleResult
    superseded: list[Superseded]
    """Older runs of its concurrency group the released run cancelled (`cancel_in_progress`)."""


async def _lock_held(conn: AsyncConnection, run_id: str) -> LockedRun:
    locked = await lock_run_row(conn, run_id)
    if locked is None:
        raise RunNotFound(run_id)
    if locked.status != RunStatus.HELD.value:
        raise RunNotHeld(run_id, locked.status)
    return locked


async def release_held_run(
    conn: AsyncConnection, run_id: str, *, secrets_allowed: bool, limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    now: dt.datetime | None = None,
) -> ReleasedRun:
    """Approve a held run at the commit it was created for: `trust` approved, the run `pending`, and its
    jobs go on as a new run's would — held roots queued (or waiting for their concurrency group, which
    the run joins now), dependents pending. `RunNotFound`, `RunNotHeld`."""
    locked = await _lock_held(conn, run_id)
    now = now or utcnow()
    held_query = sa.select(jobs.c.id).where(jobs.c.run_id == run_id, jobs.c.status == JobState.HELD.value)
    held_jobs = [str(r) for r in (await conn.execute(held_query)).scalars()]
    await conn.execute(
        runs.update()
        .where(runs.c.id == run_id, runs.c.status == RunStatus.HELD.value)
        .values(status=RunStatus.PENDING.value, trust=RunTrust.APPROVED.value, secrets_allowed=secrets_allowed,
                hold_expires_at=None, approved_at=now)
    )
    row = (
        await conn.execute(
            sa.select(runs.c.workflow_spec, runs.c.event, runs.c.repo, runs.c.sha, runs.c.ref)
            .where(runs.c.id == run_id)
        )
    ).one()
    superseded: list[Superseded] = []
    workflow = Workflow.model_validate(row.workflow_spec) if row.workflow_spec else None
    event = Event.model_validate(row.event) if row.event else None
    run_group: str | None = None
    if workflow is not None and event is not None:
        new = NewRun(org_id=locked.org_id, workflow=workflow, event=event, repo=str(row.repo), ref=row.ref,
                     sha=str(row.sha), lock_content_hash=None, delivery_id=None, source_id=None)
        run_group, _ = _concurrency_groups(new, [])
    if run_group is not None:
        assert workflow is not None and event is not None
        settled, superseded = await _join_workflow_group(conn, run_id, new, run_group, limits=limits, now=now)
    else:
        settled = await settle_run(conn, run_id, limits=limits, now=now,
                                   locked=LockedRun(run_id, RunStatus.PENDING.value, locked.org_id))
    # the held jobs' check runs said `action_required` (completed): each gets a new one, queued
    await forget_check_runs(conn, held_jobs)
    await report_jobs(conn, run_id, held_jobs, outbox.CHECK_QUEUED)
    return ReleasedRun(settled, superseded)


async def end_held_run(
    conn: AsyncConnection, run_id: str, *, event: Literal[JobEvent.REJECT, JobEvent.EXPIRE], by: str, reason: str
) -> CancelResult:
    """Reject a held run, or expire its hold: its held jobs are cancelled through `event`, the rest as a
    cancel would, and the run ends `cancelled` with `reason`. `RunNotFound`, `RunNotHeld`."""
    await _lock_held(conn, run_id)
    held_ids = [
        str(r)
        for r in (
            await conn.execute(
                sa.select(jobs.c.id).where(jobs.c.run_id == run_id, jobs.c.status == JobState.HELD.value)
            )
        ).scalars()
    ]
    values = {"error": reason, "finished_at": utcnow()}
    ended = [
        job_id for job_id in held_ids if await set_job_status(conn, job_id, JobState.CANCELLED, event, values=values)
    ]
    await conn.execute(runs.update().where(runs.c.id == run_id).values(hold_expires_at=None))
    result = await cancel_run(conn, run_id, by=by, force=False, reason=reason)
    # their `action_required` check runs are completed already: new ones say `cancelled`
    await forget_check_runs(conn, ended)
    await report_jobs(conn, run_id, ended, outbox.CHECK_COMPLETED)
    return CancelResult(status=result.status, cancelled_jobs=ended + result.cancelled_jobs, running=result.running,
                        run_status=result.run_status)


async def list_held_runs(
    conn: AsyncConnection, *, org_id: str | None = None, run_id: str | None = None
) -> list[RunRecord]:
    """Runs still `held`, oldest first (of one org, or every org when None; or just `run_id`)."""
    query = sa.select(runs).where(runs.c.status == RunStatus.HELD.value)
    if org_id is not None:
        query = query.where(runs.c.org_id == org_id)
    if run_id is not None:
        query = query.where(runs.c.id == run_id)
    rows = await conn.execute(query.order_by(runs.c.created_at, runs.c.id))
    return [RunRecord.model_validate(dict(row._mapping)) for row in rows]


async def find_expired_holds(conn: AsyncConnection, *, now: dt.datetime, limit: int = 100) -> list[str]:
    """Ids of held runs whose hold expired (the sweeper ends them with `EXPIRE`)."""
    rows = await conn.execute(
        sa.select(runs.c.id)
        .where(runs.c.status == RunStatus.HELD.value, runs.c.hold_expires_at.is_not(None),
               runs.c.hold_expires_at <= now)
        .order_by(runs.c.hold_expires_at)
        .limit(limit)
    )
    return [str(r) for r in rows.scalars()]


async def held_runs_of_pr(conn: AsyncConnection, *, org_id: str, source_id: str, repo: str, pr_number: int,
                          sha: str) -> list[str]:
    """The unfinished runs of one pull request at one head commit: what a `/kici approve` comment may decide
    (held runs, and runs whose jobs wait at a deployment environment's gate; the held service tells which
    have anything pending)."""
    undecided = (RunStatus.HELD.value, RunStatus.PENDING.value, RunStatus.RUNNING.value)
    rows = await conn.execute(
        sa.select(runs.c.id, runs.c.event)
        .where(runs.c.org_id == org_id, runs.c.source_id == source_id, runs.c.repo == repo, runs.c.sha == sha,
               runs.c.status.in_(undecided))
        .order_by(runs.c.created_at)
    )
    return [str(r.id) for r in rows if (r.event or {}).get("pr_number") == pr_number]
