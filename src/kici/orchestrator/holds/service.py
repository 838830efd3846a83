"""The held service: what `kici-admin held …`, the `held` REST routes and `/kici approve` comments call.

It knows nothing of any one kind of gate: it lists the pending gates of every registered kind, and hands an
approval or rejection of a run to each kind in turn inside ONE transaction, writing one audit row per kind
that decided something (`held.approve` / `held.reject`, target `run:<id>`). After the commit it wakes the
dispatcher for the jobs a decision released (and tells the agents of runs a release superseded). A second
kind plugs in by being added to the list the service is built with (`Services.assemble`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AuditOutcome, utcnow
from kici.orchestrator.holds.gates import Approver, Gate, GateOutcome, PendingGate
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import audit
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.runs import Superseded

ACTION_APPROVE = "held.approve"
ACTION_REJECT = "held.reject"


class HeldRunNotFound(LookupError):
    """No such run (in the caller's org)."""


class NotHeld(Exception):
    """The run has nothing pending to decide: not held, or decided already (→ 409)."""


class DecisionRefused(PermissionError):
    """Every gate pending on the run refused this approver (an untrusted commenter, …)."""


@runtime_checkable
class SupersedingGate(Protocol):
    """A gate whose releases may cancel older runs of a concurrency group (`cancel_in_progress`)."""

    def take_superseded(self, run_id: str) -> list[Superseded]: ...


@dataclass(frozen=True)
class AuditContext:
    """Who asks, for the audit rows: an admin token's request, or a GitHub comment."""

    org_id: str
    fields: dict[str, Any] = field(default_factory=dict)
    """`audit_log` columns besides action, outcome and target (`actor`, `token_id`, `client`, …)."""


@dataclass(frozen=True)
class Decision:
    run_id: str
    action: str
    outcomes: list[GateOutcome]

    @property
    def released_job_ids(self) -> list[str]:
        return [job for outcome in self.outcomes for job in outcome.released_job_ids]

    def as_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "action": self.action.removeprefix("held."),
            "gates": [o.model_dump(mode="json") for o in self.outcomes if o.decided or o.recorded],
            "released_job_ids": self.released_job_ids,
        }


class HeldService:
    def __init__(
        self, database: Database, gates: Sequence[Gate], ingest: Ingest | None = None, *,
        wake_dispatcher: Callable[[], None] | None = None, wake_reporter: Callable[[], None] | None = None,
    ) -> None:
        self.database = database
        self.gates: list[Gate] = list(gates)
        self.ingest = ingest
        self.wake_dispatcher = wake_dispatcher
        """Called after a decision released jobs: they are queued now."""
        self.wake_reporter = wake_reporter
        """Called after every decision: the jobs' check runs changed (action required → queued, cancelled)."""

    def add_gate(self, gate: Gate) -> None:
        self.gates.append(gate)

    async def list(self, *, org_id: str, run_id: str | None = None) -> list[PendingGate]:
        async with self.database.read() as conn:
            found: list[PendingGate] = []
            for gate in self.gates:
                found += await gate.pending(conn, org_id=org_id, run_id=run_id)
        return sorted(found, key=lambda g: (g.created_at, g.run_id, g.job_id or ""))

    async def approve(self, run_id: str, approver: Approver, audit_context: AuditContext) -> Decision:
        return await self._decide(run_id, approver, audit_context, reject=False, reason=None)

    async def reject(
        self, run_id: str, approver: Approver, audit_context: AuditContext, reason: str | None = None
    ) -> Decision:
        return await self._decide(run_id, approver, audit_context, reject=True, reason=reason)

    async def _decide(
        self, run_id: str, approver: Approver, ctx: AuditContext, *, reject: bool, reason: str | None
    ) -> Decision:
        """`HeldRunNotFound`, `NotHeld` (nothing pending), `DecisionRefused` (pending, but every kind refused
        this approver: nothing was written)."""
        action = ACTION_REJECT if reject else ACTION_APPROVE
        now: dt.datetime = utcnow()
        async with self.database.transaction() as conn:
            run = await run_store.get_run(conn, run_id)
            if run is None or run.org_id != ctx.org_id:
                raise HeldRunNotFound(run_id)
            outcomes: list[GateOutcome] = []
            for gate in self.gates:
                if reject:
                    outcomes.append(await gate.reject(conn, run_id, approver, reason, now=now))
                else:
                    outcomes.append(await gate.approve(conn, run_id, approver, now=now))
            acted = [o for o in outcomes if o.decided or o.recorded]
            if not acted:
                refusals = [o.refused for o in outcomes if o.refused]
                if refusals:
                    raise DecisionRefused("; ".join(refusals))
                verb = action.removeprefix("held.")
                raise NotHeld(f"run {run_id} is not held (status {run.status}): nothing to {verb}")
            for outcome in acted:
                what = f"{outcome.kind.value}: " + (
                    f"decided {outcome.decided}" if outcome.decided else f"approval recorded ({outcome.recorded})"
                )
                await audit.record(
                    conn, action=action, outcome=AuditOutcome.ALLOWED, org_id=ctx.org_id, target=f"run:{run_id}",
                    reason=what + (f"; {reason}" if reason else ""), **ctx.fields,
                )
        decision = Decision(run_id, action, outcomes)
        log_event("held.decided", run_id=run_id, action=action, approver=approver.label,
                  released=len(decision.released_job_ids))
        await self._after_commit(run_id, decision)
        return decision

    async def _after_commit(self, run_id: str, decision: Decision) -> None:
        superseded: list[Superseded] = []
        for gate in self.gates:
            if isinstance(gate, SupersedingGate):
                superseded += gate.take_superseded(run_id)
        if self.ingest is not None:
            await self.ingest.superseded(superseded)
        if decision.released_job_ids and self.wake_dispatcher is not None:
            self.wake_dispatcher()
        if self.wake_reporter is not None:
            self.wake_reporter()

    async def record_denied(self, target: str, action: str, ctx: AuditContext, reason: str) -> None:
        """An audit row for a decision refused (an untrusted commenter), in its own transaction."""
        async with self.database.transaction() as conn:
            await audit.record(conn, action=action, outcome=AuditOutcome.DENIED, org_id=ctx.org_id,
                               target=target, reason=reason, **ctx.fields)
