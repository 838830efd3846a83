"""`kici run local EVENT`: run the matched workflows on this machine through the same runner agents use.

Each job runs in its own runner child process (`kici.runner`) in an isolated copy of HEAD plus the
working tree's uncommitted changes. Jobs whose needs are settled run concurrently (up to
`--concurrency`); a failed upstream skips its dependents unless their `when` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import click

from kici.cli.common import Prepared, fail, prepare
from kici.cli.concurrency import GroupSlots, requested_groups
from kici.cli.events import EventSpecError, parse_pairs
from kici.cli.secrets_file import SecretsFileError, load_secrets
from kici.compiler.project import Project
from kici.engine.inputs import InputError, dispatch_input_specs, resolve_inputs
from kici.engine.lockfile import Workflow
from kici.engine.needs import decide
from kici.engine.plan import PlannedJob, children_by_job, plan_workflow
from kici.engine.runner_protocol import (
    WORKFLOW_HOOKS_JOB,
    CacheReply,
    CacheRequest,
    JobResult,
    JobSpec,
    JobStarted,
    LogLine,
    LogLines,
    StepStatus,
    log_lines,
)
from kici.engine.states import RunStatus, aggregate_run_status
from kici.runner import cache_keys, toolchains
from kici.runner.client import RunnerProcess, safe_base_env
from kici.runner.spawn import Spawned
from kici.runner.toolchains import Interpreter

TERMINAL = {"success", "failed", "cancelled", "skipped", "timed_out_stale", "drift_dropped"}
STEP_MARK = {"success": "✓", "failed": "✗", "skipped": "-", "cancelled": "⊘", "timed_out": "⏱"}
STEP_COLOR = {"success": "green", "failed": "red", "skipped": "bright_black", "cancelled": "yellow",
              "timed_out": "red"}


@dataclass
class StepReport:
    name: str
    status: str = "pending"
    duration_ms: int | None = None
    error: str | None = None
    attempt: int = 1


@dataclass
class JobRun:
    key: str
    """`workflow/job name`: unique across the whole local run."""
    workflow: Workflow
    planned: PlannedJob
    status: str = "pending"
    steps: list[StepReport] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    log: list[str] = field(default_factory=list)
    run_status: str | None = None
    """For the workflow-hooks pseudo job: how the workflow's jobs ended."""
    inputs: dict[str, Any] | None = None
    """Dispatch inputs typed by the workflow's dispatch trigger (None: the event's as given)."""

    @property
    def is_hooks(self) -> bool:
        return self.planned.job == WORKFLOW_HOOKS_JOB

    @property
    def duration_ms(self) -> int | None:
        if self.started is None or self.finished is None:
            return None
        return round((self.finished - self.started) * 1000)


class Printer:
    """Live per-step output, prefixed with the job name; to stderr when stdout carries JSON."""

    def __init__(self, *, to_stderr: bool, show_workflow: bool) -> None:
        self.err = to_stderr
        self.color = (sys.stderr if to_stderr else sys.stdout).isatty()
        self.show_workflow = show_workflow

    def _prefix(self, job: JobRun) -> str:
        name = f"{job.workflow.name}/{job.planned.name}" if self.show_workflow else job.planned.name
        return click.style(f"[{name}]", fg="cyan", bold=True) if self.color else f"[{name}]"

    def line(self, job: JobRun, text: str, **style: Any) -> None:
        if style and self.color:
            text = click.style(text, **style)
        click.echo(f"{self._prefix(job)} {text}", err=self.err)

    def plain(self, text: str, **style: Any) -> None:
        click.echo(click.style(text, **style) if style and self.color else text, err=self.err)


def run_local(event: str, **options: Any) -> int:
    return asyncio.run(_run_local(event, **options))


async def _run_local(
    event: str,
    *,
    job_filter: tuple[str, ...] = (),
    env: tuple[str, ...] = (),
    concurrency: int = 4,
    keep_going: bool = False,
    in_place: bool = False,
    as_json: bool = False,
    junit: str | None = None,
    step_timeout: float | None = None,
    prespawned: Spawned | None = None,
    **event_kw: Any,
) -> int:
    # The first job's runner is started before the heavy work (by `kici run local` before its imports,
    # else here), so its interpreter start-up overlaps with compiling and copying the repository.
    warm: RunnerProcess | None = (
        await RunnerProcess.adopt(prespawned) if prespawned is not None else await RunnerProcess.spawn()
    )
    slots: GroupSlots | None = None
    workspace_root = Path(tempfile.mkdtemp(prefix="kici-local-"))
    snapshot: Snapshot | None = None
    if not in_place:  # copying the repository overlaps with compiling too
        snapshot = Snapshot(Project.locate(event_kw.get("kici_dir")).root, workspace_root / "src")
        await snapshot.start()
    try:
        prepared = prepare(event, **event_kw)
        try:
            extra_env = parse_pairs(env, "--env")
            secrets = load_secrets(prepared.project.kici_dir)
        except (EventSpecError, SecretsFileError) as exc:
            fail(str(exc))
        jobs = _select_jobs(prepared, job_filter)
        printer = Printer(to_stderr=as_json, show_workflow=len({j.workflow.name for j in jobs}) > 1)
        if not jobs:
            printer.plain("no workflow matched this event; nothing to run (see `kici preview` for why)")
            if as_json:
                click.echo(json.dumps({"status": "success", "workflows": []}, indent=2))
            return 0
        try:
            groups = requested_groups(_unique_workflows(jobs), prepared.event)
        except ValueError as exc:
            fail(str(exc))
        slots = GroupSlots(prepared.project.root)
        try:
            for request in groups:
                await slots.acquire_async(request, lambda message: printer.plain(message, fg="yellow"))
        except asyncio.CancelledError:  # Ctrl-C while waiting for the group
            printer.plain("interrupted while waiting for a concurrency group", fg="yellow")
            return 130
        if snapshot is not None:
            source, snapshot = await snapshot.finish(), None
        else:
            source = prepared.project.root
        executor = LocalExecutor(
            prepared=prepared,
            jobs=jobs,
            snapshot=source,
            workspace_root=workspace_root,
            share_snapshot=in_place or len(jobs) == 1,
            secrets=secrets,
            extra_env=extra_env,
            concurrency=concurrency,
            keep_going=keep_going,
            printer=printer,
            step_timeout_ms=round(step_timeout * 1000) if step_timeout else None,
            warm=warm,
        )
        warm = None
        interrupted = await executor.run()
        status = _overall(jobs)
        jobs = _shown(jobs)
        if junit:
            _write_junit(Path(junit), jobs)
        if as_json:
            click.echo(json.dumps(_summary_json(jobs, status), indent=2))
        else:
            _print_summary(printer, jobs, status)
        if interrupted:
            return 130
        return 0 if status == "success" else 1
    finally:
        if warm is not None:
            await warm.kill(grace=0.5)
        if snapshot is not None:
            await snapshot.abandon()
        shutil.rmtree(workspace_root, ignore_errors=True)
        if slots is not None:
            slots.release()


def _select_jobs(prepared: Prepared, job_filter: tuple[str, ...]) -> list[JobRun]:
    jobs: list[JobRun] = []
    for decision in prepared.decisions:
        if not decision.matched:
            continue
        wf = prepared.lock.workflow(decision.workflow)
        assert wf is not None
        specs = dispatch_input_specs(wf, decision.match.trigger_index if decision.match else None)
        try:
            inputs = resolve_inputs(specs, prepared.event.inputs) if specs else None
        except InputError as exc:
            fail(f"workflow {wf.name!r}: {exc}")
        planned = plan_workflow(wf)
        if job_filter:
            wanted = _with_needs(wf, {j for j in job_filter if wf.job(j) is not None}
                                 | {p.job for p in planned if p.name in job_filter})
            planned = [p for p in planned if p.job in wanted]
        jobs.extend(JobRun(f"{wf.name}/{p.name}", wf, p, inputs=inputs) for p in planned)
        if wf.hooks is not None and not job_filter:
            hooks = PlannedJob("(workflow hooks)", WORKFLOW_HOOKS_JOB, None)
            jobs.append(JobRun(f"{wf.name}/{hooks.name}", wf, hooks, inputs=inputs))
    if job_filter and not jobs:
        fail(f"no matched workflow has job(s) {', '.join(job_filter)}")
    return jobs


def _unique_workflows(jobs: list[JobRun]) -> list[Workflow]:
    seen: dict[str, Workflow] = {}
    for j in jobs:
        seen.setdefault(j.workflow.name, j.workflow)
    return list(seen.values())


def _with_needs(wf: Workflow, names: set[str]) -> set[str]:
    pending = list(names)
    out = set(names)
    while pending:
        job = wf.job(pending.pop())
        for need in job.needs if job else ():
            if need.name not in out:
                out.add(need.name)
                pending.append(need.name)
    return out


def changed_paths(status: bytes, prefix: str = "") -> list[str]:
    """Paths (relative to the directory `prefix` names inside the repository) that differ from HEAD,
    from `git status --porcelain=v1 -z --no-renames` output: entries are `XY path`, NUL-terminated."""
    out: list[str] = []
    for entry in status.decode(errors="surrogateescape").split("\0"):
        if len(entry) < 4:
            continue
        path = entry[3:].rstrip("/")
        if path.startswith(prefix):
            out.append(path[len(prefix):])
    return out


class Snapshot:
    """HEAD plus every uncommitted change in a fresh clone: staged and unstaged edits, staged new files,
    deletions (staged or not) and untracked files (ignored ones not) — the working tree as it is.

    `start()` launches the git processes and returns at once, so they run while the CLI compiles;
    `finish()` waits for them and lays the working-tree changes over the clone."""

    def __init__(self, root: Path, dest: Path) -> None:
        self.root = root
        self.dest = dest
        self._clone: asyncio.subprocess.Process | None = None
        self._status: asyncio.subprocess.Process | None = None
        self._prefix: asyncio.subprocess.Process | None = None

    async def _git(self, *args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "git", *args, cwd=self.root, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def start(self) -> None:
        self._clone = await self._git("clone", "--quiet", "--shared", "--no-hardlinks", str(self.root), str(self.dest))
        # `git status` compares HEAD with the index AND the index with the working tree: `ls-files
        # --modified` only did the latter, so a staged edit ran at its committed version and a staged new
        # file was missing. Without renames a move is a deletion plus a new file; paths are relative to the
        # top of the repository, hence the prefix of `root` inside it.
        self._status = await self._git("status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames",
                                       "--ignore-submodules=all", "--", ".")
        self._prefix = await self._git("rev-parse", "--show-prefix")

    async def finish(self) -> Path:
        assert self._clone and self._status and self._prefix
        (_, clone_err), (status, _), (prefix_out, _) = await asyncio.gather(
            self._clone.communicate(), self._status.communicate(), self._prefix.communicate()
        )
        if self._status.returncode != 0:
            # not a git repository: a plain copy, minus what must stay private
            shutil.rmtree(self.dest, ignore_errors=True)
            shutil.copytree(self.root, self.dest, symlinks=True, ignore=shutil.ignore_patterns(".git", ".secrets"))
            return self.dest
        if self._clone.returncode != 0:
            raise RuntimeError(f"could not copy the repository: {clone_err.decode(errors='replace').strip()}")
        prefix = prefix_out.decode().strip()
        for rel in changed_paths(status, prefix):
            self._apply(rel)
        return self.dest

    def _apply(self, rel: str) -> None:
        """Make `dest/rel` what `root/rel` is in the working tree: a copy of it, or gone."""
        src, dst = self.root / rel, self.dest / rel
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        elif dst.is_dir() and not (src.is_dir() and not src.is_symlink()):
            shutil.rmtree(dst)
        if src.is_symlink() or src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
        elif src.is_dir():  # an untracked nested repository is listed as one directory
            shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))

    async def abandon(self) -> None:
        for proc in (self._clone, self._status, self._prefix):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


class LocalExecutor:
    def __init__(self, *, prepared: Prepared, jobs: list[JobRun], snapshot: Path, workspace_root: Path,
                 share_snapshot: bool, secrets: dict[str, str], extra_env: dict[str, str], concurrency: int,
                 keep_going: bool, printer: Printer, step_timeout_ms: int | None,
                 warm: RunnerProcess | None = None) -> None:
        self.prepared = prepared
        self.jobs = jobs
        self.snapshot = snapshot
        self.workspace_root = workspace_root
        self.share_snapshot = share_snapshot
        self.secrets = secrets
        self.extra_env = extra_env
        self.semaphore = asyncio.Semaphore(concurrency)
        self.keep_going = keep_going
        self.printer = printer
        self.step_timeout_ms = step_timeout_ms
        self.warm = warm
        """A runner spawned ahead of time; the first job to start takes it."""
        self.processes: dict[str, RunnerProcess] = {}
        self.interrupted = False
        self.changed = asyncio.Event()
        self.background: set[asyncio.Future[None]] = set()
        self._interpreters: asyncio.Task[list[Interpreter]] | None = None
        """This machine's Python interpreters, detected once when a job first asks for `python=`."""

    async def _python_env(self, job: JobRun, python: str, venv: bool) -> tuple[dict[str, str], str] | None:
        """The variables that put the job's `python=` interpreter (and venv) first; None after reporting
        the job failed (no matching interpreter on this machine)."""
        if self._interpreters is None:
            self._interpreters = asyncio.create_task(toolchains.detect(log=lambda *a, **k: None))
        interpreters = await self._interpreters
        scratch = self.workspace_root / f"job-{self.jobs.index(job)}.tools"
        try:
            interpreter, env = await toolchains.prepare(interpreters, python, venv=venv, scratch=scratch)
        except toolchains.ToolchainError as exc:
            job.status, job.error = "failed", str(exc)
            self.printer.line(job, str(exc), fg="red")
            self.printer.line(job, "✗ failed", fg="red", bold=True)
            return None
        self.printer.line(job, f"python {interpreter.full}: {interpreter.path}"
                          + (f" (virtualenv {env['VIRTUAL_ENV']})" if "VIRTUAL_ENV" in env else ""))
        return env, interpreter.full

    async def run(self) -> bool:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
            loop.add_signal_handler(signal.SIGTERM, self._on_interrupt)
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                for job in self.jobs:
                    if job.status != "pending" or job.key in tasks:
                        continue
                    # workflow hooks still run when interrupted: on_cancel and cleanup are for exactly that
                    decision = self._decide(job) if job.is_hooks or not self.interrupted else "skip"
                    if decision == "ready":
                        tasks[job.key] = asyncio.create_task(self._run_job(job))
                    elif decision == "skip":
                        job.status = "cancelled" if self.interrupted else "skipped"
                        self._report_skip(job)
                        self.changed.set()
                if all(j.status in TERMINAL for j in self.jobs):
                    break
                self.changed.clear()
                await self.changed.wait()
        finally:
            for task in tasks.values():
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            if self.warm is not None:  # every job was skipped
                await self.warm.kill(grace=0.5)
                self.warm = None
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)
                loop.remove_signal_handler(signal.SIGTERM)
        return self.interrupted

    def _decide(self, job: JobRun) -> str:
        if job.is_hooks:
            return self._decide_hooks(job)
        children = children_by_job([j.planned for j in self.jobs if j.workflow is job.workflow])
        statuses = {j.planned.name: j.status for j in self.jobs if j.workflow is job.workflow}
        needs: list[tuple[str, list[str]]] = []
        for need in job.planned.needs:
            for child in children.get(need.name, []):
                needs.append((child, list(need.run_on)))
        if self.keep_going:
            return "ready" if all(statuses.get(n) in TERMINAL for n, _ in needs) else "wait"
        return decide(needs, statuses)

    def _decide_hooks(self, job: JobRun) -> str:
        """Workflow hooks run once every other job of the workflow has ended, if one applies."""
        siblings = [j for j in self.jobs if j.workflow is job.workflow and not j.is_hooks]
        if not all(j.status in TERMINAL for j in siblings):
            return "wait"
        job.run_status = str(aggregate_run_status([j.status for j in siblings]))
        flags = job.workflow.hooks
        wanted = {"success": flags.has_on_success, "failed": flags.has_on_failure,
                  "cancelled": flags.has_on_cancel}.get(job.run_status, False) if flags else False
        return "ready" if wanted or (flags is not None and flags.has_cleanup) else "skip"

    def _report_skip(self, job: JobRun) -> None:
        if job.is_hooks:
            return
        lock_job = job.planned.lock_job
        job.steps = [StepReport(s.name, "skipped") for s in (lock_job.steps if lock_job else [])]
        why = "interrupted" if self.interrupted else "a job it needs did not end as required"
        self.printer.line(job, f"- skipped ({why})", fg="bright_black")

    def _on_interrupt(self) -> None:
        if self.interrupted:  # second Ctrl-C: no more grace
            for proc in self.processes.values():
                self._background(proc.kill(grace=0.5))
            return
        self.interrupted = True
        self.printer.plain("interrupted: cancelling running jobs (Ctrl-C again to kill at once)", fg="yellow")
        for proc in self.processes.values():
            self._background(proc.cancel(force=False, grace=5.0))
        self.changed.set()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def _workspace(self, job: JobRun) -> Path:
        if self.share_snapshot:
            return self.snapshot
        dest = self.workspace_root / f"job-{self.jobs.index(job)}"
        shutil.copytree(self.snapshot, dest, symlinks=True)
        return dest

    def _upstream_outputs(self, job: JobRun) -> dict[str, Any]:
        out: dict[str, Any] = {}
        siblings = [j for j in self.jobs if j.workflow is job.workflow]
        for need in job.planned.needs:
            ups = [j for j in siblings if j.planned.job == need.name]
            if len(ups) == 1 and ups[0].planned.matrix is None:
                out[need.name] = ups[0].outputs
            elif ups:
                merged: dict[str, Any] = {}
                for u in ups:
                    for step_name, values in u.outputs.items():
                        merged.setdefault(step_name, {}).update(values or {})
                out[need.name] = {"by_matrix": {u.planned.name: u.outputs for u in ups}, "merged": merged}
        return out

    async def _run_job(self, job: JobRun) -> None:
        async with self.semaphore:
            if self.interrupted and not job.is_hooks:
                job.status = "cancelled"
                self.changed.set()
                return
            job.status = "running"
            job.started = time.monotonic()
            try:
                await self._execute(job)
            except Exception as exc:  # the run must finish and report even if one job's plumbing breaks
                job.status = "failed"
                job.error = f"{type(exc).__name__}: {exc}"
                self.printer.line(job, f"✗ internal error: {job.error}", fg="red")
            finally:
                job.finished = time.monotonic()
                self.processes.pop(job.key, None)
                self.changed.set()

    async def _execute(self, job: JobRun) -> None:
        wf = job.workflow
        lock_job = job.planned.lock_job
        base_env = safe_base_env({**(wf.env or {}), **self.extra_env, "CI": "true", "KICI": "true",
                                  "KICI_LOCAL": "true"})
        python_version: str | None = None
        if lock_job is not None and lock_job.python:
            chosen = await self._python_env(job, lock_job.python, bool(lock_job.python_venv))
            if chosen is None:
                return
            python_env, python_version = chosen
            base_env = toolchains.apply(base_env, python_env)
        secrets = self._declared_secrets(job)
        if secrets is None:
            return
        workspace = self._workspace(job)
        if lock_job is not None and lock_job.cache and not self._report_caches(job, workspace, python_version):
            return
        spec = JobSpec(
            workspace=str(workspace),
            workflow_file=wf.source.file,
            export=wf.source.export,
            workflow=wf.name,
            job=job.planned.job,
            display_name=job.planned.name,
            matrix=job.planned.matrix,
            event=self.prepared.event if job.inputs is None
            else self.prepared.event.model_copy(update={"inputs": job.inputs}),
            env=base_env,
            secrets=secrets,
            upstream_outputs=self._upstream_outputs(job),
            expected_content_hash=wf.content_hash,
            default_step_timeout_ms=self.step_timeout_ms or 30 * 60 * 1000,
            job_timeout_ms=lock_job.timeout if lock_job else None,
            grace_period_ms=lock_job.grace_period if lock_job else None,
            kici_dir=self.prepared.project.kici_rel,
            run_status=job.run_status,  # type: ignore[arg-type]
        )
        self.printer.line(job, "▶ started", fg="blue")
        if lock_job is not None and lock_job.resources is not None:
            self.printer.line(job, f"│ resources {lock_job.resources.describe()}: not enforced by `kici run local` "
                              "(agents enforce them)", fg="yellow")
        if self.warm is not None:
            proc, self.warm = self.warm, None
            await proc.hand(spec)
        else:
            proc = await RunnerProcess.start(spec)
        self.processes[job.key] = proc
        if self.interrupted:
            await proc.cancel(force=False, grace=5.0)
        result: JobResult | None = None
        async for msg in proc.messages():
            if isinstance(msg, JobStarted):
                job.steps = [StepReport(name) for name in msg.steps]
            elif isinstance(msg, LogLine | LogLines):
                style = {"fg": "yellow"} if msg.stream == "system" else {}
                for line in log_lines(msg):
                    job.log.append(line)
                    self.printer.line(job, f"│ {line}", **style)
            elif isinstance(msg, StepStatus):
                self._on_step(job, msg)
            elif isinstance(msg, CacheRequest):
                await proc.send_control(self._local_cache_reply(job, workspace, python_version, msg))
            elif isinstance(msg, JobResult):
                result = msg
        await proc.wait()
        if result is None:  # pragma: no cover - the client synthesises a result when the runner dies
            result = JobResult(status="failed", error="runner ended without a result")
        job.status = result.status
        job.outputs = result.outputs
        job.error = result.error
        if result.error:
            for line in result.error.splitlines():
                self.printer.line(job, line, fg="red")
        kept = [*(lock_job.artifacts or [] if lock_job else []), *result.artifacts]
        if kept:  # said, not silently skipped: only an agent uploads artifacts (to its orchestrator)
            self.printer.line(job, f"artifacts not uploaded by a local run (they stay in the workspace): "
                                   f"{', '.join(kept)}", fg="yellow")
        reports = lock_job.test_reports if lock_job is not None else None
        if reports:  # the same: only an orchestrator reads and keeps test reports
            self.printer.line(job, f"test reports not sent by a local run (they stay in the workspace): "
                                   f"{', '.join(reports)}", fg="yellow")
        mark = {"success": ("✓ success", "green"), "skipped": ("- skipped", "bright_black"),
                "cancelled": ("⊘ cancelled", "yellow")}.get(result.status, ("✗ failed", "red"))
        self.printer.line(job, mark[0], fg=mark[1], bold=True)

    def _report_caches(self, job: JobRun, workspace: Path, python_version: str | None) -> bool:
        """Resolve the job's cache keys as an agent would (a `hash_files` glob matching nothing fails the job
        here too), then say that a local run neither restores nor saves them: caches live on an
        orchestrator, and a local run starts from the working tree, where the cached paths already are."""
        lock_job = job.planned.lock_job
        assert lock_job is not None and lock_job.cache
        context = cache_keys.KeyContext(workspace=workspace, matrix=job.planned.matrix, python=python_version)
        try:
            keys = [cache_keys.resolve_key(c.key, context) for c in lock_job.cache]
        except cache_keys.CacheKeyError as exc:
            job.status, job.error = "failed", str(exc)
            job.steps = [StepReport(s.name, "skipped") for s in lock_job.steps]
            self.printer.line(job, str(exc), fg="red")
            self.printer.line(job, "✗ failed", fg="red", bold=True)
            return False
        self.printer.line(job, f"caches not restored or saved by a local run (they live on an orchestrator): "
                               f"{', '.join(keys)}", fg="yellow")
        return True

    def _local_cache_reply(self, job: JobRun, workspace: Path, python_version: str | None,
                           request: CacheRequest) -> CacheReply:
        """A step's `ctx.cache`: the key is resolved as on an agent (a bad one raises in the step), then
        the step is told, in its log, that a local run keeps no caches (a miss, or not saved)."""
        context = cache_keys.KeyContext(workspace=workspace, matrix=job.planned.matrix, python=python_version)
        try:
            key = cache_keys.resolve_key(request.key, context)
            for prefix in request.restore_keys:
                cache_keys.resolve_key(prefix, context)
        except cache_keys.CacheKeyError as exc:
            return CacheReply(id=request.id, error=str(exc))
        done = "not restored (a miss)" if request.op == "restore" else "not saved"
        return CacheReply(id=request.id, lines=[f"[warn] cache {key}: {done}: a local run keeps no caches"])

    def _declared_secrets(self, job: JobRun) -> dict[str, str] | None:
        """What the job gets from `.kici/.secrets`: a job that declares `secrets=[...]` only those names
        (as on an orchestrator), and one that declares none every local secret, as before declarations
        existed. None when a declared name is missing: the job has failed before any step."""
        lock_job = job.planned.lock_job
        if lock_job is None or not lock_job.secrets:
            return self.secrets
        missing = [name for name in lock_job.secrets if name not in self.secrets]
        if missing:
            job.status = "failed"
            job.steps = [StepReport(s.name, "skipped") for s in lock_job.steps]
            job.error = "; ".join(f"secret {name} not found (looked in .kici/.secrets)" for name in missing)
            self.printer.line(job, job.error, fg="red")
            self.printer.line(job, "✗ failed", fg="red", bold=True)
            return None
        return {name: self.secrets[name] for name in lock_job.secrets}

    def _on_step(self, job: JobRun, msg: StepStatus) -> None:
        while len(job.steps) <= msg.step_index:
            job.steps.append(StepReport(f"step-{len(job.steps) + 1}"))
        report = job.steps[msg.step_index]
        report.status, report.attempt = msg.state, msg.attempt
        if msg.state == "running":
            attempt = f" (attempt {msg.attempt})" if msg.attempt > 1 else ""
            self.printer.line(job, f"▶ {msg.step_name}{attempt}", bold=True)
            return
        report.duration_ms, report.error = msg.duration_ms, msg.error
        took = f" ({msg.duration_ms / 1000:.2f}s)" if msg.duration_ms is not None else ""
        text = f"{STEP_MARK.get(msg.state, '?')} {msg.step_name} {msg.state}{took}"
        if msg.error and msg.state != "skipped":
            text += f": {msg.error.splitlines()[0] if msg.error else ''}"
        self.printer.line(job, text, fg=STEP_COLOR.get(msg.state))


def _shown(jobs: list[JobRun]) -> list[JobRun]:
    """Workflow hooks appear in reports only when some hook ran."""
    return [j for j in jobs if not (j.is_hooks and j.status == "skipped")]


def _overall(jobs: list[JobRun]) -> str:
    return str(aggregate_run_status([j.status for j in jobs]) if jobs else RunStatus.SUCCESS)


def _summary_json(jobs: list[JobRun], status: str) -> dict[str, Any]:
    workflows: dict[str, dict[str, Any]] = {}
    for j in jobs:
        wf = workflows.setdefault(j.workflow.name, {"name": j.workflow.name, "jobs": []})
        wf["jobs"].append({
            "name": j.planned.name,
            "job": j.planned.job,
            "matrix": j.planned.matrix,
            "status": j.status,
            "duration_ms": j.duration_ms,
            "error": j.error,
            "outputs": j.outputs,
            "steps": [{"name": s.name, "status": s.status, "duration_ms": s.duration_ms, "error": s.error,
                       "attempt": s.attempt} for s in j.steps],
        })
    for wf in workflows.values():
        wf["status"] = str(aggregate_run_status([jj["status"] for jj in wf["jobs"]]))
    return {"status": status, "workflows": list(workflows.values())}


def _print_summary(printer: Printer, jobs: list[JobRun], status: str) -> None:
    width = max(len(j.key) for j in jobs)
    printer.plain("")
    printer.plain(f"{'job'.ljust(width)}  {'status':<10} {'time':>8}  steps", bold=True)
    for j in jobs:
        took = f"{j.duration_ms / 1000:.2f}s" if j.duration_ms is not None else "-"
        done = sum(1 for s in j.steps if s.status == "success")
        colour = {"success": "green", "failed": "red", "cancelled": "yellow"}.get(j.status, "bright_black")
        printer.plain(f"{j.key.ljust(width)}  " + (click.style(f"{j.status:<10}", fg=colour) if printer.color
                                                    else f"{j.status:<10}") + f" {took:>8}  {done}/{len(j.steps)}")
    printer.plain(f"result: {status}", bold=True, fg="green" if status == "success" else "red")


def _write_junit(path: Path, jobs: list[JobRun]) -> None:
    suites = ET.Element("testsuites", name="kici run local")
    by_wf: dict[str, list[JobRun]] = {}
    for j in jobs:
        by_wf.setdefault(j.workflow.name, []).append(j)
    for wf_name, wf_jobs in by_wf.items():
        cases = [(j, s) for j in wf_jobs for s in j.steps] or []
        suite = ET.SubElement(suites, "testsuite", name=wf_name, tests=str(len(cases)),
                              failures=str(sum(1 for _, s in cases if s.status in ("failed", "timed_out"))),
                              skipped=str(sum(1 for _, s in cases if s.status in ("skipped", "cancelled", "pending"))))
        for j, s in cases:
            case = ET.SubElement(suite, "testcase", classname=f"{wf_name}.{j.planned.name}", name=s.name,
                                 time=f"{(s.duration_ms or 0) / 1000:.3f}")
            if s.status in ("failed", "timed_out"):
                failure = ET.SubElement(case, "failure", message=(s.error or s.status).splitlines()[0][:500])
                failure.text = s.error or s.status
            elif s.status in ("skipped", "cancelled", "pending"):
                ET.SubElement(case, "skipped", message=s.status)
        for j in wf_jobs:
            if not j.steps and j.status == "failed":
                case = ET.SubElement(suite, "testcase", classname=f"{wf_name}.{j.planned.name}", name="(job)")
                failure = ET.SubElement(case, "failure", message=(j.error or "failed").splitlines()[0][:500])
                failure.text = j.error or "failed"
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
