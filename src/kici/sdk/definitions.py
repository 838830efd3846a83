"""Workflow, job and step definitions: `workflow(...)`, `job(...)`, `step(...)` and their helpers.

Definitions are plain objects holding what the author wrote; `kici compile` validates them and writes
the lock file, and the runner executes the callables they carry. Durations are seconds (int, float or
`timedelta`); the lock file stores milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar, overload

from kici.sdk.triggers import Trigger

Duration = int | float | timedelta
StepFn = Callable[..., Any]
Hook = Callable[..., Any]
When = Literal["success", "always", "on_failure", "on_skip"] | str | Sequence[str]

DEFAULT_HOOK_TIMEOUT = 5 * 60.0


def seconds(value: Duration | None) -> float | None:
    """Normalise a duration to seconds (validation of the sign happens at compile time)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


@dataclass(frozen=True)
class Retry:
    """Retry policy: `max_attempts` tries in all, waiting `delay` then growing (exponential) or not."""

    max_attempts: int
    delay: Duration = 1.0
    backoff: Literal["exponential", "fixed"] = "exponential"
    max_delay: Duration = 30.0
    retry_if: Callable[[BaseException], bool] | None = None

    def wait_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (2, 3, …)."""
        base = seconds(self.delay) or 0.0
        cap = seconds(self.max_delay) or base
        if self.backoff == "fixed":
            return min(base, cap)
        return float(min(base * (2 ** (attempt - 2)), cap))


@dataclass(frozen=True)
class Cache:
    """A cache declaration (`key`, `paths`, `restore_keys`); executed by agents with cache storage."""

    key: str
    paths: Sequence[str]
    restore_keys: Sequence[str] = ()


@dataclass(frozen=True)
class Resources:
    """Limits for all of a job's processes together: `Resources(cpus=2, memory="4G", pids=1024)`.

    `cpus`: CPU time as a number of CPUs (0.5, 1, 2); `memory`: a size such as "512M", "4G" or "1.5G"
    (powers of 1024); `pids`: processes and threads at the same time. Unset fields take the agent's
    defaults. A job over its memory limit fails with the category `memory_limit`.
    """

    cpus: float | None = None
    memory: str | int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class Rule:
    """A condition checked on the agent before a job or step: false skips it.

    `check` receives the context; `None` means the rule always fails (see `skip`).
    """

    label: str
    check: Callable[[Any], Any] | None = None


def rule(label: str, check: Callable[[Any], Any] | None = None) -> Rule:
    return Rule(label, check)


def skip(label: str = "skipped") -> Rule:
    """A rule that always skips: put it on a job or step to switch it off."""
    return Rule(label, None)


@dataclass(eq=False)
class Step:
    """One step: a callable taking the context (sync or `async def`), or a shell command."""

    name: str | None
    fn: StepFn
    command: str | None = None
    timeout: Duration | None = None
    retry: int | Retry | None = None
    continue_on_error: bool = False
    rules: Sequence[Rule] = ()
    cache: Cache | Sequence[Cache] | Mapping[str, Any] | None = None
    on_cancel: Hook | None = None
    cleanup: Hook | None = None
    env: Mapping[str, str] | None = None

    def __call__(self, ctx: Any) -> Any:
        return self.fn(ctx)

    def __repr__(self) -> str:
        return f"Step({self.name or self.command or getattr(self.fn, '__name__', '?')!r})"


def _shell_fn(command: str) -> StepFn:
    def run(ctx: Any) -> None:
        ctx.sh(command)

    run.__name__ = "shell"
    run.__qualname__ = "shell"
    return run


def _fn_name(fn: Callable[..., Any]) -> str | None:
    name = getattr(fn, "__name__", None)
    return None if name in (None, "<lambda>", "shell") else name


F = TypeVar("F", bound=Callable[..., Any])


@overload
def step(fn: StepFn, /) -> Step: ...
@overload
def step(name: str, run: str | StepFn, /, **options: Any) -> Step: ...
@overload
def step(name: str | None = None, /, **options: Any) -> Callable[[StepFn], Step]: ...


def step(
    name_or_fn: str | StepFn | None = None, run: str | StepFn | None = None, /, **options: Any
) -> Step | Callable[[StepFn], Step]:
    """Define a step.

    - `@step` on a function: a step named after the function;
    - `@step("name", timeout=60, retry=3)`: the same with a name and options;
    - `step("lint", "ruff check .")`: a shell-command step;
    - `step(fn)` / `step("name", fn)`: from an existing callable.
    Options: `timeout`, `retry`, `continue_on_error`, `rules`, `cache`, `on_cancel`, `cleanup`, `env`.
    """
    _check_options("step", options, _STEP_OPTIONS)
    if callable(name_or_fn) and not isinstance(name_or_fn, str):
        if run is not None:
            raise TypeError("step(fn) takes no second positional argument")
        return _make_step(_fn_name(name_or_fn), name_or_fn, options)
    name = name_or_fn
    if run is not None:
        if isinstance(run, str):
            return _make_step(name, _shell_fn(run), options, command=run)
        if callable(run):
            return _make_step(name, run, options)
        raise TypeError(f"step {name!r}: the second argument must be a shell command or a callable")

    def decorate(fn: StepFn) -> Step:
        return _make_step(name if name is not None else _fn_name(fn), fn, options)

    return decorate


_STEP_OPTIONS = frozenset(
    {"timeout", "retry", "continue_on_error", "rules", "cache", "on_cancel", "cleanup", "env"}
)


def _check_options(what: str, options: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{what}() got unknown option(s): {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _make_step(name: str | None, fn: StepFn, options: Mapping[str, Any], command: str | None = None) -> Step:
    return Step(name=name, fn=fn, command=command, **options)


def as_step(item: Step | StepFn | str) -> Step:
    """Accept what a job's `steps=` list may contain: Step objects, callables and shell strings."""
    if isinstance(item, Step):
        return item
    if isinstance(item, str):
        return Step(name=None, fn=_shell_fn(item), command=item)
    if callable(item):
        return Step(name=_fn_name(item), fn=item)
    raise TypeError(f"not a step: {item!r} (use a function, a shell string or kici.step(...))")


@dataclass(frozen=True)
class Need:
    """A dependency on another job, run when the upstream's final status fits `when`."""

    job: Job | str
    when: When = "success"

    @property
    def name(self) -> str | None:
        return self.job if isinstance(self.job, str) else self.job.name


def need(job: Job | str, when: When = "success") -> Need:
    """`need(build, when="always")`: `success` (default), `always`, `on_failure`, `on_skip` or statuses."""
    return Need(job, when)


RunsOn = str | Sequence[str] | Mapping[str, Any] | None


@dataclass(eq=False)
class Job:
    name: str | None
    steps: list[Step]
    runs_on: RunsOn = None
    needs: Sequence[Need | Job | str] = ()
    matrix: Sequence[Any] | Mapping[str, Sequence[Any]] | None = None
    include: Sequence[Mapping[str, Any]] | None = None
    exclude: Sequence[Mapping[str, Any]] | None = None
    env: Mapping[str, str] | None = None
    environment: str | Callable[[Any], Any] | None = None
    environments: Sequence[str | Callable[[Any], Any]] | None = None
    secrets: Sequence[str] | None = None
    """Names of the orchestrator's secrets the job receives (and no others); see docs/user/secrets.md."""
    concurrency_group: str | Callable[[Any], Any] | None = None
    timeout: Duration | None = None
    grace_period: Duration | None = None
    rules: Sequence[Rule] = ()
    cache: Cache | Sequence[Cache] | Mapping[str, Any] | None = None
    continue_on_error: bool = False
    on_success: Hook | None = None
    on_failure: Hook | None = None
    cleanup: Hook | None = None
    on_cancel: Hook | None = None
    before_step: Hook | None = None
    after_step: Hook | None = None
    artifacts: Sequence[str] = ()
    """Globs of workspace files the agent uploads after the job (`["dist/*.whl", "reports/**"]`)."""
    artifacts_when: str = "success"
    """When they are uploaded: `success` (default), `on_failure` or `always`."""
    test_reports: Sequence[str] = ()
    """Globs of JUnit XML files (`["reports/*.xml"]`) the agent sends after the job, succeeded or failed;
    the orchestrator keeps their per-test results (docs/user/test-reports.md)."""
    python: str | None = None
    python_venv: bool = False
    resources: Resources | None = None
    """Resource limits of the job (`Resources(cpus=…, memory=…, pids=…)`), see docs/user/resources.md."""
    has_run: bool = False
    has_steps: bool = True

    def __repr__(self) -> str:
        return f"Job({self.name!r})"


_JOB_OPTIONS = frozenset(
    {
        "runs_on", "needs", "matrix", "include", "exclude", "env", "environment", "environments",
        "secrets", "concurrency_group", "timeout", "grace_period", "rules", "cache", "continue_on_error",
        "on_success", "on_failure", "cleanup", "on_cancel", "before_step", "after_step",
        "artifacts", "artifacts_when", "test_reports", "python", "python_venv",
        "resources",
    }
)


@overload
def job(name: str | None, /, *, steps: Sequence[Step | StepFn | str], **options: Any) -> Job: ...
@overload
def job(name: str | None, /, *, run: str | StepFn, **options: Any) -> Job: ...
@overload
def job(name: str | None = None, /, **options: Any) -> Callable[[StepFn], Job]: ...


def job(
    name: str | None = None,
    /,
    *,
    steps: Sequence[Step | StepFn | str] | None = None,
    run: str | StepFn | None = None,
    **options: Any,
) -> Job | Callable[[StepFn], Job]:
    """Define a job: `job("test", steps=[...], runs_on="linux", needs=[build], matrix={...})`.

    `run=` is a single-step shorthand (a callable or a shell command) and cannot be combined with
    `steps=`. Used as a decorator (`@job("deploy", needs=[test])`), the function becomes that one step.
    """
    _check_options("job", options, _JOB_OPTIONS)
    if steps is None and run is None:

        def decorate(fn: StepFn) -> Job:
            return _make_job(name if name is not None else _fn_name(fn), None, fn, options)

        return decorate
    return _make_job(name, steps, run, options)


def _make_job(
    name: str | None,
    steps: Sequence[Step | StepFn | str] | None,
    run: str | StepFn | None,
    options: Mapping[str, Any],
) -> Job:
    if isinstance(steps, str | Step) or callable(steps):
        steps = [steps]  # type: ignore[list-item]
    step_list = [as_step(s) for s in steps or ()]
    if run is not None:
        run_step = as_step(run)
        if run_step.name is None and name is not None:
            run_step.name = name
        step_list = [*step_list, run_step] if steps else [run_step]
    return Job(name=name, steps=step_list, has_run=run is not None, has_steps=steps is not None, **options)


@dataclass(frozen=True)
class Concurrency:
    """Workflow concurrency: runs sharing a `group` wait (or cancel the one in progress)."""

    group: str | Callable[[Any], Any]
    cancel_in_progress: bool = True
    max: int = 1


@dataclass(eq=False)
class Workflow:
    name: str
    on: list[Trigger]
    jobs: list[Job]
    description: str | None = None
    rules: Sequence[Rule] = ()
    env: Mapping[str, str] | None = None
    timeout: Duration | None = None
    concurrency: Concurrency | Mapping[str, Any] | None = None
    on_success: Hook | None = None
    on_failure: Hook | None = None
    cleanup: Hook | None = None
    on_cancel: Hook | None = None

    def __repr__(self) -> str:
        return f"Workflow({self.name!r})"

    def job(self, name: str) -> Job | None:
        return next((j for j in self.jobs if j.name == name), None)


def workflow(
    name: str,
    *,
    on: Trigger | Sequence[Trigger] | None = None,
    jobs: Sequence[Job] | Job,
    description: str | None = None,
    rules: Sequence[Rule] = (),
    env: Mapping[str, str] | None = None,
    timeout: Duration | None = None,
    concurrency: Concurrency | Mapping[str, Any] | None = None,
    on_success: Hook | None = None,
    on_failure: Hook | None = None,
    cleanup: Hook | None = None,
    on_cancel: Hook | None = None,
) -> Workflow:
    """Define a workflow. Triggers in `on` are OR-combined; a workflow with no triggers never runs."""
    triggers = [on] if isinstance(on, Trigger) else list(on or [])
    job_list = [jobs] if isinstance(jobs, Job) else list(jobs)
    return Workflow(
        name=name,
        on=triggers,
        jobs=job_list,
        description=description,
        rules=rules,
        env=env,
        timeout=timeout,
        concurrency=concurrency,
        on_success=on_success,
        on_failure=on_failure,
        cleanup=cleanup,
        on_cancel=on_cancel,
    )
