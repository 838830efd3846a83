"""Periodic sweeps: stale jobs, dispatch-ack deadlines, queue expiry, recovery windows, workflow
timeouts and the dedup cache. One tick every `sweep_interval_ms` (and once right after start-up).

Sweeps and retention are leader duties (kici.orchestrator.cluster.leadership): in a cluster only the node
holding the leader lease runs them, and each sweep's transaction passes the leader fence (its term checked
against the lease row) before it writes, so a deposed leader's late tick changes nothing. Each sweep runs in
its own transaction, which on PostgreSQL also takes a transaction-scoped advisory lock
(`pg_try_advisory_xact_lock`) named after the sweep and skips the tick when another session holds it
(e.g. an orchestrator of an older version during an upgrade); SQLite has a single writer anyway.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from functools import partial

from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.protocol import CloseCode
from kici.orchestrator.background import PeriodicTask
from kici.orchestrator.cluster.leadership import FencedOut, Leadership
from kici.orchestrator.container import Readiness
from kici.orchestrator.db.schema import AuditOutcome, ConcurrencyScope, utcnow
from kici.orchestrator.dispatch.dispatcher import Dispatcher
from kici.orchestrator.holds.environment import release_due_timers
from kici.orchestrator.logs import log_event
from kici.orchestrator.retention import RunDataDeleter, prune, prune_summary
from kici.orchestrator.store import audit as audit_store
from kici.orchestrator.store import concurrency as concurrency_store
from kici.orchestrator.store import events as event_store
from kici.orchestrator.store import queue as queue_store
from kici.orchestrator.store import runs as run_store

WORKFLOW_TIMEOUT = "workflow_timeout"


class Sweeper:
    def __init__(
        self, dispatcher: Dispatcher, delete_run_data: RunDataDeleter,
        evict_caches: Callable[[], Awaitable[int]] | None = None, leadership: Leadership | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.leadership = leadership or Leadership()
        self.delete_run_data = delete_run_data
        """What retention calls for each run it deletes (its logs, artifacts and test reports)."""
        self.evict_caches = evict_caches
        """What retention calls to evict caches unused for `KICI_CACHE_MAX_AGE` (kici.orchestrator.caches)."""
        self.db = dispatcher.db
        self.settings = dispatcher.settings
        self.metrics = dispatcher.metrics
        self.started_at = utcnow()
        """When this orchestrator started sweeping (reset at the first tick, after migrations and start-up):
        stale clocks count from no earlier (`find_stale_jobs`)."""
        self._ticked = False
        self._after_commit: list[Callable[[], Awaitable[object]]] = []
        """Messages to agents decided by the running sweep, sent once its transaction has committed."""
        self._periodic = PeriodicTask("sweeper", self.settings.sweep_interval_ms / 1000, self.tick)
        # retention has its own (long) interval; its first pass waits one interval rather than running at
        # start-up, so a restart loop cannot turn into a delete loop
        self._retention = PeriodicTask("retention", self.settings.retention_interval_seconds, self.retention)
        self._retention_armed = False

    async def start(self, readiness: Readiness) -> None:
        await self._periodic.start(readiness)
        await self._retention.start(readiness)

    async def stop(self) -> None:
        await self._retention.stop()
        await self._periodic.stop()

    async def retention(self) -> None:
        """One retention pass (kici.orchestrator.retention); an audit row names `system` as the actor."""
        if not self._retention_armed:
            self._retention_armed = True
            return
        if not self.leadership.may_act():
            return
        if self.evict_caches is not None:
            try:
                await self.evict_caches()
            except Exception as exc:  # storage down: the next pass tries again; pruning runs still goes on
                log_event("retention.cache_eviction_failed", level="error", error=f"{type(exc).__name__}: {exc}")
        try:
            result = await prune(self.db, self.delete_run_data, self.settings,
                                 fence=partial(self.leadership.fence, action="retention"))
        except FencedOut:
            return
        if result.counts.total:
            async with self.db.transaction() as conn:
                await audit_store.record(
                    conn, action="retention.prune", outcome=AuditOutcome.ALLOWED, actor="system",
                    target="data:retention", reason=prune_summary(result),
                )

    async def tick(self) -> None:
        """Run every sweep once (on the leader); a failing sweep is logged and does not stop the others."""
        if not self.leadership.may_act():
            return
        if not self._ticked:
            self._ticked = True
            self.started_at = utcnow()
        for name, sweep in (
            ("ack_deadlines", self.ack_deadlines),
            ("stale_jobs", self.stale_jobs),
            ("queue_expiry", self.queue_expiry),
            ("recovery_windows", self.recovery_windows),
            ("workflow_timeouts", self.workflow_timeouts),
            ("hold_expiry", self.hold_expiry),
            ("concurrency", self.concurrency),
            ("environment_timers", self.environment_timers),
            ("dedup_cache", self.dedup_cache),
            ("queue_depth", self.queue_depth),
        ):
            try:
                await self._locked(name, sweep)
            except FencedOut:
                return  # deposed meanwhile: the new leader sweeps
            except Exception as exc:
                log_event("sweep.failed", level="error", sweep=name, error=f"{type(exc).__name__}: {exc}")

    async def _locked(self, name: str, sweep: Callable[[AsyncConnection], Awaitable[None]]) -> None:
        self._after_commit = []
        async with self.db.transaction() as conn:
            if not await self.db.try_lock(conn, f"sweep:{name}"):
                return  # another orchestrator runs this sweep now
            await self.leadership.fence(conn, f"sweep:{name}")
            await sweep(conn)
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            await action()

    def _later(self, action: Callable[[], Awaitable[object]]) -> None:
        self._after_commit.append(action)

    # -- the sweeps -------------------------------------------------------------------------------

    async def ack_deadlines(self, conn: AsyncConnection) -> None:
        """Dispatches not acknowledged in time: requeued (or failed after the last attempt), then their
        agents are closed with 4031 — after the requeue, so the disconnect does not hold the job."""
        now = utcnow()
        expired = await queue_store.find_expired_acks(conn, now=now)
        if not expired:
            return
        for agent_id in {agent for _, agent in expired}:
            self.dispatcher.retire(agent_id)  # about to be closed: give it nothing more meanwhile
        requeued, failed = await queue_store.requeue_expired_acks(
            conn, now=now, max_attempts=self.settings.dispatch_max_attempts, limits=self.dispatcher.limits
        )
        self.metrics.jobs_swept.labels("ack_timeout").inc(len(requeued))
        self.metrics.jobs_swept.labels("ack_failed").inc(len(failed))
        self.dispatcher.forget(requeued + failed)
        log_event("sweep.ack_timeouts", level="warning", requeued=requeued, failed=failed,
                  agents=sorted({agent for _, agent in expired}))
        for agent_id in sorted({agent for _, agent in expired}):
            self._later(partial(self.dispatcher.close_agent, agent_id, CloseCode.DISPATCH_ACK_TIMEOUT,
                                "dispatch not acknowledged in time"))

    async def stale_jobs(self, conn: AsyncConnection) -> None:
        threshold = self.settings.heartbeat_stale_after_ms
        found = await run_store.find_stale_jobs(
            conn, now=utcnow(), stale_after_ms=threshold, clock_floor=self.started_at,
            node_lease=dt.timedelta(seconds=self.settings.node_lease_seconds),
        )
        marked: list[str] = []
        for job_id in found:
            job = await run_store.get_job(conn, job_id)
            agent = f" from agent {job.agent_id}" if job is not None and job.agent_id else ""
            reason = f"no heartbeat{agent} for {threshold / 1000:g} s: the agent is presumed lost"
            if await run_store.mark_job_stale(conn, job_id, reason, limits=self.dispatcher.limits):
                marked.append(job_id)
                if job is not None and job.agent_id:
                    # an agent that is alive but silent must not keep running a job the run gave up on
                    self._later(partial(self.dispatcher.send_cancel, job.agent_id, job.run_id, job_id,
                                        reason="stale", force=True))
        if marked:
            self.metrics.jobs_swept.labels("stale").inc(len(marked))
            self.dispatcher.forget(marked)
            log_event("sweep.stale_jobs", level="warning", jobs=marked, threshold_ms=threshold)

    async def queue_expiry(self, conn: AsyncConnection) -> None:
        expired = await queue_store.expire_queue(conn, now=utcnow(), limits=self.dispatcher.limits)
        if expired:
            self.metrics.jobs_swept.labels("queue_timeout").inc(len(expired))
            log_event("sweep.queue_expired", level="warning", jobs=expired)

    async def recovery_windows(self, conn: AsyncConnection) -> None:
        failed, requeued = await queue_store.settle_unrecovered(conn, now=utcnow(), limits=self.dispatcher.limits)
        if failed:
            self.metrics.jobs_swept.labels("recovery_timeout").inc(len(failed))
            log_event("sweep.recovery_timeouts", level="warning", jobs=failed)
        if requeued:
            log_event("sweep.recovery_requeued", jobs=requeued, reason="never started by the lost agent")
        if failed or requeued:
            self.dispatcher.forget([*failed, *requeued])

    async def workflow_timeouts(self, conn: AsyncConnection) -> None:
        for run_id in await run_store.find_overdue_runs(conn, now=utcnow()):
            run = await run_store.get_run(conn, run_id)
            limit = f" of {run.timeout_ms / 1000:g} s" if run is not None and run.timeout_ms else ""
            try:
                result = await run_store.cancel_run(
                    conn, run_id, by=WORKFLOW_TIMEOUT, force=False, reason=f"workflow timeout{limit} exceeded"
                )
            except (run_store.RunNotFound, run_store.RunFinished):
                continue
            log_event("sweep.workflow_timeout", level="warning", run_id=run_id, status=result.status)
            self._later(partial(self.dispatcher.cancel_jobs, run_id, result.running, reason=WORKFLOW_TIMEOUT,
                                force=False))

    async def hold_expiry(self, conn: AsyncConnection) -> None:
        """Held runs nobody decided in time: cancelled through `EXPIRE` ("hold expired after 72h"), in
        bounded batches (the next tick takes the rest)."""
        from kici.orchestrator.holds.trust import expire_hold

        now = utcnow()
        expired = [run_id for run_id in await run_store.find_expired_holds(conn, now=now)
                   if await expire_hold(conn, run_id, now=now)]
        if expired:
            log_event("sweep.holds_expired", runs=expired)
            self._later(self._report_wake)

    async def _report_wake(self) -> None:
        self.dispatcher.report_wake()

    async def concurrency(self, conn: AsyncConnection) -> None:
        """Concurrency groups with a member waiting for more than a tick and a free place: admit it. A
        release admits the next member itself in its own transaction; this only catches a member whose
        run another transaction held at that moment (it is never waited for, see `store.concurrency`)."""
        older_than = utcnow() - dt.timedelta(milliseconds=self.settings.sweep_interval_ms)
        admitted = 0
        for org_id, scope, group_id in await concurrency_store.groups_with_waiters(conn, older_than=older_than):
            await concurrency_store.serialize(conn, org_id)
            group = await concurrency_store.get_group(conn, group_id)
            if group is None:
                continue
            if scope == ConcurrencyScope.RUN.value:
                admitted += len(await run_store.admit_runs(conn, group, limits=self.dispatcher.limits))
            else:
                admitted += await run_store.admit_waiting_jobs(conn, group, limits=self.dispatcher.limits)
        if admitted:
            log_event("sweep.concurrency_admitted", level="warning", admitted=admitted)
            self._later(partial(self.dispatcher.runs_created, []))

    async def environment_timers(self, conn: AsyncConnection) -> None:
        """Jobs whose deployment environment's wait timer ran out pass their gate and are queued (or wait
        for the deployment in progress); the timer's precision is this sweep's interval."""
        queued = await release_due_timers(conn, now=utcnow())
        if queued:
            self._later(partial(self.dispatcher.runs_created, []))

    async def dedup_cache(self, conn: AsyncConnection) -> None:
        await event_store.purge_expired_dedup(conn)

    async def queue_depth(self, conn: AsyncConnection) -> None:
        self.metrics.queue_depth.set(await run_store.queue_depth(conn))
