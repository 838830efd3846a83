"""Retention: finished runs (with their jobs, steps, queue and report rows, and their log files), event log
entries and audit entries older than their configured age are deleted — by the background sweep every
`retention_interval_seconds`, or on demand (`kici-admin prune`, `POST /api/v1/admin/prune`).

Deletion goes in batches of `retention_batch_size` rows, each its own transaction, so the sweep never holds
a long write lock (SQLite has one writer) and a crash loses at most one batch's progress. Each batch takes
the cluster-wide `retention` lock (a PostgreSQL advisory lock): while another orchestrator prunes, this one
stops and reports `complete: false`. A run's log files are removed after its rows' deletion committed: a
crash in between leaves a directory no run points at, never a run without its logs.

A dry run counts what a real prune would delete now, in one read transaction, and deletes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.config import Settings
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import audit_log, event_log, utcnow
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import retention as store

LOCK = "retention"


class PruneCounts(BaseModel):
    runs: int = Field(default=0, description="Finished runs (their steps, queue and report rows go with them)")
    jobs: int = Field(default=0, description="Jobs of those runs (their log files go with them)")
    events: int = Field(default=0, description="Event log entries")
    audit: int = Field(default=0, description="Audit log entries")

    @property
    def total(self) -> int:
        return self.runs + self.events + self.audit


class PruneCutoffs(BaseModel):
    """What is older than these goes; None: kept forever (the age setting is 0)."""

    runs: dt.datetime | None
    events: dt.datetime | None
    audit: dt.datetime | None


class PruneResult(BaseModel):
    dry_run: bool
    counts: PruneCounts = Field(description="Deleted (or, for a dry run, that would be deleted) per kind")
    cutoffs: PruneCutoffs
    batches: int = Field(description="Delete statements' transactions committed (0 for a dry run)")
    complete: bool = Field(description="False when another orchestrator was pruning and this one stopped")


def cutoffs(settings: Settings, now: dt.datetime) -> PruneCutoffs:
    def age(days: int) -> dt.datetime | None:
        return now - dt.timedelta(days=days) if days > 0 else None

    return PruneCutoffs(runs=age(settings.retention_runs_days), events=age(settings.retention_events_days),
                        audit=age(settings.retention_audit_days))


RunDataDeleter = Callable[[str], Awaitable[None]]
"""Deletes what a run keeps outside its rows (its logs, artifacts and test reports): `Services.delete_run_data`."""

Fence = Callable[[AsyncConnection], Awaitable[None]]
"""Checks, inside a batch's transaction, that the caller may still write (the leader fence); raises if not."""


async def prune(
    database: Database,
    delete_run_data: RunDataDeleter,
    settings: Settings,
    *,
    dry_run: bool = False,
    now: dt.datetime | None = None,
    batch_size: int | None = None,
    fence: Fence | None = None,
) -> PruneResult:
    """Delete what is past its retention (see the module docstring). `fence`, for the background sweep
    (a leader duty), runs in every batch's transaction before it deletes."""
    limits = cutoffs(settings, now or utcnow())
    if dry_run:
        return await _count(database, limits)
    batch = batch_size or settings.retention_batch_size
    counts = PruneCounts()
    batches = 0
    complete = True

    async def batches_of(step: str) -> bool:
        """Run batches of one kind until a short one; False when the lock was taken by someone else."""
        nonlocal batches
        while True:
            run_ids: list[str] = []
            job_count = 0
            async with database.transaction() as conn:
                if not await database.try_lock(conn, LOCK):
                    return False
                if fence is not None:
                    await fence(conn)
                if step == "runs":
                    assert limits.runs is not None
                    run_ids, job_count = await store.delete_runs(conn, limits.runs, batch)
                    deleted = len(run_ids)
                else:
                    table, cutoff = (event_log, limits.events) if step == "events" else (audit_log, limits.audit)
                    assert cutoff is not None
                    deleted = await store.delete_before(conn, table, cutoff, batch)
            if deleted:
                batches += 1
            if step == "runs":
                for run_id in run_ids:  # after the commit: the rows are gone, so nothing shows missing logs
                    await delete_run_data(run_id)
                counts.runs += deleted
                counts.jobs += job_count
            elif step == "events":
                counts.events += deleted
            else:
                counts.audit += deleted
            if deleted < batch:
                return True

    for step, cutoff in (("runs", limits.runs), ("events", limits.events), ("audit", limits.audit)):
        if cutoff is not None and not await batches_of(step):
            complete = False
            break
    if counts.total:
        log_event("retention.pruned", runs=counts.runs, jobs=counts.jobs, events=counts.events, audit=counts.audit,
                  batches=batches)
    return PruneResult(dry_run=False, counts=counts, cutoffs=limits, batches=batches, complete=complete)


async def _count(database: Database, limits: PruneCutoffs) -> PruneResult:
    counts = PruneCounts()
    async with database.read() as conn:
        if limits.runs is not None:
            counts.runs, counts.jobs = await store.count_runs(conn, limits.runs)
        if limits.events is not None:
            counts.events = await store.count_before(conn, event_log, limits.events)
        if limits.audit is not None:
            counts.audit = await store.count_before(conn, audit_log, limits.audit)
    return PruneResult(dry_run=True, counts=counts, cutoffs=limits, batches=0, complete=True)


def prune_summary(result: PruneResult) -> str:
    """One line for the audit row: what went and the cutoffs."""
    c, t = result.counts, result.cutoffs

    def at(value: dt.datetime | None) -> str:
        return value.isoformat(timespec="seconds") if value is not None else "kept"

    return (f"{'would delete' if result.dry_run else 'deleted'} {c.runs} runs ({c.jobs} jobs) finished before "
            f"{at(t.runs)}, {c.events} events before {at(t.events)}, {c.audit} audit entries before {at(t.audit)}"
            + ("" if result.complete else "; stopped: another orchestrator is pruning"))
