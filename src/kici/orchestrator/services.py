"""The orchestrator's background services, assembled per app and run by its lifespan: log storage, the
dispatcher (which listens to agent sessions and to new runs), the sweeps, the git poller, the scheduler and
the reporting worker (GitHub check runs, notifications)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kici.orchestrator.agents.registry import AgentRegistry
from kici.orchestrator.db.database import Database
from kici.orchestrator.logs import log_event
from kici.orchestrator.storage.blobs import BlobStore, blob_store_from_settings
from kici.orchestrator.storage.logs import LogStore, default_log_root

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kici.orchestrator.app import Readiness
    from kici.orchestrator.dispatch.dispatcher import Dispatcher
    from kici.orchestrator.dispatch.sweeps import Sweeper
    from kici.orchestrator.holds.service import HeldService
    from kici.orchestrator.ingest.poller import GitPoller
    from kici.orchestrator.reporting.worker import ReportWorker
    from kici.orchestrator.scheduling.scheduler import Scheduler


STOP_TIMEOUT_S = 3.0


@dataclass
class Services:
    logs: LogStore
    """Job logs: chunks in the database, sealed into segment blobs in `blobs` (any orchestrator reads them)."""
    dispatcher: Dispatcher
    sweeper: Sweeper
    poller: GitPoller
    reporter: ReportWorker
    scheduler: Scheduler
    blobs: BlobStore
    """Artifacts (and later caches): `KICI_STORAGE_BACKEND`; checked at start-up by `server.serve`."""
    database: Database
    held: HeldService
    """Held runs and gated jobs (`kici-admin held …`): its gate list is where a gate kind is registered."""

    @classmethod
    def assemble(cls, app: FastAPI, registry: AgentRegistry) -> Services:
        from kici.orchestrator.dispatch.dispatcher import Dispatcher
        from kici.orchestrator.dispatch.metrics import DispatchMetrics
        from kici.orchestrator.dispatch.sweeps import Sweeper
        from kici.orchestrator.holds.environment import EnvironmentGate
        from kici.orchestrator.holds.service import HeldService
        from kici.orchestrator.holds.trust import TrustGate
        from kici.orchestrator.ingest.poller import GitPoller
        from kici.orchestrator.ingest.service import ingest_for
        from kici.orchestrator.reporting.metrics import ReportMetrics
        from kici.orchestrator.reporting.worker import ReportWorker
        from kici.orchestrator.scheduling.scheduler import Scheduler

        state = app.state.kici
        settings = state.settings
        blobs = blob_store_from_settings(settings)
        logs = LogStore(state.database, blobs, segment_bytes=settings.log_segment_bytes,
                        segment_max_age_s=settings.log_segment_max_age.total_seconds(),
                        legacy_root=default_log_root(settings.data_dir))
        ingest = ingest_for(app)
        dispatcher = Dispatcher(state, registry, ingest, logs, DispatchMetrics(state.metrics.registry))
        reporter = ReportWorker(state, ingest, logs, metrics=ReportMetrics(state.metrics.registry))
        dispatcher.report_wake = reporter.wake  # state changes written by this process are reported at once

        async def delete_run_data(run_id: str) -> None:
            await _delete_run_data(state.database, logs, blobs, run_id)

        async def evict_caches() -> int:
            from kici.orchestrator.caches import evict_unused

            return await evict_unused(state.database, blobs, state.settings.cache_max_age_delta)

        # trust holds first: a run's environment gates are created only once its trust hold is released
        held = HeldService(state.database, [TrustGate(dispatcher.limits), EnvironmentGate()], ingest,
                           wake_dispatcher=dispatcher.wake, wake_reporter=reporter.wake)
        return cls(logs=logs, dispatcher=dispatcher, sweeper=Sweeper(dispatcher, delete_run_data, evict_caches),
                   poller=GitPoller(state, ingest), reporter=reporter, scheduler=Scheduler(state, ingest),
                   blobs=blobs, database=state.database, held=held)

    async def start(self, readiness: Readiness) -> None:
        self.logs.start()
        await self.dispatcher.start(readiness)
        await self.sweeper.start(readiness)
        await self.poller.start(readiness)
        await self.scheduler.start(readiness)
        await self.reporter.start(readiness)

    async def delete_run_data(self, run_id: str) -> None:
        """Delete what a run keeps outside its database rows: its job logs, its artifacts and its test
        reports (rows and blobs). Whatever deletes runs (retention, an admin delete) calls this for each
        run it deletes."""
        await _delete_run_data(self.database, self.logs, self.blobs, run_id)

    async def stop(self) -> None:
        """Stop the background services, each within `STOP_TIMEOUT_S` (a stuck one is logged and left
        behind: the process is exiting, and a bounded shutdown matters more than a tidy one)."""
        for name, stop in (
            ("reporter", self.reporter.stop),
            ("scheduler", self.scheduler.stop),
            ("poller", self.poller.stop),
            ("sweeper", self.sweeper.stop),
            ("dispatcher", self.dispatcher.stop),
            ("logs", self.logs.close),
            ("blobs", self.blobs.close),
        ):
            started = time.monotonic()
            try:
                await asyncio.wait_for(stop(), STOP_TIMEOUT_S)
            except TimeoutError:
                log_event("services.stop_timeout", level="warning", service=name, timeout_s=STOP_TIMEOUT_S)
            except Exception as exc:
                log_event("services.stop_failed", level="error", service=name, error=f"{type(exc).__name__}: {exc}")
            else:
                elapsed = time.monotonic() - started
                if elapsed > 1.0:
                    log_event("services.stop_slow", level="warning", service=name, seconds=round(elapsed, 2))


def services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


async def _delete_run_data(database: Database, logs: LogStore, blobs: BlobStore, run_id: str) -> None:
    from kici.orchestrator.artifacts import delete_run_artifacts
    from kici.orchestrator.test_reports import delete_run_reports

    await logs.delete_run(run_id)
    await delete_run_artifacts(database, blobs, run_id)
    await delete_run_reports(database, blobs, run_id)
