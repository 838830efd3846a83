"""Linked reruns: a run's workflow again at the same commit with the same event (`original_run_id` points
at the first run of the chain). Used by `POST /api/v1/admin/runs/{id}/rerun` and by GitHub's "Re-run"
buttons (`check_run` / `check_suite` `rerequested` deliveries).

A rerun keeps the trust of the run it repeats: a rerun of a run its trust policy held (rejected, expired,
or still held) is held again, for a new decision; a rerun of an approved run is approved (the approval
was for this very commit), with the same access to secrets."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.events import Event
from kici.engine.lockfile import Workflow
from kici.engine.states import RunTrust
from kici.orchestrator.config import Settings
from kici.orchestrator.holds.policy import TrustPolicy, policy_of
from kici.orchestrator.reporting.targets import reporting_targets
from kici.orchestrator.store import runs
from kici.orchestrator.store.runs import RunRecord
from kici.orchestrator.store.sources import get_source


class RerunRefused(Exception):
    """The run cannot be rerun (the message says why)."""


@dataclass(frozen=True)
class Rerun:
    run: RunRecord
    superseded: list[runs.Superseded]
    """Older runs of its concurrency group it cancelled (`cancel_in_progress`): their agents are told
    after the commit (`Dispatcher.cancel_superseded`)."""


async def rerun(conn: AsyncConnection, settings: Settings, original: RunRecord) -> Rerun:
    """Create the rerun in the caller's transaction (reported like a new run of its source, to today's
    targets); `RerunRefused` for a run that never had jobs or whose workflow cannot be planned."""
    if not original.workflow_spec:
        raise RerunRefused(
            f"run {original.id} failed before it had jobs ({original.failure_reason}); push a fix instead"
        )
    event = Event.model_validate(original.event)
    source = await get_source(conn, original.source_id) if original.source_id else None
    held = original.trust == RunTrust.UNTRUSTED.value and original.hold_reason is not None
    policy = policy_of(source.config) if source is not None else TrustPolicy()
    try:
        created = await runs.create_run(
            conn,
            runs.NewRun(
                org_id=original.org_id,
                workflow=Workflow.model_validate(original.workflow_spec),
                event=event,
                repo=original.repo,
                ref=original.ref,
                sha=original.sha,
                lock_content_hash=original.lock_content_hash,
                delivery_id=None,
                source_id=original.source_id,
                original_run_id=original.original_run_id or original.id,
                reporting=reporting_targets(settings, source, event),
                trust=original.trust,
                secrets_allowed=original.secrets_allowed,
                hold_reason=original.hold_reason if held else None,
                hold_expiry=policy.expiry(settings.hold_expiry_hours) if held else None,
            ),
            queue_max_depth=settings.queue_max_depth,
            queue_timeout_ms=settings.queue_timeout_ms,
        )
    except ValueError as exc:
        raise RerunRefused(f"run {original.id} cannot be rerun: {exc}") from None
    found = await runs.get_run(conn, created.run_id)
    assert found is not None
    return Rerun(found, list(created.superseded))
