"""Running one job: drift gate, import, rules, steps with timeouts and retries, hooks, result.

Order of events (all reported over the protocol fd):

1. drift gate (`expected_content_hash`), then import of the workflow module — failures end the job
   (`failure_category` `drift` / `import`) before anything runs;
2. `JobStarted` with the step names (named like the compiler names them);
3. job rules (workflow rules, then job rules): the first that fails skips every step and the job;
4. each step: step rules (a failing one skips the step) → `before_step` → attempts (`running`, then one
   terminal state) → the step's `on_cancel` (if cancelled) and `cleanup` → `after_step`; environment
   changes of the step are applied for the following steps;
5. job hooks: `on_success` or `on_failure`, then `cleanup`; on cancel `on_cancel`, then `cleanup`; a
   force cancel runs no hook at all;
6. every process still left in the runner's tree is killed, then `JobResult` is sent.

Timeouts: a step attempt gets `step.timeout`, else `default_step_timeout_ms` (also when the job has a
timeout: each caps only its own scope). The job timeout covers rules, steps and the step hooks; the job
hooks that follow it (`on_failure`, `cleanup`) still run, each within `hook_timeout_ms`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kici.runner import calls, reaper
from kici.runner.calls import CANCEL, FORCE, JOB_TIMEOUT, TIMEOUT, Call, Outcome
from kici.runner.context import RunnerContext, StepFiles, check_outputs, make_private_dir
from kici.runner.env_files import parse_env_file, parse_path_file
from kici.runner.stdio import StdioCapture
from kici.runner.wire import SETUP_STEP_INDEX, ProtocolWriter, Spec
from kici.sdk.context import StepFailure
from kici.sdk.definitions import Job, Retry, Rule, Step, Workflow, seconds
from kici.sdk.naming import job_names, step_names

DEFAULT_KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping commands (the job's `grace_period` overrides it)."""

STEP_ACCEPTS = frozenset({TIMEOUT, CANCEL, FORCE, JOB_TIMEOUT})
"""What can stop a step attempt, a rule check, `before_step` and `after_step`."""
FINAL_ACCEPTS = frozenset({TIMEOUT, FORCE})
"""What can stop the hooks that run after a step or the job ended (they must run on cancel)."""


def retry_policy(retry: int | Retry | None) -> Retry:
    """`retry=N` is N attempts in all with the `Retry` defaults (1 s, doubling, at most 30 s)."""
    if retry is None:
        return Retry(1)
    if isinstance(retry, Retry):
        return retry
    return Retry(max(1, int(retry)))


def _ms(value: float) -> int:
    return round(value * 1000)


class _Failure:
    """The first thing that failed the job (later failures are appended to the error)."""

    def __init__(self) -> None:
        self.category: str | None = None
        self.errors: list[str] = []

    def add(self, category: str, error: str) -> None:
        if self.category is None:
            self.category = category
        self.errors.append(error)

    def __bool__(self) -> bool:
        return self.category is not None


class JobRunner:
    def __init__(
        self, spec: Spec, protocol: ProtocolWriter, capture: StdioCapture | None, started: float | None = None
    ) -> None:
        self.spec = spec
        self.protocol = protocol
        self.capture = capture
        self.started = time.monotonic() if started is None else started
        self.workflow_def: Workflow
        self.job_def: Job
        self.step_names: list[str] = []
        self.step_outputs: dict[str, dict[str, Any]] = {}
        self.requested_artifacts: list[str] = []
        """Files steps asked for with `ctx.upload_artifact` (workspace-relative); sent with the result."""
        self.env_delta: dict[str, str] = {}
        self.paths: list[str] = []
        self.kill_grace = DEFAULT_KILL_GRACE
        self.job_deadline: float | None = None
        self.cancel_requested = False
        self.cancel_force = False
        self.cancel_reason = "cancelled"
        self.job_timed_out = False
        self.hung: list[str] = []
        self.failure = _Failure()
        self.continued: list[str] = []
        """Steps that failed under `continue_on_error`: the job goes on but ends failed."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._current: Call | None = None
        self._event: Any = None
        self._tmp = make_private_dir(os.environ.get("TMPDIR") or "/tmp", "kici-runner-")
        if spec.job_timeout_ms is not None:
            self.job_deadline = self.started + spec.job_timeout_ms / 1000

    # -- plumbing used by contexts
    def emit(self, step_index: int, stream: str, line: str) -> None:
        self.protocol.log(step_index, stream, line)

    def system(self, step_index: int, level: str, message: str) -> None:
        for line in message.splitlines() or [""]:
            self.emit(step_index, "system", f"[{level}] {line}")

    @property
    def event(self) -> Any:
        if self._event is None:
            from kici.engine.events import Event

            self._event = Event.model_validate(self.spec.event)
        return self._event

    def base_env(self, step: Step | None) -> dict[str, str]:
        env = dict(self.spec.env)
        env.update(self.workflow_def.env or {})
        env.update(self.job_def.env or {})
        if step is not None:
            env.update(step.env or {})
        env.update(self.env_delta)
        if self.paths:
            env["PATH"] = os.pathsep.join([*self.paths, *([env["PATH"]] if env.get("PATH") else [])])
        return {str(k): str(v) for k, v in env.items()}

    def job_name_of(self, job: Job) -> str | None:
        for candidate, name in zip(self.workflow_def.jobs, job_names(self.workflow_def.jobs), strict=True):
            if candidate is job:
                return name
        return None

    # -- cancel (called from the control thread)
    def request_cancel(self, force: bool, reason: str) -> None:
        with self._lock:
            if self.cancel_requested:
                force = True  # a second cancel escalates to force
            self.cancel_requested = True
            self.cancel_force = self.cancel_force or force
            if reason:
                self.cancel_reason = reason
            call = self._current
        self._wake.set()
        if call is not None:
            call.abort(CANCEL, force=self.cancel_force)

    @property
    def stopping(self) -> bool:
        return self.cancel_requested or self.job_timed_out

    def _check_deadline(self) -> None:
        if self.job_deadline is not None and time.monotonic() >= self.job_deadline:
            self.job_timed_out = True

    # -- running callables
    def _run(
        self,
        fn: Callable[[Any], Any],
        *,
        name: str,
        step_index: int,
        step: Step | None,
        accepts: frozenset[str],
        timeout: float | None,
        attempt: int = 1,
        use_job_deadline: bool = True,
        after: Callable[[RunnerContext], None] | None = None,
        ctx_step: str | None = None,
    ) -> Outcome:
        call = Call(accepts, self.kill_grace)
        files = StepFiles(self._tmp)
        ctx = RunnerContext(
            self, step_name=name if ctx_step is None else ctx_step, step_index=step_index, step=step, call=call,
            files=files, attempt=attempt,
        )
        call.snapshot_children()
        with self._lock:
            self._current = call
            cancel = self.cancel_requested
            force = self.cancel_force
        if force:
            call.abort(FORCE, force=True)
        elif cancel:
            call.abort(CANCEL)
        calls.start(fn, ctx, call, name)

        def on_abort(reason: str) -> None:
            if reason == JOB_TIMEOUT:
                self.job_timed_out = True

        outcome = calls.wait(
            call,
            timeout=timeout,
            job_deadline=self.job_deadline if use_job_deadline else None,
            on_abort=on_abort,
        )
        with self._lock:
            self._current = None
        if outcome.kind == "hung":
            self.hung.append(name)
        if after is not None:
            after(ctx)
        files.remove()  # mounted secrets live only as long as the callable that mounted them
        return outcome

    def _hook(
        self,
        hook: Callable[[Any], Any] | None,
        name: str,
        step_index: int,
        step: Step | None,
        accepts: frozenset[str] = FINAL_ACCEPTS,
        use_job_deadline: bool = False,
        after: Callable[[RunnerContext], None] | None = None,
        step_name: str | None = None,
    ) -> bool:
        """Run a hook; a failure fails the job (category `hook`). Returns whether it succeeded.

        `ctx.step` is `step_name` (the step a step-level or before/after hook belongs to), else `name`.
        """
        if hook is None or self.cancel_force:
            return True
        if self.hung:
            self.system(step_index, "warn", f"hook {name} skipped: {', '.join(self.hung)} is still running")
            return True
        outcome = self._run(
            hook, name=name, step_index=step_index, step=step, accepts=accepts,
            timeout=self.spec.hook_timeout_ms / 1000, use_job_deadline=use_job_deadline, after=after,
            ctx_step=step_name,
        )
        if outcome.kind == "ok":
            return True
        if outcome.kind == "aborted" and outcome.reason in (CANCEL, FORCE, JOB_TIMEOUT):
            return True  # stopped with the job; the job's own status says why
        error = self._describe(outcome, name, step_index, self.spec.hook_timeout_ms)
        self.system(step_index, "error", f"hook {name} failed: {error}")
        self.failure.add("hook", f"hook {name} failed: {error}")
        return False

    def _describe(self, outcome: Outcome, name: str, step_index: int, timeout_ms: int) -> str:
        if outcome.kind == "hung":
            return (
                f"{name} did not return within {calls.THREAD_GRACE:g}s after it was stopped "
                f"({outcome.reason}); the runner stops without waiting for it"
            )
        if outcome.kind == "aborted":
            if outcome.reason == TIMEOUT:
                return f"timed out after {timeout_ms}ms"
            if outcome.reason == JOB_TIMEOUT:
                return self._job_timeout_error()
            return self.cancel_reason
        exc = outcome.exc
        assert exc is not None
        return self._exception_text(exc, step_index)

    def _exception_text(self, exc: BaseException, step_index: int) -> str:
        if isinstance(exc, StepFailure):
            return str(exc)
        import traceback

        frames = traceback.extract_tb(exc.__traceback__)
        runner_dir = str(Path(__file__).parent)
        user = [f for f in frames if not f.filename.startswith(runner_dir)]
        lines = traceback.format_list(user[-8:]) + traceback.format_exception_only(type(exc), exc)
        text = "".join(lines).rstrip()
        self.system(step_index, "error", "Traceback (most recent call last):\n" + text)
        return "".join(traceback.format_exception_only(type(exc), exc)).strip()

    def _job_timeout_error(self) -> str:
        return f"job_timeout: job exceeded its timeout of {self.spec.job_timeout_ms}ms"

    def _rules(self, rules: Sequence[Rule], step_index: int, step: Step | None, name: str) -> str | None:
        """The reason the first failing rule gives, or None when all pass (or the job is stopping)."""
        for r in rules:
            if self.stopping:
                return None
            if r.check is None:
                return f"rule {r.label!r} skips it"
            check = r.check
            outcome = self._run(
                check, name=f"rule {r.label}", step_index=step_index, step=step, accepts=STEP_ACCEPTS,
                timeout=self.spec.hook_timeout_ms / 1000, ctx_step=name if step is not None else "",
            )
            if outcome.kind == "ok":
                if outcome.value:
                    continue
                return f"rule {r.label!r} is false"
            if outcome.kind == "aborted" and outcome.reason in (CANCEL, FORCE, JOB_TIMEOUT):
                return None
            return f"rule {r.label!r} failed: {self._describe(outcome, name, step_index, self.spec.hook_timeout_ms)}"
        return None

    def _sleep(self, delay: float) -> bool:
        """Wait `delay` seconds unless the job is cancelled or times out; False when interrupted."""
        end = time.monotonic() + delay
        while True:
            self._wake.clear()
            self._check_deadline()
            if self.stopping:
                return False
            now = time.monotonic()
            if now >= end:
                return True
            limit = end - now
            if self.job_deadline is not None:
                limit = min(limit, max(0.0, self.job_deadline - now))
            self._wake.wait(limit)

    # -- environment changes
    def _collect(self, ctx: RunnerContext, delta: dict[str, str], paths: list[str]) -> None:
        env_text, path_text = ctx.files.read()
        parsed = parse_env_file(env_text)
        for error in parsed.errors:
            self.system(ctx.step_index, "warn", f"KICI_ENV: {error}")
        for key, value in parsed.env.items():
            if not ctx._refuse(key, "KICI_ENV"):
                delta[key] = value
        delta.update(ctx.pending_env)
        paths.extend(parse_path_file(path_text))
        paths.extend(ctx.pending_paths)

    # -- the job
    def run(self) -> dict[str, Any]:
        """Run the job (after the import); returns the JobResult fields."""
        job = self.job_def
        if self.spec.grace_period_ms is not None:  # the lock file's value, as the orchestrator sent it
            self.kill_grace = max(0.0, self.spec.grace_period_ms / 1000)
        elif job.grace_period is not None:
            self.kill_grace = max(0.0, seconds(job.grace_period) or 0.0)
        self.step_names = step_names(job.steps)
        self.protocol.job_started(self.step_names)
        if self.job_deadline is None and job.timeout is not None and self.spec.job_timeout_ms is None:
            self.spec.job_timeout_ms = _ms(seconds(job.timeout) or 0)
            self.job_deadline = self.started + self.spec.job_timeout_ms / 1000

        reason = self._rules([*self.workflow_def.rules, *job.rules], SETUP_STEP_INDEX, None, "job rules")
        self._check_deadline()
        if reason is not None and not self.stopping:
            self.system(SETUP_STEP_INDEX, "info", f"job skipped: {reason}")
            for i, name in enumerate(self.step_names):
                self.protocol.step_status(i, name, "skipped")
            return {"status": "skipped"}

        for i, (step, name) in enumerate(zip(job.steps, self.step_names, strict=True)):
            self._check_deadline()
            if self.failure or self.stopping or self.hung:
                self.protocol.step_status(i, name, "skipped")
                continue
            self._step(i, step, name)
            reaper.reap_orphans()

        self._final_hooks()
        return self._result()

    def _step(self, index: int, step: Step, name: str) -> None:
        if self.capture is not None:
            self.capture.switch(index)
        try:
            self._step_inner(index, step, name)
        finally:
            if self.capture is not None:
                self.capture.switch(SETUP_STEP_INDEX)

    def _step_inner(self, index: int, step: Step, name: str) -> None:
        job = self.job_def
        reason = self._rules(step.rules, index, step, name)
        if self.stopping and reason is None and step.rules:
            self.protocol.step_status(index, name, "cancelled" if self.cancel_requested else "skipped")
            return
        if reason is not None:
            self.system(index, "info", f"step skipped: {reason}")
            self.protocol.step_status(index, name, "skipped")
            return

        delta: dict[str, str] = {}
        paths: list[str] = []

        def collect(ctx: RunnerContext) -> None:
            self._collect(ctx, delta, paths)

        started = time.monotonic()
        if not self._hook(job.before_step, "before_step", index, step, accepts=STEP_ACCEPTS,
                          use_job_deadline=True, after=collect, step_name=name):
            self.protocol.step_status(index, name, "failed", duration_ms=_ms(time.monotonic() - started),
                                      error="before_step hook failed")
            return
        if self.stopping:
            self.protocol.step_status(index, name, "cancelled" if self.cancel_requested else "timed_out",
                                      error=self.cancel_reason if self.cancel_requested else self._job_timeout_error())
            return

        policy = retry_policy(step.retry)
        step_timeout = seconds(step.timeout)
        timeout = step_timeout if step_timeout is not None else self.spec.default_step_timeout_ms / 1000
        timeout_ms = _ms(timeout)
        attempt = 0
        state = "failed"
        error: str | None = None
        outputs: dict[str, Any] | None = None
        while True:
            attempt += 1
            self.protocol.step_status(index, name, "running", attempt=attempt)
            attempt_delta: dict[str, str] = {}
            attempt_paths: list[str] = []

            def collect_attempt(
                ctx: RunnerContext, d: dict[str, str] = attempt_delta, p: list[str] = attempt_paths
            ) -> None:
                self._collect(ctx, d, p)

            outcome = self._run(
                step.fn, name=name, step_index=index, step=step, accepts=STEP_ACCEPTS, timeout=timeout,
                attempt=attempt, after=collect_attempt,
            )
            retry_exc: BaseException | None = None
            if outcome.kind == "ok":
                try:
                    outputs = check_outputs(outcome.value)
                except ValueError as exc:
                    state, error = "failed", str(exc)
                    self.system(index, "error", error)
                else:
                    state, error = "success", None
            elif outcome.kind == "error":
                assert outcome.exc is not None
                state, error = "failed", self._exception_text(outcome.exc, index)
                retry_exc = outcome.exc
            else:  # aborted or hung
                reason = outcome.reason
                if reason == TIMEOUT:
                    state, error = "timed_out", f"timed out after {timeout_ms}ms"
                    retry_exc = TimeoutError(error)
                elif reason == JOB_TIMEOUT:
                    state, error = "timed_out", self._job_timeout_error()
                else:
                    state, error = "cancelled", self.cancel_reason
                if outcome.kind == "hung":
                    error = f"{error}; {self._describe(outcome, f'step {name!r}', index, timeout_ms)}"
                    self.system(index, "error", error)
                    retry_exc = None
            if state == "success" or retry_exc is None or attempt >= policy.max_attempts or self.stopping \
                    or self.hung:
                break
            if policy.retry_if is not None:
                try:
                    again = bool(policy.retry_if(retry_exc))
                except Exception as exc:
                    self.system(index, "warn", f"retry_if raised {type(exc).__name__}: {exc}; not retrying")
                    again = False
                if not again:
                    self.system(index, "info", "retry_if returned False; not retrying")
                    break
            delay = policy.wait_before(attempt + 1)
            self.system(index, "warn", f"attempt {attempt} failed: {error}; retrying in {delay:g}s")
            if not self._sleep(delay):
                if self.cancel_requested:
                    state, error = "cancelled", self.cancel_reason
                else:
                    state, error = "timed_out", self._job_timeout_error()
                break

        # environment changes of the last attempt reach the following steps, whatever its outcome
        delta.update(attempt_delta)
        paths.extend(attempt_paths)
        if self.capture is not None:
            self.capture.sync()  # what the step printed comes before its final status
        self.protocol.step_status(
            index, name, state, attempt=attempt, duration_ms=_ms(time.monotonic() - started), error=error,
            outputs=outputs if state == "success" else None,
        )
        if state == "success" and outputs:
            self.step_outputs[name] = outputs
        if state in ("failed", "timed_out") and not step.continue_on_error:
            if state == "timed_out" and error and error.startswith("job_timeout"):
                self.failure.add("timeout", error)
            elif state == "timed_out":
                self.failure.add("timeout", f"step {name!r} {error}")
            else:
                self.failure.add("step", f"step {name!r} failed: {error}")
        elif state in ("failed", "timed_out"):
            self.system(index, "warn", f"step failed but continue_on_error is set: {error}")
            self.continued.append(name)

        # the step's own hooks
        if state == "cancelled":
            self._hook(step.on_cancel, "on_cancel", index, step, step_name=name)
        self._hook(step.cleanup, "cleanup", index, step, step_name=name)
        if not self.stopping and not self.hung:
            self._hook(job.after_step, "after_step", index, step, accepts=STEP_ACCEPTS, use_job_deadline=True,
                       after=collect, step_name=name)
        if state != "cancelled":
            self.env_delta.update(delta)
            for p in paths:
                self.paths.insert(0, p)

    def _final_hooks(self) -> None:
        job = self.job_def
        if self.cancel_force:
            return
        if self.cancel_requested:
            self._hook(job.on_cancel, "on_cancel", SETUP_STEP_INDEX, None)
        elif self.failure or self.job_timed_out or self.continued or self.hung:
            self._hook(job.on_failure, "on_failure", SETUP_STEP_INDEX, None)
        else:
            self._hook(job.on_success, "on_success", SETUP_STEP_INDEX, None)
        self._hook(job.cleanup, "cleanup", SETUP_STEP_INDEX, None)

    def _result(self) -> dict[str, Any]:
        return {**self._outcome(), "artifacts": list(self.requested_artifacts)}

    def _outcome(self) -> dict[str, Any]:
        outputs = dict(self.step_outputs)
        if self.cancel_requested:
            return {"status": "cancelled", "outputs": outputs, "error": self.cancel_reason,
                    "failure_category": "cancelled"}
        if self.job_timed_out and not any(e.startswith("job_timeout") for e in self.failure.errors):
            self.failure.add("timeout", self._job_timeout_error())
        if self.failure:
            return {"status": "failed", "outputs": outputs, "error": "\n".join(self.failure.errors),
                    "failure_category": self.failure.category}
        if self.continued:
            names = ", ".join(repr(n) for n in self.continued)
            return {"status": "failed", "outputs": outputs,
                    "error": f"step(s) {names} failed (continue_on_error)", "failure_category": "step"}
        return {"status": "success", "outputs": outputs}

    def cleanup_tmp(self) -> None:
        import shutil

        shutil.rmtree(self._tmp, ignore_errors=True)

