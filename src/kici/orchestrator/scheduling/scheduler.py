"""The scheduler: fires due `schedule()` registrations as runs at the head of their branch.

Every `scheduler_interval_ms` it reads the registrations whose `next_fire_at` has passed (an indexed range
query; idle registrations cost nothing) and fires each one:

1. the branch head is resolved through the source (git or GitHub) and the lock file read there (cached);
2. in ONE transaction: `claim_fire` moves `next_fire_at` to the first slot after *now* only if it still
   holds the value read in step 0, and the run is created. Whoever loses that conditional update (another
   orchestrator on the same PostgreSQL, which waits for the winner's row lock and then sees the new value)
   creates nothing. A crash before the commit leaves the slot due, so it fires after the restart; after the
   commit it is never fired again.

A slot missed while no orchestrator was running fires once (late) and the next one is computed from now,
so a long downtime never produces a burst. The clock is injectable for tests.

Firing schedules is a leader duty: in a cluster only the leader ticks, and each fire's transaction passes
the leader fence (kici.orchestrator.cluster.leadership) before it writes.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter

from kici.engine.events import Event
from kici.engine.lockfile import LockFileError, ScheduleTrigger
from kici.orchestrator.background import PeriodicTask
from kici.orchestrator.cluster.leadership import FencedOut, Leadership
from kici.orchestrator.container import AppState, Readiness
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import ProviderError
from kici.orchestrator.scheduling.cron import next_fire
from kici.orchestrator.scheduling.registrations import open_provider, read_lock, register_from_lock
from kici.orchestrator.store import schedules as schedule_store
from kici.orchestrator.store.runs import NewRun, create_run
from kici.orchestrator.store.schedules import ScheduleRecord
from kici.orchestrator.store.sources import get_source

RETRY_AFTER_S = 60.0
"""A registration whose host could not be read is tried again after this long (not on every tick)."""
DUE_BATCH = 100


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ticks = Counter("kici_scheduler_ticks", "Scheduler ticks completed (each reads the due schedules).",
                             registry=registry)
        self.fired = Counter("kici_schedules_fired", "Schedule slots this orchestrator fired (runs created).",
                             registry=registry)
        self.failed = Counter("kici_schedule_fire_failures", "Fires that failed (host unreadable, …); retried.",
                              registry=registry)


class Scheduler:
    def __init__(
        self,
        state: AppState,
        ingest: Ingest,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        metrics: SchedulerMetrics | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.state = state
        self.leadership = leadership or Leadership()
        self.ingest = ingest
        self.clock = clock
        self.metrics = metrics or SchedulerMetrics(state.metrics.registry)
        self._retry_at: dict[str, float] = {}
        """Registration id → monotonic time before which a failing registration is not retried. A local
        back-off only: correctness lives in the database (another node may retry sooner, harmlessly)."""
        self._periodic = PeriodicTask("scheduler", state.settings.scheduler_interval_ms / 1000, self._leader_tick)

    async def start(self, readiness: Readiness) -> None:
        await self._periodic.start(readiness)

    async def stop(self) -> None:
        await self._periodic.stop()

    async def _leader_tick(self) -> None:
        if self.leadership.may_act():
            await self.tick()

    async def tick(self) -> list[str]:
        """Fire every due registration; the ids of the runs created."""
        now = self.clock()
        async with self.state.database.read() as conn:
            due = await schedule_store.due_schedules(conn, now=now, limit=DUE_BATCH)
        created: list[str] = []
        heads: dict[tuple[str, str, str], str | None] = {}
        for schedule in due:
            if self._retry_at.get(schedule.id, 0.0) > time.monotonic():
                continue
            try:
                run_id = await self.fire(schedule, now, heads=heads)
            except FencedOut:
                break  # deposed meanwhile: the new leader fires the rest
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ProviderError | LockFileError) else f"{type(exc).__name__}: {exc}"
                log_event("schedule.fire_failed", level="warning", schedule_id=schedule.id,
                          workflow=schedule.workflow, repo=schedule.repo, error=reason, retry_in_s=RETRY_AFTER_S)
                self._retry_at[schedule.id] = time.monotonic() + RETRY_AFTER_S
                self.metrics.failed.inc()
                continue
            self._retry_at.pop(schedule.id, None)
            if run_id is not None:
                created.append(run_id)
        self.metrics.fired.inc(len(created))
        self.metrics.ticks.inc()
        if created:
            await self.ingest.runs_created(created)
        return created

    async def fire(
        self,
        schedule: ScheduleRecord,
        now: dt.datetime,
        *,
        heads: dict[tuple[str, str, str], str | None] | None = None,
    ) -> str | None:
        """Fire one due registration: the run id, or None when nothing was created (another orchestrator
        fired it, the source is gone or disabled, the workflow no longer has the trigger). `heads` shares
        branch heads between the fires of one tick (many nightly jobs of one repository fire together)."""
        seen = schedule.next_fire_at
        next_at = next_fire(schedule.cron, schedule.timezone, max(now, seen))
        async with self.state.database.read() as conn:
            source = await get_source(conn, schedule.source_id)
        if source is None or not source.enabled:
            await self._skip(schedule, next_at, "the source is disabled")
            return None
        async with open_provider(self.state, self.ingest, source) as provider:
            key = (source.id, schedule.repo, schedule.branch)
            if heads is not None and key in heads:
                sha = heads[key]
            else:
                sha = await provider.resolve_ref(schedule.repo, schedule.branch)
                if heads is not None:
                    heads[key] = sha
            if sha is None:
                await self._skip(schedule, next_at, f"branch {schedule.branch!r} not found")
                return None
            lock = await read_lock(self.ingest, provider, schedule.repo, sha)
        workflow = lock.workflow(schedule.workflow) if lock is not None else None
        trigger = (
            workflow.triggers[schedule.trigger_index]
            if workflow is not None and schedule.trigger_index < len(workflow.triggers) else None
        )
        if (
            lock is None or workflow is None or not isinstance(trigger, ScheduleTrigger)
            or (trigger.cron_expression, trigger.timezone) != (schedule.cron, schedule.timezone)
        ):
            # the branch moved on without a push being seen (no hook, say): the head's lock file rules
            await register_from_lock(self.state, source=source, repo=schedule.repo, branch=schedule.branch,
                                     sha=sha, lock=lock)
            return None
        inputs = dict(trigger.inputs or {})
        event = Event(
            type="schedule",
            name=schedule.cron,  # how the engine's matcher tells one schedule trigger from another
            branch=schedule.branch,
            target_branch=schedule.branch,
            default_branch=schedule.branch,
            ref=f"refs/heads/{schedule.branch}",
            sha=sha,
            repo=schedule.repo,
            inputs=inputs,
            payload={
                "schedule": schedule.cron,
                "timezone": schedule.timezone,
                "scheduled_at": seen.isoformat(),
                "fired_at": now.isoformat(),
            },
        )
        settings = self.state.settings
        async with self.state.database.transaction() as conn:
            await self.leadership.fence(conn, "schedule.fire")
            if not await schedule_store.claim_fire(conn, schedule.id, seen=seen, slot=seen, next_at=next_at):
                return None  # fired by another orchestrator meanwhile
            created = await create_run(
                conn,
                NewRun(
                    org_id=schedule.org_id, workflow=workflow, event=event, repo=schedule.repo,
                    ref=event.ref, sha=sha, lock_content_hash=lock.content_hash, delivery_id=None,
                    source_id=source.id,
                ),
                queue_max_depth=settings.queue_max_depth,
                queue_timeout_ms=settings.queue_timeout_ms,
            )
            await schedule_store.set_last_run(conn, schedule.id, created.run_id)
        log_event("schedule.fired", schedule_id=schedule.id, workflow=schedule.workflow, repo=schedule.repo,
                  cron=schedule.cron, timezone=schedule.timezone, slot=seen.isoformat(), run_id=created.run_id,
                  sha=sha[:12], late_s=round((now - seen).total_seconds(), 3), next_fire_at=next_at.isoformat())
        return created.run_id

    async def _skip(self, schedule: ScheduleRecord, next_at: dt.datetime, reason: str) -> None:
        async with self.state.database.transaction() as conn:
            await self.leadership.fence(conn, "schedule.skip")
            skipped = await schedule_store.postpone(conn, schedule.id, seen=schedule.next_fire_at, next_at=next_at)
        if skipped:
            log_event("schedule.skipped", level="warning", schedule_id=schedule.id, workflow=schedule.workflow,
                      repo=schedule.repo, slot=schedule.next_fire_at.isoformat(), reason=reason)
