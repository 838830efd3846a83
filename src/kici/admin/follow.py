"""Reading a run's job logs through the admin API, once or following them live (`runs logs`, `runs watch`).

The logs route pages by cursor: `GET runs/{run}/jobs/{job}/logs?after=N&limit=M` answers the lines after
`N`, the cursor to ask from next time (`next`), and `complete` once the job is terminal and nothing is
left to read. Following is polling: every `POLL_INTERVAL_S` the run, its jobs and each incomplete job's
new lines are fetched, until the run has finished and every job's log is complete — so nothing written
in the run's last moments is lost. Between rounds the follower long-polls a running job's log (`wait`):
its lines show as soon as any node of the cluster stores them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import click

from kici.admin.client import AdminClient, AdminCLIError
from kici.admin.output import duration, status_text

POLL_INTERVAL_S = 0.5
MIN_ROUND_S = 0.05
"""Rounds that found lines at once are at least this far apart: a fast log is read in batches."""
PAGE_SIZE = 1000
LOGGING_JOB_STATUSES = frozenset({"running", "recovering", "cancelling"})
"""Job statuses in which lines may come: the job whose log a follow round waits on is in one of them."""
ACTIVE_RUN_STATUSES = frozenset({"pending", "running", "cancelling", "held"})
"""Run statuses that can still change; any other status (success, failed, cancelled, or one this client
does not know yet) means the run has finished."""


def run_finished(run: dict[str, Any]) -> bool:
    return str(run.get("status")) not in ACTIVE_RUN_STATUSES


def _part(value: str) -> str:
    return quote(value, safe="")


@dataclass
class JobLog:
    """Where reading one job's log stands."""

    id: str
    name: str
    status: str
    agent: str | None = None
    after: int = 0
    complete: bool = False
    index: int = 0
    """Position in the run's plan order."""
    info: dict[str, Any] = field(default_factory=dict)
    """The job as the API last answered it (times, wait reason, steps)."""

    def step_name(self, index: int) -> str | None:
        return next((str(s.get("name")) for s in self.info.get("steps") or [] if s.get("index") == index), None)


@dataclass(frozen=True)
class LogLine:
    job: JobLog
    n: int
    step: int
    line: str


class RunLogs:
    """A run's jobs (all of them in plan order, or the one `--job` names) and their log cursors."""

    def __init__(self, client: AdminClient, run_id: str, *, job: str | None = None,
                 page_size: int = PAGE_SIZE) -> None:
        self.client = client
        self.run_id = run_id
        self.wanted = job
        self.page_size = page_size
        self.jobs: list[JobLog] = []

    def run(self) -> dict[str, Any]:
        found: dict[str, Any] = self.client.get(f"/runs/{_part(self.run_id)}")
        return found

    def refresh_jobs(self) -> list[JobLog]:
        """Re-read the run's jobs: statuses change, and a job may be added while the run goes on."""
        listed: list[dict[str, Any]] = self.client.get(f"/runs/{_part(self.run_id)}/jobs")
        if self.wanted is not None:
            chosen = [j for j in listed if self.wanted in (j.get("id"), j.get("name"))]
            if not chosen:
                names = ", ".join(str(j.get("name")) for j in listed) or "none"
                raise AdminCLIError(f"run {self.run_id} has no job {self.wanted!r} (its jobs: {names})")
            listed = chosen
        known = {j.id: j for j in self.jobs}
        jobs = []
        for index, item in enumerate(listed):
            job = known.get(str(item["id"])) or JobLog(id=str(item["id"]), name=str(item["name"]), status="")
            job.status = str(item.get("status"))
            job.agent = item.get("agent")
            job.index = index
            job.info = item
            jobs.append(job)
        self.jobs = jobs
        return jobs

    def read(self, job: JobLog, *, wait: float = 0.0) -> Iterator[LogLine]:
        """The job's lines after its cursor, page after page, until none are left for now. `wait`: when
        there are none yet, the orchestrator answers as soon as some are stored, or after that many seconds
        (a long poll; lines stored through another node of a cluster end it as well)."""
        first = True
        while not job.complete:
            page: dict[str, Any] = self.client.get(
                f"/runs/{_part(self.run_id)}/jobs/{_part(job.id)}/logs", after=job.after, limit=self.page_size,
                wait=wait if first and wait > 0 else None,
            )
            first = False
            lines = page.get("lines") or []
            for item in lines:
                yield LogLine(job, int(item.get("n", 0)), int(item.get("step", 0)), str(item.get("line", "")))
            cursor = int(page.get("next", job.after))
            moved = cursor != job.after
            job.after = cursor
            job.complete = bool(page.get("complete"))
            if not lines or not moved:
                return

    def all_complete(self) -> bool:
        return all(j.complete for j in self.jobs)


SETUP_STEP = -1
"""The step index of a job's setup output (clone, drift check)."""


class LinePrinter:
    """Prints log lines; prefixed by the job's name (padded to the longest) when several jobs are shown.
    A header line (`── step 2: test ──`; steps numbered from 1) goes before the first line of each step of
    a job, and again when another step's lines came in between."""

    def __init__(self, logs: RunLogs) -> None:
        self.logs = logs
        self.current: dict[str, int] = {}
        """Job id → the step whose lines it printed last."""

    def prefix(self, job: JobLog) -> str:
        if len(self.logs.jobs) < 2:
            return ""
        width = max(len(j.name) for j in self.logs.jobs)
        return f"{job.name:<{width}} | "

    def header(self, job: JobLog, step: int) -> str:
        if step == SETUP_STEP:
            return "── setup ──"
        name = job.step_name(step)
        return f"── step {step + 1}: {name} ──" if name else f"── step {step + 1} ──"

    def __call__(self, line: LogLine) -> None:
        prefix = self.prefix(line.job)
        if self.current.get(line.job.id) != line.step:
            self.current[line.job.id] = line.step
            click.echo(prefix + self.header(line.job, line.step))
        click.echo(prefix + line.line)


def print_logs(logs: RunLogs) -> None:
    """Everything logged so far, job after job in plan order."""
    logs.run()  # a clear "no run" 404 before anything else
    printer = LinePrinter(logs)
    for job in logs.refresh_jobs():
        for line in logs.read(job):
            printer(line)


RoundHook = Callable[[dict[str, Any]], None]


def follow(logs: RunLogs, *, before: RoundHook | None = None, after: RoundHook | None = None,
           printer: Callable[[LogLine], None] | None = None, interval: float | None = None) -> dict[str, Any]:
    """Print new lines as they arrive until the run has finished and every job's log is complete; return
    the finished run. `before` and `after` see each round's run (with `logs.jobs` fresh) around its lines.
    `interval` defaults to `POLL_INTERVAL_S` as it is at call time."""
    show = printer or LinePrinter(logs)
    pause = POLL_INTERVAL_S if interval is None else interval
    while True:
        # the run is read first: if it had finished before the lines were read, no line can come after them
        run = logs.run()
        logs.refresh_jobs()
        if before is not None:
            before(run)
        for job in logs.jobs:
            for line in logs.read(job):
                show(line)
        if after is not None:
            after(run)
        if run_finished(run) and logs.all_complete():
            return run
        # instead of sleeping, wait on a running job's log: its next lines show the moment they are stored
        # (the other jobs' at the next round, as before)
        waited = next((j for j in logs.jobs if not j.complete and j.status in LOGGING_JOB_STATUSES), None)
        if waited is None:
            time.sleep(pause)
            continue
        started = time.monotonic()
        shown = 0
        for line in logs.read(waited, wait=pause):
            show(line)
            shown += 1
        # nothing came: the wait ran out (or an orchestrator without long polls answered at once)
        time.sleep(max(0.0, (MIN_ROUND_S if shown else pause) - (time.monotonic() - started)))


# -- watch -------------------------------------------------------------------------------------------

ACTIVE_JOB_STATUSES = frozenset({"pending", "queued", "running", "recovering", "cancelling", "held", "waiting"})


def _parse_time(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _elapsed(run: dict[str, Any]) -> str | None:
    start = _parse_time(run.get("started_at")) or _parse_time(run.get("created_at"))
    end = _parse_time(run.get("finished_at"))
    if start is None or end is None:
        return None
    return duration((end - start).total_seconds())


def _changed_at(job: JobLog) -> dt.datetime:
    """When the job reached its current status, as far as the API says (for ordering changes)."""
    info = job.info
    if job.status not in ACTIVE_JOB_STATUSES:
        key = "finished_at"
    elif job.status in ("running", "recovering", "cancelling"):
        key = "started_at"
    elif job.status == "queued":
        key = "queued_at"
    else:
        key = "created_at"
    found = _parse_time(info.get(key)) or _parse_time(info.get("created_at"))
    return found or dt.datetime.min.replace(tzinfo=dt.UTC)


class Watcher:
    """`runs watch`: the run's and its jobs' status changes, and log lines as they arrive, then one summary
    line.

    Attaching (the first round) prints every job's current status in plan order, whatever happened
    before — a watch attached late must not show a finished job after one that started after it. From
    then on changes are printed in the order they happened (by the job's own timestamps, plan order for
    ties). A job's move to a final status is shown after the lines read in the same round, so it comes
    after the job's last lines — and so is every change that happened after it, to keep the order; the
    changes before it are shown before the lines."""

    def __init__(self, logs: RunLogs) -> None:
        self.logs = logs
        self.lines = LinePrinter(logs)
        self.seen: dict[str, str] = {}
        self.run_status: str | None = None
        self.deferred: list[JobLog] = []
        """This round's changes from the first move to a final status on: shown after the round's lines."""

    def _show(self, job: JobLog, width: int) -> None:
        self.seen[job.id] = job.status
        on = f" on {job.agent}" if job.agent and job.status in ("running", "recovering") else ""
        click.echo(f"== {job.name:<{width}} {status_text({**job.info, 'status': job.status})}{on}")

    def _changes(self) -> None:
        width = max((len(j.name) for j in self.logs.jobs), default=0)
        changed = sorted(
            (job for job in self.logs.jobs if self.seen.get(job.id) != job.status),
            key=lambda j: (_changed_at(j), j.index),
        )
        first_final = next((i for i, j in enumerate(changed) if j.status not in ACTIVE_JOB_STATUSES), len(changed))
        for job in changed[:first_final]:
            self._show(job, width)
        self.deferred = changed[first_final:]

    def before(self, run: dict[str, Any]) -> None:
        status = str(run.get("status"))
        if self.run_status is None:
            ref = f" {run['ref']}" if run.get("ref") else ""
            click.echo(f"Run {run.get('id', self.logs.run_id)} ({run.get('workflow')} on {run.get('repo')}{ref}): "
                       f"{status_text(run)}")
            width = max((len(j.name) for j in self.logs.jobs), default=0)
            for job in self.logs.jobs:  # the state at attach time, in plan order
                self._show(job, width)
        elif status != self.run_status and not run_finished(run):
            click.echo(f"== run {status}")  # the final status is the summary's
        self.run_status = status
        self._changes()

    def after(self, _run: dict[str, Any]) -> None:
        width = max((len(j.name) for j in self.logs.jobs), default=0)
        for job in self.deferred:
            self._show(job, width)
        self.deferred = []

    def summary(self, run: dict[str, Any]) -> str:
        counts: dict[str, int] = {}
        for job in self.logs.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        jobs = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no jobs"
        took = _elapsed(run)
        reason = f"; {run['failure_reason']}" if run.get("failure_reason") else ""
        return (f"Run {run.get('id', self.logs.run_id)} {run.get('status')}{' in ' + took if took else ''} "
                f"(jobs: {jobs}){reason}")

    def watch(self, interval: float | None = None) -> dict[str, Any]:
        run = follow(self.logs, before=self.before, after=self.after, printer=self.lines, interval=interval)
        click.echo(self.summary(run))
        return run
