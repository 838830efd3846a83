"""Job lifecycle on the agent: accept or reject a dispatch, clone, drift gate, run the steps in a runner
child, stream status and logs, cancel, and clean up.

Order of a job's messages: `job.ack` (at once), `job.status running` (before cloning, so clone time is
covered by stale detection), setup output as `log.chunk` with step index -1, then the runner's step
statuses and logs (a step's lines are flushed before each step status), then exactly one terminal
`job.status` carrying the runner's outputs. A job stays known to the agent (and is listed in
`in_flight_jobs` on re-registration) until that terminal status has been confirmed as delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from kici.agent import artifacts, caches, test_reports, workspace
from kici.agent.build_info import kici_build_hash
from kici.agent.config import AgentSettings, hostname, http_base_url
from kici.agent.connection import Connection, new_message_id
from kici.agent.git import CloneCancelled, CloneError, Cloner
from kici.agent.log import log_event
from kici.agent.logs import FLUSH_INTERVAL_S, LogStreamer
from kici.agent.sandbox import Execution, ExecutionRequest, SandboxBackend
from kici.agent.sandbox.limits import effective_limits
from kici.agent.step_user import StepUser, give_tree, identity_env
from kici.engine import aio
from kici.engine import protocol as p
from kici.engine.content_hash import workflow_content_hash
from kici.engine.events import Event
from kici.engine.masking import SecretMasker
from kici.engine.runner_protocol import (
    SETUP_STEP_INDEX,
    CacheReply,
    CacheRequest,
    JobResult,
    JobSpec,
    JobStarted,
    LogLine,
    LogLines,
    StepStatus,
)
from kici.runner import cache_keys, toolchains
from kici.runner.client import RunnerProcess, safe_base_env
from kici.runner.toolchains import Interpreter

FORCE_CANCEL_GRACE_S = 2.0
KICI_DIR = ".kici"


def kici_version() -> str:
    try:
        return metadata.version("kici")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled source tree
        return "unknown"


def drift_error(workspace_dir: Path, workflow_file: str, expected: str, kici_dir: str = KICI_DIR) -> str | None:
    """The drift gate: None when the checkout's contentHash of the workflow matches the lock file's."""

    def read(path: str) -> bytes | None:
        try:
            return (workspace_dir / path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    version = kici_version()
    try:
        actual = workflow_content_hash(workflow_file, read, kici_dir)
    except FileNotFoundError:
        return (
            f"lock file is out of date: {workflow_file} does not exist in the checkout "
            f"(kici {version}, build {kici_build_hash()})"
        )
    if actual == expected:
        return None
    return (
        f"lock file is out of date: {workflow_file} has contentHash {actual} but the lock file says "
        f"{expected} (kici {version}, build {kici_build_hash()}); run `kici compile` and commit "
        f"{kici_dir}/kici.lock.json"
    )


@dataclass
class Job:
    dispatch: p.JobDispatch
    workspace: Path
    masker: SecretMasker
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    execution: Execution | None = None
    interpreter: Interpreter | None = None
    """The job's `python=` interpreter (its installation must be visible in the sandbox)."""
    cloner: Cloner | None = None
    cancel_requested: tuple[bool, str] | None = None
    finished: bool = False
    """The terminal status is queued (the job no longer takes a slot)."""
    abandoned: bool = False
    """The orchestrator did not take the job back after a reconnect: nothing more is sent for it."""
    python_version: str | None = None
    """The full version of the job's `python=` interpreter (cache keys' `{{python}}`)."""

    @property
    def job_id(self) -> str:
        return self.dispatch.job_id

    @property
    def tools(self) -> Path:
        """The job's scratch space beside its workspace: the `python=` bin dir and venv."""
        return self.workspace.with_name(self.workspace.name + ".tools")

    @property
    def run_id(self) -> str:
        return self.dispatch.run_id


@dataclass
class Counters:
    jobs_total: dict[str, int] = field(default_factory=dict)
    steps_total: dict[str, int] = field(default_factory=dict)
    log_lines_truncated: int = 0
    log_bytes: int = 0


class JobManager:
    """Implements `connection.AgentHooks`; `connection` must be set before messages arrive."""

    def __init__(
        self, settings: AgentSettings, agent_id: str, labels: list[str], backend: SandboxBackend,
        step_user: StepUser | None = None, interpreters: Sequence[Interpreter] = (),
    ) -> None:
        self.settings = settings
        self.interpreters = list(interpreters)
        """The Python interpreters jobs may ask for with `python=` (`kici.runner.toolchains`)."""
        self.step_user = step_user
        """Who job steps run as when the agent runs as root (None: the agent's own user)."""
        self.agent_id = agent_id
        self.labels = labels
        self.backend = backend
        self.connection: Connection | None = None
        self.jobs: dict[str, Job] = {}
        self.draining = False
        self.counters = Counters()
        self.changed = asyncio.Event()
        """Set whenever a job starts or ends (drain and shutdown wait on it)."""
        self._background: set[asyncio.Task[Any]] = set()

    # -- state --------------------------------------------------------------------------------------

    @property
    def active(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.finished]

    def _conn(self) -> Connection:
        assert self.connection is not None
        return self.connection

    def _status_changed(self) -> None:
        self.changed.set()
        if self.connection is not None:
            self.connection.send_control(self.agent_status())

    def start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            log_event("agent.draining", active_jobs=len(self.active))
            self._status_changed()

    # -- AgentHooks ---------------------------------------------------------------------------------

    def registration(self) -> p.AgentRegister:
        return p.AgentRegister(
            message_id=new_message_id(),
            agent_id=self.agent_id,
            labels=self.labels,
            max_concurrency=self.settings.max_concurrency,
            platform=sys.platform,
            arch=platform.machine() or None,
            version=kici_version(),
            hostname=hostname(),
            cpu_count=os.cpu_count(),
            total_memory_mb=_total_memory_mb(),
            running_as_uid=os.getuid() if hasattr(os, "getuid") else None,
            step_uid=self.step_user.uid if self.step_user is not None else os.getuid(),
            in_flight_jobs=[p.InFlightJob(job_id=j.job_id, run_id=j.run_id) for j in self.jobs.values()
                            if not j.abandoned],
        )

    def agent_status(self) -> p.AgentStatus:
        return p.AgentStatus(active_jobs=len(self.active), draining=self.draining)

    def running_jobs(self) -> list[tuple[str, str]]:
        return [(j.run_id, j.job_id) for j in self.active if not j.abandoned]

    def on_registered(self, ack: p.RegisterAck, in_flight: list[p.InFlightJob]) -> set[str]:
        reclaimed = set(ack.reclaimed_jobs)
        abandoned: set[str] = set()
        for item in in_flight:
            if item.job_id in reclaimed:
                continue
            job = self.jobs.get(item.job_id)
            if job is None:
                continue
            abandoned.add(job.job_id)
            job.abandoned = True
            log_event("job.abandoned", level="warning", job_id=job.job_id, run_id=job.run_id,
                      reason="not reclaimed by the orchestrator after a reconnect")
            if job.finished:
                self._forget(job)
            else:
                self._request_cancel(job, force=True, reason="not reclaimed by the orchestrator after a reconnect")
        return abandoned

    def on_message(self, message: p.OrchestratorMessage) -> None:
        if isinstance(message, p.JobDispatch):
            self._on_dispatch(message)
        elif isinstance(message, p.JobCancel):
            job = self.jobs.get(message.job_id)
            if job is None or job.finished:
                log_event("job.cancel_ignored", job_id=message.job_id, reason="not running here")
                return
            self._request_cancel(job, force=message.force, reason=message.reason)
        else:
            log_event("orchestrator.unexpected_message", level="warning", type=message.type)

    def on_delivered(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.finished:
            self._forget(job)

    def _forget(self, job: Job) -> None:
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]
        self.changed.set()

    # -- dispatch and cancel ------------------------------------------------------------------------

    def _on_dispatch(self, dispatch: p.JobDispatch) -> None:
        conn = self._conn()
        existing = self.jobs.get(dispatch.job_id)
        if existing is not None and not existing.abandoned:  # a redelivered dispatch: it is ours already
            conn.send_control(p.JobAck(job_id=dispatch.job_id, run_id=dispatch.run_id))
            return
        reason: Literal["busy", "draining"] | None = None
        if existing is not None:  # the abandoned run of this job is still being killed: try elsewhere
            reason = "busy"
        elif self.draining:
            reason = "draining"
        elif len(self.active) >= self.settings.max_concurrency:
            reason = "busy"
        if reason is not None:
            conn.send_control(p.JobReject(job_id=dispatch.job_id, run_id=dispatch.run_id, reason=reason))
            conn.send_control(self.agent_status())
            log_event("job.rejected", job_id=dispatch.job_id, run_id=dispatch.run_id, reason=reason)
            return
        secrets = list(dispatch.secrets.values())
        if dispatch.token:
            secrets.append(dispatch.token)
        job = Job(dispatch=dispatch, workspace=workspace.job_dir(self.settings.jobs_dir, dispatch.job_id),
                  masker=SecretMasker(secrets))
        self.jobs[job.job_id] = job
        conn.send_control(p.JobAck(job_id=job.job_id, run_id=job.run_id))
        log_event("job.accepted", job_id=job.job_id, run_id=job.run_id, workflow=dispatch.workflow,
                  job=dispatch.display_name, attempt=dispatch.attempt)
        job.task = asyncio.create_task(self._run(job))
        self._status_changed()

    def _request_cancel(self, job: Job, *, force: bool, reason: str) -> None:
        previous = job.cancel_requested
        job.cancel_requested = (force or (previous is not None and previous[0]), reason)
        log_event("job.cancel_requested", job_id=job.job_id, run_id=job.run_id, force=force, reason=reason)
        if job.cloner is not None:
            job.cloner.cancel()
        if job.execution is not None:
            self._spawn(self._cancel_execution(job, job.execution))

    async def _cancel_execution(self, job: Job, execution: Execution) -> None:
        assert job.cancel_requested is not None
        force, reason = job.cancel_requested
        await execution.cancel(force=force, grace=self._cancel_grace(job, force=force), reason=reason)

    def _cancel_grace(self, job: Job, *, force: bool) -> float:
        """Seconds the runner gets to stop after a cancel before its whole tree is killed: the agent's
        `cancel_grace_ms`, stretched to cover the job's `grace_period` (which the runner itself waits
        between SIGTERM and SIGKILL of the step's commands) plus the force-kill margin."""
        if force:
            return FORCE_CANCEL_GRACE_S
        grace = self.settings.cancel_grace_ms / 1000
        if job.dispatch.grace_period_ms is not None:
            grace = max(grace, job.dispatch.grace_period_ms / 1000 + FORCE_CANCEL_GRACE_S)
        return grace

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- sending ------------------------------------------------------------------------------------

    def _send(self, job: Job, message: p.Message, *, terminal: bool = False) -> None:
        if not job.abandoned:
            self._conn().send_job(job.job_id, job.run_id, message, terminal=terminal)

    def _send_log(self, job: Job, step_index: int, lines: list[str]) -> None:
        if not job.abandoned:
            self._conn().send_log(job.job_id, job.run_id, step_index, lines)

    # -- running a job ------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        dispatch = job.dispatch
        max_bytes = dispatch.max_log_size_bytes or self.settings.max_log_size_bytes
        streamer = LogStreamer(lambda index, lines: self._send_log(job, index, lines), max_bytes)
        self._send(job, p.JobStatusUpdate(run_id=job.run_id, job_id=job.job_id, state="running",
                                          timestamp=time.time()))

        def setup_line(text: str) -> None:
            streamer.add(SETUP_STEP_INDEX, job.masker.mask(text))

        flusher = asyncio.create_task(_flush_every(streamer, FLUSH_INTERVAL_S))
        result: JobResult
        try:
            result = await self._execute(job, streamer, setup_line)
        except CloneCancelled:
            result = self._cancelled_result(job)
        except CloneError as exc:
            error = job.masker.mask(str(exc))
            setup_line(f"[error] {error}")
            result = JobResult(status="failed", error=error, failure_category="clone")
        except Exception as exc:  # the job must end with a status even if the agent's plumbing breaks
            error = job.masker.mask(f"agent error: {type(exc).__name__}: {exc}")
            log_event("job.internal_error", level="error", job_id=job.job_id, error=error)
            setup_line(f"[error] {error}")
            result = JobResult(status="failed", error=error, failure_category="internal")
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            if job.execution is not None:
                if job.execution.running:
                    await job.execution.terminate(grace=FORCE_CANCEL_GRACE_S)
                await job.execution.cleanup()
            await asyncio.to_thread(workspace.remove, job.workspace)
            await asyncio.to_thread(workspace.remove, job.tools)
        if job.cancel_requested is not None and result.status == "failed":
            # killed (or its clone aborted) while cancelling: the cancel is what happened
            result = self._cancelled_result(job)
        streamer.flush()
        self.counters.log_lines_truncated += streamer.lines_dropped
        self.counters.log_bytes += streamer.bytes_streamed
        self._finish(job, result)

    def _finish(self, job: Job, result: JobResult) -> None:
        job.finished = True
        self.counters.jobs_total[result.status] = self.counters.jobs_total.get(result.status, 0) + 1
        self._send(job, p.JobStatusUpdate(
            run_id=job.run_id, job_id=job.job_id, state=result.status, timestamp=time.time(),
            error=result.error, failure_category=result.failure_category, outputs=result.outputs,
        ), terminal=True)
        log_event("job.finished", job_id=job.job_id, run_id=job.run_id, state=result.status,
                  failure_category=result.failure_category,
                  duration_ms=round((time.monotonic() - job.started) * 1000))
        if job.abandoned:
            self._forget(job)
        self._status_changed()

    def _cancelled_result(self, job: Job) -> JobResult:
        reason = job.cancel_requested[1] if job.cancel_requested else "cancelled"
        return JobResult(status="cancelled", error=reason, failure_category="cancelled")

    async def _execute(self, job: Job, streamer: LogStreamer, setup_line: Callable[[str], None]) -> JobResult:
        dispatch = job.dispatch
        await asyncio.to_thread(workspace.create, job.workspace)
        job.cloner = Cloner(env=os.environ, token=dispatch.token, on_line=setup_line,
                            timeout_s=self.settings.git_timeout_ms / 1000,
                            borrow_local=self.settings.clone_local_shared,
                            mirrors_dir=self.settings.mirrors_dir if self.settings.git_mirrors else None)
        if job.cancel_requested is not None:
            raise CloneCancelled()
        started = time.monotonic()
        await job.cloner.checkout(dispatch.repo_url, dispatch.sha, dispatch.ref, job.workspace)
        job.cloner = None
        log_event("job.cloned", job_id=job.job_id, duration_ms=round((time.monotonic() - started) * 1000))
        if job.cancel_requested is not None:
            return self._cancelled_result(job)

        error = await asyncio.to_thread(drift_error, job.workspace, dispatch.workflow_file, dispatch.content_hash)
        if error is not None:
            setup_line(f"[error] {error}")
            return JobResult(status="failed", error=error, failure_category="drift")

        python_env = await self._python_env(job, setup_line)
        if isinstance(python_env, JobResult):
            return python_env
        limits = effective_limits(dispatch.resources, self.settings.job_default_limits,
                                  self.settings.job_max_limits)
        if isinstance(limits, str):
            setup_line(f"[error] {limits}")
            return JobResult(status="failed", error=limits, failure_category="resources")
        if not limits.is_empty() and self.backend.limiter is None:
            error = (f"resources: this agent cannot enforce resource limits ({limits.describe()}): no limit "
                     "mechanism works here (see KICI_RESOURCE_LIMITS)")
            setup_line(f"[error] {error}")
            return JobResult(status="failed", error=error, failure_category="resources")
        job_caches = await self._restore_caches(job, setup_line)
        if isinstance(job_caches, JobResult):
            return job_caches
        spec = self.job_spec(job, python_env)
        if self.step_user is not None:  # the checkout becomes the step user's: steps may write to it
            await asyncio.to_thread(give_tree, job.workspace, self.step_user)
            if job.tools.exists():
                await asyncio.to_thread(give_tree, job.tools, self.step_user)
        execution = self.backend.prepare(ExecutionRequest(
            spec=spec, workspace=job.workspace, scratch_dir=job.tools,
            limits=None if limits.is_empty() else limits,
            run_as=self.step_user.run_as if self.step_user else None,
            read_only_paths=toolchains.install_paths(job.interpreter) if job.interpreter is not None else (),
        ))
        job.execution = execution
        await execution.start()
        for line in execution.setup_lines():
            setup_line(line)
        runner = execution.runner
        assert runner is not None
        if dispatch.token:
            runner.masker.add(dispatch.token)
        if job.cancel_requested is not None:
            self._spawn(self._cancel_execution(job, execution))
        result: JobResult | None = None
        async for message in execution.messages():
            if isinstance(message, LogLine):
                streamer.add(message.step_index, message.line)
            elif isinstance(message, LogLines):
                for line in message.lines:
                    streamer.add(message.step_index, line)
            elif isinstance(message, StepStatus):
                streamer.flush()
                if message.state != "running":
                    self.counters.steps_total[message.state] = self.counters.steps_total.get(message.state, 0) + 1
                self._send(job, p.StepStatusUpdate(
                    run_id=job.run_id, job_id=job.job_id, step_index=message.step_index,
                    step_name=message.step_name, state=message.state, attempt=message.attempt,
                    duration_ms=message.duration_ms, error=message.error, timestamp=time.time(),
                ))
            elif isinstance(message, CacheRequest):
                self._spawn(self._serve_cache_request(job, runner, message))
            elif isinstance(message, JobStarted):
                continue
            elif isinstance(message, JobResult):
                result = message
        await execution.wait()
        if result is None:  # pragma: no cover - the client always ends with a result
            result = JobResult(status="failed", error="runner ended without a result", failure_category="internal")
        hit = execution.limit_hit()
        if hit is not None and result.status == "failed" and job.cancel_requested is None:
            # a step (or the runner) was killed or refused by the limit: that is the failure's cause
            setup_line(f"[error] {hit.message}")
            result = result.model_copy(update={
                "error": hit.message + (f"\n{result.error}" if result.error else ""),
                "failure_category": hit.category,
            })
        await self._send_test_reports(job, result, setup_line)
        result = await self._upload_artifacts(job, result, setup_line)
        result = await self._save_caches(job, result, job_caches, setup_line)
        if result.failure_category == "internal" and (result.error or "").startswith("runner exited with code"):
            # the client's synthetic result: the runner died without reporting (killed, out of memory, …)
            result = result.model_copy(update={"error": f"workflow runner crashed: {result.error}"})
            for line in (result.error or "").splitlines():
                setup_line(f"[error] {line}")
        return result

    def _upload_base(self) -> str:
        """The HTTP base of the orchestrator the agent is connected to now (of several URLs, that one)."""
        return http_base_url(self._conn().url)

    async def _send_test_reports(self, job: Job, result: JobResult, setup_line: Callable[[str], None]) -> None:
        """Send the job's `test_reports` files after it succeeded or failed; they never change its outcome."""
        globs = job.dispatch.test_reports
        if job.abandoned or not globs or result.status not in ("success", "failed"):
            return
        await test_reports.send_all(
            base_url=self._upload_base(), token=self.settings.agent_token.get_secret_value(),
            job_id=job.job_id, workspace=job.workspace, globs=globs, on_line=setup_line,
        )

    async def _upload_artifacts(self, job: Job, result: JobResult, setup_line: Callable[[str], None]) -> JobResult:
        """Upload the job's artifacts (its globs when the outcome matches `artifacts_when`, and whatever its
        steps asked for); a glob matching nothing, a refused file or a failed upload fails a successful job
        (category `artifacts`) after everything else was uploaded."""
        dispatch = job.dispatch
        when = dispatch.artifacts_when
        wanted = when == "always" or (when == "success" and result.status == "success") or (
            when == "on_failure" and result.status == "failed")
        globs = dispatch.artifacts if wanted else []
        if job.abandoned or (not globs and not result.artifacts):
            return result
        found = await asyncio.to_thread(artifacts.collect, job.workspace, globs, result.artifacts)
        for problem in found.problems:
            setup_line(f"[error] {problem}")
        errors = list(found.problems)
        if found.files:
            errors += await artifacts.upload_all(
                base_url=self._upload_base(), token=self.settings.agent_token.get_secret_value(),
                job_id=job.job_id, workspace=job.workspace, files=found.files, on_line=setup_line,
            )
        if errors and result.status == "success":
            return JobResult(status="failed", outputs=result.outputs, error="\n".join(errors),
                             failure_category="artifacts", artifacts=result.artifacts)
        return result

    def _cache_client(self, job: Job) -> caches.CacheClient:
        return caches.CacheClient(base_url=self._upload_base(),
                                  token=self.settings.agent_token.get_secret_value(), job_id=job.job_id,
                                  workspace=job.workspace)

    async def _restore_caches(self, job: Job, setup_line: Callable[[str], None]) -> list[caches.JobCache] | JobResult:
        """Resolve the job's cache keys on the checkout and restore each cache (exact key, then the restore
        keys as prefixes). A key that cannot be resolved or a path leaving the workspace fails the job
        (category `cache`); storage trouble is a miss."""
        declared = job.dispatch.caches
        if not declared:
            return []
        context = cache_keys.KeyContext(workspace=job.workspace, matrix=job.dispatch.matrix,
                                        python=job.python_version)
        planned: list[caches.JobCache] = []
        client = self._cache_client(job)
        try:
            for entry in declared:
                key = await asyncio.to_thread(cache_keys.resolve_key, entry.key, context)
                prefixes = [await asyncio.to_thread(cache_keys.resolve_key, p, context) for p in entry.restore_keys]
                planned.append(caches.JobCache(key, list(entry.paths), prefixes))
            for item in planned:
                item.restored = await asyncio.to_thread(client.restore, item.key, item.paths, item.restore_keys)
                setup_line(caches.restore_line(item.restored))
                log_event("job.cache_restore", job_id=job.job_id, key=item.key, matched=item.restored.matched,
                          error=item.restored.error)
        except (cache_keys.CacheKeyError, caches.CacheError) as exc:
            setup_line(f"[error] {exc}")
            return JobResult(status="failed", error=str(exc), failure_category="cache")
        return planned

    async def _save_caches(self, job: Job, result: JobResult, planned: list[caches.JobCache],
                           setup_line: Callable[[str], None]) -> JobResult:
        """After a successful job, save each cache whose exact key missed. Storage trouble is a log line;
        a path leaving the workspace fails the job (category `cache`)."""
        if result.status != "success" or job.abandoned or job.cancel_requested is not None:
            return result
        client = self._cache_client(job)
        errors: list[str] = []
        for item in planned:
            if item.restored is not None and item.restored.exact:
                continue
            try:
                saved = await asyncio.to_thread(client.save, item.key, item.paths)
            except caches.CacheError as exc:
                setup_line(f"[error] {exc}")
                errors.append(str(exc))
                continue
            setup_line(caches.save_line(saved))
            log_event("job.cache_save", job_id=job.job_id, key=item.key, outcome=saved.outcome, size=saved.size,
                      error=saved.error)
        if errors:
            return JobResult(status="failed", outputs=result.outputs, error="\n".join(errors),
                             failure_category="cache", artifacts=result.artifacts)
        return result

    async def _serve_cache_request(self, job: Job, runner: RunnerProcess, request: CacheRequest) -> None:
        """A step's `ctx.cache.restore|save`: transfer, then answer the runner (which the step waits for)."""
        reply = await self._cache_reply(job, request)
        log_event("job.cache_request", job_id=job.job_id, op=request.op, key=request.key, matched=reply.matched,
                  saved=reply.saved, error=reply.error)
        await runner.send_control(reply)

    async def _cache_reply(self, job: Job, request: CacheRequest) -> CacheReply:
        context = cache_keys.KeyContext(workspace=job.workspace, matrix=job.dispatch.matrix,
                                        python=job.python_version)
        client = self._cache_client(job)
        try:
            paths = [cache_keys.normalize_path(p) for p in request.paths]
            key = await asyncio.to_thread(cache_keys.resolve_key, request.key, context)
            if request.op == "save":
                saved = await asyncio.to_thread(client.save, key, paths)
                return CacheReply(id=request.id, saved=saved.outcome == "saved", lines=[caches.save_line(saved)])
            prefixes = [await asyncio.to_thread(cache_keys.resolve_key, p, context) for p in request.restore_keys]
            restored = await asyncio.to_thread(client.restore, key, paths, prefixes)
            if restored.matched is not None and self.step_user is not None:  # the steps' files, not root's
                await asyncio.to_thread(give_tree, job.workspace, self.step_user)
            return CacheReply(id=request.id, matched=restored.matched, lines=[caches.restore_line(restored)])
        except (cache_keys.CacheKeyError, caches.CacheError, ValueError) as exc:
            return CacheReply(id=request.id, error=str(exc))
        except Exception as exc:  # the step must get an answer whatever broke here
            log_event("job.cache_request_failed", level="error", job_id=job.job_id,
                      error=f"{type(exc).__name__}: {exc}")
            return CacheReply(id=request.id, error=f"agent error: {type(exc).__name__}: {exc}")

    async def _python_env(self, job: Job, setup_line: Callable[[str], None]) -> dict[str, str] | JobResult:
        """The job's `python=`: its interpreter's directory (and with `python_venv`, a fresh venv's `bin`)
        first on PATH. Variables to add to the step environment, or the failed result."""
        wanted = job.dispatch.python
        if wanted is None:
            return {}
        try:
            interpreter, env = await toolchains.prepare(
                self.interpreters, wanted, venv=job.dispatch.python_venv, scratch=job.tools
            )
        except toolchains.ToolchainError as exc:
            setup_line(f"[error] {exc}")
            return JobResult(status="failed", error=str(exc), failure_category="toolchain")
        job.interpreter = interpreter
        job.python_version = interpreter.full
        setup_line(f"python {interpreter.full}: {interpreter.path}"
                   + (f" (virtualenv {env['VIRTUAL_ENV']})" if "VIRTUAL_ENV" in env else ""))
        log_event("job.python", job_id=job.job_id, python=interpreter.full, path=interpreter.path,
                  venv=job.dispatch.python_venv)
        return env

    def job_spec(self, job: Job, python_env: dict[str, str] | None = None) -> JobSpec:
        dispatch = job.dispatch
        # FORCE_COLOR: tools keep their colours although their output goes to a pipe (log viewers render
        # ANSI); a workflow or job env may set it back to 0
        env = safe_base_env({**identity_env(self.step_user), "FORCE_COLOR": "1", **dispatch.env, "CI": "true",
                             "KICI": "true", "KICI_RUN_ID": dispatch.run_id, "KICI_JOB_ID": dispatch.job_id})
        if python_env:  # the chosen interpreter (and venv) in front of the already-cleaned PATH
            env = toolchains.apply(env, python_env)
        return JobSpec(
            workspace=str(job.workspace),
            workflow_file=dispatch.workflow_file,
            export=dispatch.export,
            workflow=dispatch.workflow,
            job=dispatch.job,
            display_name=dispatch.display_name,
            matrix=dispatch.matrix,
            event=Event.model_validate(dispatch.event),
            env=env,
            secrets=dispatch.secrets,
            upstream_outputs=dispatch.upstream_outputs,
            expected_content_hash=dispatch.content_hash,
            job_timeout_ms=dispatch.job_timeout_ms,
            grace_period_ms=dispatch.grace_period_ms,
            kici_dir=KICI_DIR,
            run_id=dispatch.run_id,
            job_id=dispatch.job_id,
        )

    # -- stopping -----------------------------------------------------------------------------------

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.active:
            self.changed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await aio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return not self.active
        return True

    async def stop_all(self, timeout: float) -> None:
        """Cancel every running job, give them `timeout` seconds to end (hooks included), then kill."""
        deadline = time.monotonic() + timeout
        for job in self.active:
            if job.cancel_requested is None:
                job.cancel_requested = (False, "agent shutting down")
                if job.cloner is not None:
                    job.cloner.cancel()
                if job.execution is not None:
                    grace = min(self.settings.cancel_grace_ms / 1000, max(0.1, timeout * 0.7))
                    self._spawn(job.execution.cancel(force=False, grace=grace, reason="agent shutting down"))
        if not await self.wait_idle(max(0.0, deadline - time.monotonic())):
            for job in self.active:
                job.cancel_requested = (True, "agent shutting down")
                if job.cloner is not None:
                    job.cloner.cancel()
                if job.execution is not None:
                    await job.execution.terminate(grace=0)
            await self.wait_idle(5.0)
        for task in [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]:
            task.cancel()


async def _flush_every(streamer: LogStreamer, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        streamer.flush()


def _total_memory_mb() -> int | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return int(pages * size // (1024 * 1024)) if pages > 0 and size > 0 else None
