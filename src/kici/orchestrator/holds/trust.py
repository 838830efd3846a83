"""The trust gate: runs a source's trust policy held (`runs.status` held, `runs.trust` untrusted), decided
through the held service.

- approve: the run is released at exactly the commit it was created for (`runs.trust` approved; secrets
  only when the policy's `secrets_for_approved` says so); its root jobs are queued, dependents pending.
- reject: the run is cancelled with the reason (its held jobs through `REJECT`).
- expire (the sweeper, `expire_holds`): a hold past `runs.hold_expires_at` is cancelled through `EXPIRE`
  with "hold expired after 72h".

Who may decide: an admin token with `approvals:write` (the route checks it), or a GitHub user the run's
source trusts (its `author_association` in `trusted_associations`, its login in `trusted_users`, or —
checked by the comment handler through the GitHub API, and passed as role `team:<org/slug>` — a member of
one of `trusted_teams`).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.durations import format_duration
from kici.engine.states import JobEvent, RunStatus
from kici.orchestrator.db.schema import SourceKind
from kici.orchestrator.holds.gates import Approver, GateKind, GateOutcome, PendingGate
from kici.orchestrator.holds.policy import TrustPolicy, policy_of
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.runs import QueueLimits, RunNotHeld, RunRecord, Superseded
from kici.orchestrator.store.sources import get_source


def _pending(run: RunRecord) -> PendingGate:
    return PendingGate(
        kind=GateKind.TRUST, run_id=run.id, job_id=None, org_id=run.org_id, repo=run.repo, workflow=run.workflow,
        sha=run.sha, reason=run.hold_reason or "held for approval", created_at=run.created_at,
        expires_at=run.hold_expires_at,
    )


async def policy_for_run(conn: AsyncConnection, run: RunRecord) -> TrustPolicy:
    """The trust policy of the run's source as it is now (the defaults when the source is gone)."""
    source = await get_source(conn, run.source_id) if run.source_id else None
    if source is None or source.kind is not SourceKind.GITHUB:
        return TrustPolicy()
    return policy_of(source.config)


def github_eligible(policy: TrustPolicy, approver: Approver) -> bool:
    """Whether the policy trusts a GitHub approver (see the module docstring for `team:` roles)."""
    role = approver.role or ""
    if role.startswith("team:"):
        return role.removeprefix("team:") in policy.trusted_teams
    if role.upper() in policy.trusted_associations:
        return True
    return approver.name.lower() in {u.lower() for u in policy.trusted_users}


class TrustGate:
    kind = GateKind.TRUST

    def __init__(self, limits: QueueLimits) -> None:
        self.limits = limits
        self._superseded: dict[str, list[Superseded]] = {}

    async def pending(self, conn: AsyncConnection, *, org_id: str, run_id: str | None = None) -> list[PendingGate]:
        return [_pending(run) for run in await run_store.list_held_runs(conn, org_id=org_id, run_id=run_id)]

    async def _held(self, conn: AsyncConnection, run_id: str) -> RunRecord | None:
        run = await run_store.get_run(conn, run_id)
        return run if run is not None and run.status == RunStatus.HELD.value else None

    async def _refusal(self, conn: AsyncConnection, run: RunRecord, approver: Approver) -> str | None:
        if approver.kind != "github":
            return None  # an admin token: the route checked `approvals:write`
        policy = await policy_for_run(conn, run)
        if github_eligible(policy, approver):
            return None
        return f"{approver.label} ({approver.role or 'no association'}) is not trusted by the source's trust policy"

    async def approve(
        self, conn: AsyncConnection, run_id: str, approver: Approver, *, now: dt.datetime
    ) -> GateOutcome:
        run = await self._held(conn, run_id)
        if run is None:
            return GateOutcome(kind=self.kind, run_id=run_id)
        refused = await self._refusal(conn, run, approver)
        if refused is not None:
            return GateOutcome(kind=self.kind, run_id=run_id, refused=refused)
        policy = await policy_for_run(conn, run)
        try:
            released = await run_store.release_held_run(
                conn, run_id, secrets_allowed=policy.secrets_for_approved, limits=self.limits, now=now
            )
        except RunNotHeld:  # decided by someone else between the read and the lock
            return GateOutcome(kind=self.kind, run_id=run_id)
        if released.superseded:
            self._superseded[run_id] = released.superseded
        return GateOutcome(kind=self.kind, run_id=run_id, decided=1, released_job_ids=released.settled.newly_queued)

    async def reject(
        self, conn: AsyncConnection, run_id: str, approver: Approver, reason: str | None, *, now: dt.datetime
    ) -> GateOutcome:
        del now
        run = await self._held(conn, run_id)
        if run is None:
            return GateOutcome(kind=self.kind, run_id=run_id)
        refused = await self._refusal(conn, run, approver)
        if refused is not None:
            return GateOutcome(kind=self.kind, run_id=run_id, refused=refused)
        why = f"rejected by {approver.label}" + (f": {reason}" if reason else "")
        try:
            await run_store.end_held_run(conn, run_id, event=JobEvent.REJECT, by=approver.label, reason=why)
        except RunNotHeld:
            return GateOutcome(kind=self.kind, run_id=run_id)
        return GateOutcome(kind=self.kind, run_id=run_id, decided=1)

    def take_superseded(self, run_id: str) -> list[Superseded]:
        """Runs an approval's concurrency group cancelled (`cancel_in_progress`): the caller tells their
        agents once the decision has committed."""
        return self._superseded.pop(run_id, [])


def expiry_reason(run: RunRecord) -> str:
    if run.hold_expires_at is None:
        return "hold expired"
    return f"hold expired after {format_duration(run.hold_expires_at - run.created_at)}"


async def expire_hold(conn: AsyncConnection, run_id: str, *, now: dt.datetime) -> bool:
    """End one expired hold (the sweeper); False when it was decided meanwhile or is not due."""
    run = await run_store.get_run(conn, run_id)
    if run is None or run.status != RunStatus.HELD.value or run.hold_expires_at is None or run.hold_expires_at > now:
        return False
    try:
        await run_store.end_held_run(conn, run_id, event=JobEvent.EXPIRE, by="system", reason=expiry_reason(run))
    except RunNotHeld:
        return False
    return True
