"""The seam between the `held` commands and the kinds of gate that hold work.

A gate kind (trust holds on runs, environment gates on jobs) implements `Gate`. The held service lists the
pending gates of every kind and hands an approval or a rejection of a run to each kind in turn, inside one
transaction, so a decision either lands whole or not at all; each kind checks the approver's eligibility
itself and says what it did in a `GateOutcome`.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection


class GateKind(StrEnum):
    TRUST = "trust"
    ENVIRONMENT = "environment"


class Approver(BaseModel):
    """Who decides: an admin token (`token:<id>`) or a GitHub user commenting `/kici approve`."""

    model_config = ConfigDict(frozen=True)

    kind: str
    """`token` or `github`."""
    name: str
    """The token id, or the GitHub login."""
    role: str | None = None
    """The token's role, or the commenter's GitHub `author_association` (OWNER, MEMBER, COLLABORATOR, …)."""

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


class PendingGate(BaseModel):
    """One undecided gate, as `kici-admin held list` shows it."""

    model_config = ConfigDict(frozen=True)

    kind: GateKind
    run_id: str
    job_id: str | None
    """None: the whole run is held (trust); otherwise the job waiting for its environment."""
    org_id: str
    repo: str
    workflow: str
    sha: str
    reason: str
    environment: str | None = None
    approvals: list[str] = []
    """Approver labels recorded so far."""
    approvals_required: int = 1
    created_at: dt.datetime
    expires_at: dt.datetime | None = None


class GateOutcome(BaseModel):
    """What one gate kind did with an approval or rejection of a run."""

    model_config = ConfigDict(frozen=True)

    kind: GateKind
    run_id: str
    decided: int = 0
    """Gates this decision resolved (released or rejected)."""
    recorded: int = 0
    """Approvals recorded on gates that still need more."""
    refused: str | None = None
    """Why the approver may not decide this kind's gates of the run (eligibility, self-approval, …)."""
    released_job_ids: list[str] = []
    """Jobs that may now be dispatched (the caller wakes the dispatcher for them)."""


class Gate(Protocol):
    kind: GateKind

    async def pending(
        self, conn: AsyncConnection, *, org_id: str, run_id: str | None = None
    ) -> list[PendingGate]: ...

    async def approve(
        self, conn: AsyncConnection, run_id: str, approver: Approver, *, now: dt.datetime
    ) -> GateOutcome: ...

    async def reject(
        self, conn: AsyncConnection, run_id: str, approver: Approver, reason: str | None, *, now: dt.datetime
    ) -> GateOutcome: ...
