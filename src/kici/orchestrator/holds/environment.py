"""The environment gate: jobs waiting for their deployment environment's reviewers, decided through the
same `held` commands as trust holds (`holds.gates.Gate`).

An approval of a run records the approver on each of the run's jobs waiting for approvals whose
environment accepts the approver (by role or by name, and not the run's own author when the environment
prevents self-review); a job with enough approvals moves on to its wait timer, or straight through the
gate, and the run is settled so it joins its environment's deployment group and is queued when admitted.
A rejection cancels the run's waiting jobs (approvals or timer) and settles the run, which skips their
dependents. Jobs of a run still held for trust are never touched: the trust gate decides those first.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.states import JobEvent, JobState, RunStatus
from kici.orchestrator.db.schema import EnvironmentGateStatus
from kici.orchestrator.holds.gates import Approver, GateKind, GateOutcome, PendingGate
from kici.orchestrator.store import concurrency as groups
from kici.orchestrator.store import environments as env_store
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.jobs import set_job_status


async def _is_author(conn: AsyncConnection, approver: Approver, event: Any) -> bool:
    """The approver started the run: the event's actor is their GitHub login, or the admin token that
    started a manual run."""
    actor = event.get("actor") if isinstance(event, dict) else None
    if not isinstance(actor, str) or not actor:
        return False
    return actor in await env_store.run_authors(conn, approver.kind, approver.name)


class EnvironmentGate:
    """`Gate` for `GateKind.ENVIRONMENT`; stateless, so one instance serves every request."""

    kind = GateKind.ENVIRONMENT

    async def pending(
        self, conn: AsyncConnection, *, org_id: str, run_id: str | None = None
    ) -> list[PendingGate]:
        """Jobs waiting for approvals (not those waiting only for their wait timer: nobody decides those)."""
        found = []
        for gate, run in await env_store.waiting_gates(conn, org_id=org_id, run_id=run_id):
            missing = max(gate.approvals_required - len(gate.approvals), 0)
            found.append(
                PendingGate(
                    kind=self.kind, run_id=gate.run_id, job_id=gate.job_id, org_id=gate.org_id, repo=run["repo"],
                    workflow=run["workflow"], sha=run["sha"],
                    reason=env_store.approvals_reason(gate.environment, missing), environment=gate.environment,
                    approvals=[str(a["approver"]) for a in gate.approvals],
                    approvals_required=gate.approvals_required, created_at=gate.created_at,
                )
            )
        return found

    async def approve(
        self, conn: AsyncConnection, run_id: str, approver: Approver, *, now: dt.datetime
    ) -> GateOutcome:
        locked = await run_store.lock_run_row(conn, run_id)
        if locked is None or locked.status == RunStatus.HELD.value:
            return GateOutcome(kind=self.kind, run_id=run_id)
        decided = recorded = 0
        refusals: list[str] = []
        passed: list[str] = []
        for gate, run in await env_store.waiting_gates(conn, run_id=run_id):
            if gate.created_at >= now:
                # the gate appeared during this very decision (e.g. the trust approval released the run):
                # approving the run's trust is not approving its deployments
                continue
            env = await env_store.get_environment(conn, gate.environment, org_id=gate.org_id)
            if env is None:
                refusals.append(f"environment {gate.environment!r} no longer exists")
                continue
            if not env.may_review(approver.kind, approver.name, approver.role):
                refusals.append(
                    f"{approver.label} may not approve deployments to environment {env.name!r} "
                    f"(reviewers: {', '.join(env.reviewers)})"
                )
                continue
            if env.prevent_self_review and await _is_author(conn, approver, run["event"]):
                refusals.append(f"{approver.label} started this run and environment {env.name!r} prevents self-review")
                continue
            if any(a.get("approver") == approver.label for a in gate.approvals):
                refusals.append(f"{approver.label} already approved the deployment to environment {env.name!r}")
                continue
            approvals = [*gate.approvals, {"approver": approver.label, "role": approver.role, "at": now.isoformat()}]
            missing = gate.approvals_required - len(approvals)
            if missing > 0:
                await env_store.set_gate(conn, gate.job_id, status=EnvironmentGateStatus.APPROVAL,
                                         approvals=approvals, now=now)
                await env_store.set_wait_reason(conn, gate.job_id, env_store.approvals_reason(env.name, missing))
                recorded += 1
                continue
            decided += 1
            if env.wait_timer_s > 0:
                ready_at = now + dt.timedelta(seconds=env.wait_timer_s)
                await env_store.set_gate(conn, gate.job_id, status=EnvironmentGateStatus.TIMER, approvals=approvals,
                                         ready_at=ready_at, now=now)
                await env_store.set_wait_reason(conn, gate.job_id, env_store.timer_reason(env.name, ready_at))
                continue
            await env_store.set_gate(conn, gate.job_id, status=EnvironmentGateStatus.PASSED, approvals=approvals,
                                     now=now)
            passed.append(gate.job_id)
        released: list[str] = []
        if passed:
            released = await _release(conn, locked, passed)
        refused = "; ".join(refusals) if refusals and not decided and not recorded else None
        return GateOutcome(kind=self.kind, run_id=run_id, decided=decided, recorded=recorded, refused=refused,
                           released_job_ids=released)

    async def reject(
        self, conn: AsyncConnection, run_id: str, approver: Approver, reason: str | None, *, now: dt.datetime
    ) -> GateOutcome:
        locked = await run_store.lock_run_row(conn, run_id)
        if locked is None or locked.status == RunStatus.HELD.value:
            return GateOutcome(kind=self.kind, run_id=run_id)
        refusals: list[str] = []
        cancelled: list[str] = []
        for gate, _run in await env_store.waiting_gates(conn, run_id=run_id, statuses=env_store.PENDING_STATUSES):
            if gate.created_at >= now:
                continue
            env = await env_store.get_environment(conn, gate.environment, org_id=gate.org_id)
            if env is not None and not env.may_review(approver.kind, approver.name, approver.role):
                refusals.append(
                    f"{approver.label} may not reject deployments to environment {env.name!r} "
                    f"(reviewers: {', '.join(env.reviewers)})"
                )
                continue
            error = f"deployment to environment {gate.environment!r} rejected by {approver.label}"
            if reason:
                error += f": {reason}"
            await env_store.set_gate(conn, gate.job_id, status=EnvironmentGateStatus.REJECTED,
                                     decided_by=approver.label, reason=reason, now=now)
            if await set_job_status(conn, gate.job_id, JobState.CANCELLED, JobEvent.CANCEL, values={"error": error}):
                cancelled.append(gate.job_id)
        if cancelled:
            await run_store.settle_run(conn, run_id, now=now, locked=locked, finished_jobs=cancelled)
        refused = "; ".join(refusals) if refusals and not cancelled else None
        return GateOutcome(kind=self.kind, run_id=run_id, decided=len(cancelled), refused=refused)


async def _release(conn: AsyncConnection, locked: run_store.LockedRun, job_ids: list[str]) -> list[str]:
    """Jobs through their gate: settle the run, which moves them into their environment's deployment group
    (queued when admitted). While the run waits for its workflow concurrency group they keep waiting, with
    the run's reason."""
    if locked.gated:
        for job_id in job_ids:
            await env_store.set_wait_reason(conn, job_id, locked.wait_reason)
        return []
    settled = await run_store.settle_run(conn, locked.id, locked=locked)
    return list(settled.newly_queued)


async def release_due_timers(conn: AsyncConnection, *, now: dt.datetime, limit: int = 100) -> list[str]:
    """Jobs whose wait timer ran out pass their gate (the sweep's work); the ids of jobs queued."""
    by_run: dict[str, list[str]] = {}
    for run_id, job_id in await env_store.due_timers(conn, now=now, limit=limit):
        by_run.setdefault(run_id, []).append(job_id)
    # every run row first, in creation order and without waiting (lock order is run rows → concurrency
    # lock, which the first settle below takes); a run busy elsewhere is released at the next tick
    free = await groups.lock_runs(conn, list(by_run), skip_locked=True)
    queued: list[str] = []
    for run_id in free:
        job_ids = by_run[run_id]
        locked = await run_store.lock_run_row(conn, run_id)
        if locked is None:
            continue
        for job_id in job_ids:
            await env_store.set_gate(conn, job_id, status=EnvironmentGateStatus.PASSED, now=now)
        queued += await _release(conn, locked, job_ids)
    return queued
