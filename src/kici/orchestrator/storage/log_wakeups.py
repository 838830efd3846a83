"""Cross-node wake-ups for job-log followers: which jobs' logs this node just stored, told to the others.

A follower (`kici-admin runs logs --follow` through the admin API's `wait`, the dashboard's live log) may
be served by another node than the one the job's agent writes through. After each write of log chunks
the writing node publishes `job-log` `{"job_ids": [...]}` on the cluster bus (non-durable: a lost one is
covered by the followers' own poll, `KICI_LOG_FOLLOW_POLL_MS`); every other node calls
`LogStore.notify_appended` for those jobs, which wakes its followers at once.

Coalesced so that a fast log does not flood PostgreSQL: the first write after a quiet spell is told at
once, then at most one message per `COALESCE_S` carries every job written meanwhile (one NOTIFY for many
jobs, split only when the ids would not fit in one NOTIFY payload).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from prometheus_client import Counter

from kici.engine import aio
from kici.orchestrator.cluster.bus import NOTIFY_MAX_BYTES, ClusterBus
from kici.orchestrator.logs import log_event

LOG_APPENDED_TOPIC = "job-log"
COALESCE_S = 0.05
"""At most one message per this many seconds (per node, for all its jobs)."""
_BATCH_BYTES = NOTIFY_MAX_BYTES - 200
"""Room for the ids in one NOTIFY, leaving some for the bus's envelope (origin, topic)."""


class LogWakeups:
    def __init__(self, bus: ClusterBus, *, interval: float = COALESCE_S, published: Counter | None = None) -> None:
        self.bus = bus
        self.interval = interval
        self.published = published
        """Counts the messages published (what coalescing saved shows against `kici_log_lines_stored`)."""
        self._jobs: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def appended(self, job_ids: Iterable[str]) -> None:
        """Chunks of these jobs were just committed (called by the log store after each write)."""
        # only PostgreSQL carries messages to other nodes, and with no live peer there is nobody to tell
        if self._stopped or not self.bus.database.is_postgresql or self.bus.peers == 0:
            return
        self._jobs.update(job_ids)
        if self._jobs and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._send(), name="kici-log-wakeups")

    async def _send(self) -> None:
        while self._jobs:
            jobs, self._jobs = sorted(self._jobs), set()
            for batch in _batches(jobs):
                try:
                    await self.bus.publish(LOG_APPENDED_TOPIC, {"job_ids": batch}, durable=False, local=False)
                    if self.published is not None:
                        self.published.inc()
                except Exception as exc:  # followers elsewhere see the lines at their next poll
                    log_event("logs.wakeup_publish_failed", level="warning", jobs=len(batch),
                              error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        self._stopped = True
        await aio.cancel_and_wait(self._task)
        self._task = None


def _batches(job_ids: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for job_id in job_ids:
        cost = len(json.dumps(job_id)) + 1
        if current and size + cost > _BATCH_BYTES:
            out.append(current)
            current, size = [], 0
        current.append(job_id)
        size += cost
    if current:
        out.append(current)
    return out
