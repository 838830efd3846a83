"""Names for unnamed jobs and steps, shared by the compiler and the runner so both agree.

Unnamed steps are `step-1`, `step-2`, … in order within their job; named steps do not use up numbers.
Unnamed jobs are `job-1`, `job-2`, … within their workflow.
"""

from __future__ import annotations

from collections.abc import Sequence

from kici.sdk.definitions import DEFAULT_HOOK_TIMEOUT, Job, Step, Workflow

WORKFLOW_HOOKS_JOB = "__workflow_hooks__"
"""Mirrors `kici.engine.runner_protocol.WORKFLOW_HOOKS_JOB` (the SDK may not import the engine)."""


def _numbered(names: Sequence[str | None], prefix: str) -> list[str]:
    out: list[str] = []
    counter = 0
    for name in names:
        if name:
            out.append(name)
        else:
            counter += 1
            out.append(f"{prefix}-{counter}")
    return out


def step_names(steps: Sequence[Step]) -> list[str]:
    return _numbered([s.name for s in steps], "step")


def job_names(jobs: Sequence[Job]) -> list[str]:
    return _numbered([j.name for j in jobs], "job")


def workflow_hooks_job(workflow: Workflow, run_status: str, timeout: float = DEFAULT_HOOK_TIMEOUT) -> Job:
    """The workflow's hooks as a job of steps: `on_success` / `on_failure` / `on_cancel` for how the run
    ended, then `cleanup`, which runs even when the first hook failed."""
    first = {"success": workflow.on_success, "failed": workflow.on_failure, "cancelled": workflow.on_cancel}
    first_name = {"success": "on_success", "failed": "on_failure", "cancelled": "on_cancel"}[run_status]
    steps: list[Step] = []
    hook = first[run_status]
    if hook is not None:
        steps.append(Step(name=first_name, fn=hook, timeout=timeout, continue_on_error=True))
    if workflow.cleanup is not None:
        steps.append(Step(name="cleanup", fn=workflow.cleanup, timeout=timeout))
    return Job(name=WORKFLOW_HOOKS_JOB, steps=steps)
