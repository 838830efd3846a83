"""Names for unnamed jobs and steps, shared by the compiler and the runner so both agree.

Unnamed steps are `step-1`, `step-2`, … in order within their job; named steps do not use up numbers.
Unnamed jobs are `job-1`, `job-2`, … within their workflow.
"""

from __future__ import annotations

from collections.abc import Sequence

from kici.sdk.definitions import Job, Step


def step_names(steps: Sequence[Step]) -> list[str]:
    names: list[str] = []
    counter = 0
    for s in steps:
        if s.name:
            names.append(s.name)
        else:
            counter += 1
            names.append(f"step-{counter}")
    return names


def job_names(jobs: Sequence[Job]) -> list[str]:
    names: list[str] = []
    counter = 0
    for j in jobs:
        if j.name:
            names.append(j.name)
        else:
            counter += 1
            names.append(f"job-{counter}")
    return names
