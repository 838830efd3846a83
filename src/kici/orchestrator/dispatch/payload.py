"""Building a `job.dispatch` message from the database: the run, the job, its workflow's lock-file entry,
its upstream jobs' outputs, and where (and with which token) the agent clones the repository."""

from __future__ import annotations

import datetime as dt
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.lockfile import Workflow
from kici.engine.protocol import DispatchCache, JobDispatch
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import new_id
from kici.orchestrator.providers.base import CloneAccess
from kici.orchestrator.store import environments as env_store
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.queue import Claim, PendingRow
from kici.orchestrator.store.runs import JobRecord, RunRecord


class DispatchError(Exception):
    """The job cannot be handed out at all (its source is gone, its run has no workflow spec, …): the job
    fails with this message instead of going round the queue forever."""


class DispatchRetry(Exception):
    """The job cannot be handed out right now (the repository host did not answer): it goes back in line,
    and fails once it has used up its dispatch attempts."""


@dataclass(frozen=True)
class JobFacts:
    """What a dispatch needs of the job itself."""

    id: str
    name: str
    job: str
    matrix: dict[str, Any] | None
    queued_at: dt.datetime | None

    @classmethod
    def of(cls, record: JobRecord | PendingRow) -> JobFacts:
        if isinstance(record, PendingRow):
            return cls(record.job_id, record.name, record.job, record.matrix, record.queued_at)
        return cls(record.id, record.name, record.job, record.matrix, record.queued_at)


@dataclass(frozen=True)
class DispatchContext:
    run: RunRecord
    job: JobFacts
    workflow: Workflow
    upstream_outputs: dict[str, Any]
    environment: str | None = None
    """The job's deployment environment, resolved when its run was created (`jobs.environment`): the
    `env:<environment>` scope its declared secrets are looked up in first."""
    environment_variables: dict[str, str] = field(default_factory=dict)
    """The plain variables of the job's deployment environment, if it has one."""


def upstream_outputs(workflow: Workflow, job: JobFacts, run_jobs: list[JobRecord]) -> dict[str, Any]:
    """`ctx.outputs_of` data for `job`: for each lock job it needs, that job's outputs; for a matrix
    upstream `{"by_matrix": {child name: outputs}, "merged": {step: {...}}}` (children merged in plan
    order, later keys winning) — the same shape `kici run local` gives."""
    lock_job = workflow.job(job.job)
    out: dict[str, Any] = {}
    if lock_job is None:
        return out
    for need in lock_job.needs:
        ups = [j for j in run_jobs if j.job == need.name]
        if len(ups) == 1 and ups[0].matrix is None:
            out[need.name] = ups[0].outputs or {}
        elif ups:
            merged: dict[str, Any] = {}
            for up in ups:
                for step_name, values in (up.outputs or {}).items():
                    if isinstance(values, dict):
                        merged.setdefault(step_name, {}).update(values)
            out[need.name] = {"by_matrix": {u.name: u.outputs or {} for u in ups}, "merged": merged}
    return out


class RunCache:
    """Recently dispatched runs and their parsed workflow. A run's repository, commit, event and workflow
    never change, so jobs of the same run need not read and parse them again."""

    def __init__(self, size: int = 512) -> None:
        self._size = size
        self._runs: OrderedDict[str, tuple[RunRecord, Workflow]] = OrderedDict()

    def peek(self, run_id: str) -> tuple[RunRecord, Workflow] | None:
        return self._runs.get(run_id)

    async def get(self, conn: AsyncConnection, run_id: str) -> tuple[RunRecord, Workflow]:
        found = self._runs.get(run_id)
        if found is not None:
            self._runs.move_to_end(run_id)
            return found
        run = await run_store.get_run(conn, run_id)
        if run is None:
            raise DispatchError(f"run {run_id} no longer exists")
        if not run.workflow_spec:
            raise DispatchError("the run has no workflow definition to dispatch (created by an older orchestrator)")
        entry = (run, Workflow.model_validate(run.workflow_spec))
        self._runs[run_id] = entry
        while len(self._runs) > self._size:
            self._runs.popitem(last=False)
        return entry


async def load_context(db: Database, claim: Claim, runs: RunCache, row: PendingRow | None = None) -> DispatchContext:
    """Everything but the clone access. With the claimed queue row (which carries the job's facts) and the
    run in the cache, a job without needs reads nothing."""
    cached = runs.peek(claim.run_id)
    lock_job = cached[1].job(row.job) if cached is not None and row is not None else None
    if cached is not None and row is not None and lock_job is not None and not lock_job.needs \
            and not lock_job.environments:
        return DispatchContext(cached[0], JobFacts.of(row), cached[1], {})
    async with db.read() as conn:
        run, workflow = await runs.get(conn, claim.run_id)
        found = await run_store.get_job(conn, claim.job_id)
        if found is None:
            raise DispatchError(f"job {claim.job_id} no longer exists")
        job = JobFacts.of(found)
        lock_job = workflow.job(job.job)
        needs_outputs = lock_job is not None and bool(lock_job.needs)
        outputs = upstream_outputs(workflow, job, await run_store.list_jobs(conn, run.id)) if needs_outputs else {}
        # a job with an environment always takes this path: its resolved name is on its row
        variables = await env_store.variables_of_job(conn, job.id) if found.environment else {}
    return DispatchContext(run, job, workflow, outputs, found.environment, variables)


def build_dispatch(
    context: DispatchContext,
    access: CloneAccess,
    *,
    attempt: int,
    max_log_size_bytes: int,
    secrets: dict[str, str] | None = None,
) -> JobDispatch:
    """`secrets`: the values of the job's declared secrets (`dispatch.secrets.deliver`), nothing else."""
    run, job, workflow = context.run, context.job, context.workflow
    lock_job = workflow.job(job.job)
    return JobDispatch(
        message_id=new_id(),
        run_id=run.id,
        job_id=job.id,
        repo_url=access.url,
        ref=run.ref,
        sha=run.sha,
        workflow=workflow.name,
        job=job.job,
        display_name=job.name,
        matrix=job.matrix,
        workflow_file=workflow.source.file,
        export=workflow.source.export,
        content_hash=workflow.content_hash,
        event=run.event,
        # the environment's variables first: KiCI's own names always win
        env={**context.environment_variables, "KICI_RUN_ID": run.id, "KICI_JOB_ID": job.id,
             "KICI_WORKFLOW": workflow.name, "KICI_JOB": job.name},
        secrets=secrets or {},
        upstream_outputs=context.upstream_outputs,
        token=access.token,
        job_timeout_ms=lock_job.timeout if lock_job is not None else None,
        grace_period_ms=lock_job.grace_period if lock_job is not None else None,
        max_log_size_bytes=max_log_size_bytes,
        artifacts=(lock_job.artifacts or []) if lock_job is not None else [],
        artifacts_when=(lock_job.artifacts_when or "success") if lock_job is not None else "success",
        test_reports=(lock_job.test_reports or []) if lock_job is not None else [],
        python=lock_job.python if lock_job is not None else None,
        python_venv=bool(lock_job is not None and lock_job.python_venv),
        resources=lock_job.resources if lock_job is not None else None,
        caches=[DispatchCache(key=c.key, paths=c.paths, restore_keys=c.restore_keys)
                for c in ((lock_job.cache or []) if lock_job is not None else [])],
        attempt=attempt,
        timestamp=time.time(),
    )
