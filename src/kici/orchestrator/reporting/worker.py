"""The reporting worker: claims due outbox keys, sends them, records the outcome.

One pass (`run_once`): read the due heads of ordering keys, lease them with conditional UPDATEs (so any
number of orchestrators share the outbox and each key is sent by one of them at a time, in order), send
up to `KICI_REPORT_CONCURRENCY` at once, then mark each key's rows sent, due again later (exponential
back-off with jitter, or the rate limit's reset), or failed (a final answer, or still failing
`KICI_REPORT_GIVE_UP_AFTER_MS` after the first failure). The loop runs passes while there is work, and
otherwise sleeps until woken (a state change in this process), the next retry is due, or
`KICI_REPORT_POLL_MS` passes (rows written by another orchestrator).

Sending reports is a leader duty: in a cluster only the leader claims keys, each claim's transaction (and
the pruning of sent reports) passes the leader fence (kici.orchestrator.cluster.leadership), and other
nodes wake the leader through the cluster bus (`reports.wake`). The outcome of a send that already went
out is recorded even by a leader deposed meanwhile: the send cannot be undone, and recording it is what
keeps the new leader from sending it a second time (the key's lease makes that write safe on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from kici.engine import aio
from kici.orchestrator.cluster.leadership import FencedOut, Leadership
from kici.orchestrator.container import AppState, Readiness
from kici.orchestrator.db.schema import ReportKind, utcnow
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.reporting.github_checks import CheckRunSender
from kici.orchestrator.reporting.metrics import ReportMetrics
from kici.orchestrator.reporting.notifications import NotificationSender
from kici.orchestrator.reporting.outcome import Outcome
from kici.orchestrator.storage.logs import LogStore
from kici.orchestrator.store import outbox
from kici.orchestrator.store.outbox import ReportRecord

PRUNE_INTERVAL_S = 600.0
"""How often sent reports past `KICI_REPORT_RETENTION_HOURS` are deleted (by any orchestrator: a DELETE of
rows nobody else changes is harmless to repeat)."""

PENDING_COUNT_INTERVAL_S = 10.0
"""How often `kici_reports_pending` is refreshed."""

LEASE = dt.timedelta(seconds=120)
"""A claimed key's lease: longer than any one send (HTTP timeouts are 10–30 s), short enough that a
crashed orchestrator's keys are taken over soon."""


def backoff(attempts: int, base_ms: int, max_ms: int, *, rng: Callable[[], float] = random.random) -> dt.timedelta:
    """The delay before attempt `attempts + 1`: base * 2^attempts, capped, with jitter (50 to 100 %)."""
    delay = min(max_ms, base_ms * (2 ** min(attempts, 30)))
    return dt.timedelta(milliseconds=delay * (0.5 + rng() / 2))


class ReportWorker:
    def __init__(
        self,
        state: AppState,
        ingest: Ingest,
        logs: LogStore,
        *,
        client_factory: Callable[[], httpx.AsyncClient] = httpx.AsyncClient,
        metrics: ReportMetrics | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.state = state
        self.leadership = leadership or Leadership()
        self.settings = state.settings
        self.ingest = ingest
        self.logs = logs
        self.client_factory = client_factory
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._pruned_at = 0.0
        self.metrics = metrics
        self._counted_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, readiness: Readiness) -> None:
        self._task = asyncio.create_task(self._loop(readiness), name="kici-reporting")

    async def stop(self) -> None:
        if self._task is not None:
            await aio.cancel_and_wait(self._task)
            self._task = None
        await self.close()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def wake(self) -> None:
        """Something was written to the outbox: look now instead of at the next poll."""
        self._wake.set()

    async def _loop(self, readiness: Readiness) -> None:
        while not readiness.prepared:
            await asyncio.sleep(0.05)
        poll = self.settings.report_poll_ms / 1000
        concurrency = self.settings.report_concurrency
        in_flight: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            self._wake.set()  # a slot is free, and the key's next row may be due

        try:
            while True:
                self._wake.clear()
                if self.metrics is not None and time.monotonic() - self._counted_at > PENDING_COUNT_INTERVAL_S:
                    self._counted_at = time.monotonic()
                    with contextlib.suppress(Exception):
                        async with self.state.database.read() as conn:
                            pending = await outbox.count_pending(conn)
                        self.metrics.pending.set(pending)
                leading = self.leadership.may_act()
                if leading and time.monotonic() - self._pruned_at > PRUNE_INTERVAL_S:
                    self._pruned_at = time.monotonic()
                    try:
                        await self.prune()
                    except FencedOut:
                        pass
                    except Exception as exc:
                        log_event("reporting.prune_failed", level="error", error=f"{type(exc).__name__}: {exc}")
                claimed: list[ReportRecord] = []
                if leading and len(in_flight) < concurrency:
                    try:
                        claimed = await self._claim(concurrency - len(in_flight))
                    except FencedOut:
                        claimed = []
                    except Exception as exc:  # the database is away, say: try again at the next poll
                        log_event("reporting.pass_failed", level="error", error=f"{type(exc).__name__}: {exc}")
                # a pipeline, not batches: a report that becomes due is claimed as soon as a slot is free,
                # without waiting for slow sends of the same pass
                for head in claimed:
                    task = asyncio.create_task(self._handle(head), name=f"kici-report-{head.id}")
                    in_flight.add(task)
                    task.add_done_callback(done)
                if claimed and len(in_flight) < concurrency:
                    continue
                # a node that is not the leader has nothing to claim: it waits the whole poll (or a wake-up)
                await self._sleep(poll, busy=bool(in_flight) or not leading)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _sleep(self, poll: float, *, busy: bool) -> None:
        """Until woken, the next retry is due, or `poll` passes (rows written by another process)."""
        timeout = poll
        if not busy:
            with contextlib.suppress(Exception):
                async with self.state.database.read() as conn:
                    due = await outbox.next_due(conn)
                if due is not None:
                    timeout = min(poll, max(0.0, (due - utcnow()).total_seconds()) + 0.001)
        with contextlib.suppress(TimeoutError):
            await aio.wait_for(self._wake.wait(), timeout)

    # -- one pass --------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    async def _claim(self, limit: int) -> list[ReportRecord]:
        """Lease up to `limit` due keys (their heads)."""
        db = self.state.database
        now = utcnow()
        async with db.read() as conn:
            heads = await outbox.claimable_heads(conn, now=now, limit=limit)
        if not heads:
            return []
        claimed: list[ReportRecord] = []
        async with db.transaction() as conn:
            await self.leadership.fence(conn, "reports.claim")
            for head in heads:
                if await outbox.claim(conn, head.id, worker=self.worker_id, now=now, lease=LEASE):
                    claimed.append(head)
        return claimed

    async def prune(self) -> int:
        """Delete sent reports older than the retention; how many."""
        cutoff = utcnow() - dt.timedelta(hours=self.settings.report_retention_hours)
        total = 0
        while True:
            async with self.state.database.transaction() as conn:
                await self.leadership.fence(conn, "reports.prune")
                deleted = await outbox.delete_sent_before(conn, cutoff)
            total += deleted
            if deleted < 1000:
                break
        if total:
            log_event("reporting.pruned", reports=total)
        return total

    async def run_once(self) -> int:
        """Claim what is due now and send it (all of it before returning); how many keys were handled."""
        claimed = await self._claim(self.settings.report_concurrency)
        await asyncio.gather(*(self._handle(h) for h in claimed))
        return len(claimed)

    async def _handle(self, head: ReportRecord) -> None:
        db = self.state.database
        if head.kind == ReportKind.CHECK_RUN.value:
            # compaction: the job's current state covers every pending update of its check run
            async with db.read() as conn:
                group = [r.id for r in await outbox.pending_of_key(conn, head.ordering_key) if r.id >= head.id]
        else:
            group = [head.id]
        client = self._http()
        started = time.monotonic()
        try:
            if head.kind == ReportKind.CHECK_RUN.value:
                outcome = await CheckRunSender(self.state, self.ingest, self.logs, client).send(head, utcnow())
            else:
                outcome = await NotificationSender(self.state, self.ingest, client).send(head, utcnow())
        except Exception as exc:  # a bug or a database hiccup: retry like a failed send, keep the loop alive
            outcome = Outcome.retry(f"internal error: {type(exc).__name__}: {exc}")
        if self.metrics is not None:
            self.metrics.send_seconds.labels(head.kind).observe(time.monotonic() - started)
        try:
            await self._record(head, group, outcome)
        except Exception as exc:  # the database went away: the lease runs out and the key is sent again
            log_event("reporting.record_failed", level="error", report_id=head.id, outcome=outcome.kind,
                      error=f"{type(exc).__name__}: {exc}")

    async def _record(self, head: ReportRecord, group: list[int], outcome: Outcome) -> None:
        now = utcnow()
        fields: dict[str, Any] = {"report_id": head.id, "kind": head.kind, "report_event": head.event,
                                  "run_id": head.run_id, "job_id": head.job_id}
        async with self.state.database.transaction() as conn:
            if outcome.kind == "sent":
                await outbox.mark_sent(conn, group, now=now)
                if self.metrics is not None:
                    self.metrics.sent.labels(head.kind).inc()
                return
            error = outcome.error or "unknown error"
            give_up = dt.timedelta(milliseconds=self.settings.report_give_up_after_ms)
            give_up_at = (head.first_failed_at or now) + give_up
            if outcome.kind == "failed" or now >= give_up_at:
                await outbox.mark_failed(conn, group, error=error)
                if self.metrics is not None:
                    self.metrics.failed.labels(head.kind).inc()
                log_event("reporting.failed", level="error", error=error, attempts=head.attempts + 1, **fields)
                return
            retry_at = outcome.retry_at or now + backoff(
                head.attempts, self.settings.report_retry_base_ms, self.settings.report_retry_max_ms
            )
            await outbox.mark_retry(conn, group, error=error, next_attempt_at=retry_at, now=now)
            if self.metrics is not None:
                self.metrics.retries.labels(head.kind).inc()
        log_event("reporting.retry", level="warning", error=error, attempts=head.attempts + 1,
                  retry_at=retry_at.isoformat(), **fields)
