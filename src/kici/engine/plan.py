"""A run's concrete jobs: a matched workflow's jobs with matrices expanded and needs rewritten to them.

The orchestrator stores these rows when it creates a run; `kici preview` prints them and
`kici run local` executes them, so all three agree on names and edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kici.engine.lockfile import Job, Workflow
from kici.engine.matrix import child_job_name, expand_matrix


@dataclass(frozen=True)
class PlannedNeed:
    name: str
    """The upstream job's lock name (before matrix expansion); every child of it must be settled."""
    run_on: tuple[str, ...]


@dataclass(frozen=True)
class PlannedJob:
    name: str
    """Unique within the run: the job name, or `job (a, b)` for a matrix child."""
    job: str
    """The job's name in the lock file."""
    matrix: dict[str, Any] | None
    needs: tuple[PlannedNeed, ...] = ()
    lock_job: Job | None = field(default=None, compare=False, repr=False)


def plan_workflow(workflow: Workflow) -> list[PlannedJob]:
    planned: list[PlannedJob] = []
    for job in workflow.jobs:
        needs = tuple(PlannedNeed(n.name, tuple(n.run_on)) for n in job.needs)
        if job.matrix is None:
            planned.append(PlannedJob(job.name, job.name, None, needs, job))
            continue
        for combo in expand_matrix(job.matrix.values, job.include, job.exclude):
            values = combo if isinstance(combo, dict) else {"value": combo}
            planned.append(PlannedJob(child_job_name(job.name, combo), job.name, values, needs, job))
    return planned


def children_by_job(planned: list[PlannedJob]) -> dict[str, list[str]]:
    """Lock job name → the planned names that stand for it (one, or one per matrix combination)."""
    out: dict[str, list[str]] = {}
    for p in planned:
        out.setdefault(p.job, []).append(p.name)
    return out
