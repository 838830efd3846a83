"""The orchestrator's background services, assembled per app and run by its lifespan: the cluster node
(its lease, the leader lease, the cross-node bus), log storage, the dispatcher (which listens to agent
sessions and to new runs), the sweeps, the git poller, the scheduler and the reporting worker (GitHub check
runs, notifications). Sweeps, retention, the scheduler and the reporting worker are leader duties."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge
from starlette.applications import Starlette

from kici.engine import aio
from kici.engine import protocol as p
from kici.orchestrator.agents.registry import AgentRegistry
from kici.orchestrator.cluster.bus import ClusterBus
from kici.orchestrator.cluster.leadership import Leadership
from kici.orchestrator.container import services_of
from kici.orchestrator.db.database import Database
from kici.orchestrator.logs import log_event
from kici.orchestrator.storage.blobs import BlobStore
from kici.orchestrator.storage.log_wakeups import LOG_APPENDED_TOPIC, LogWakeups
from kici.orchestrator.storage.logs import LogStore, default_log_root

if TYPE_CHECKING:
    from kici.orchestrator.cluster.node import Node
    from kici.orchestrator.container import AppState, Readiness
    from kici.orchestrator.dispatch.dispatcher import Dispatcher
    from kici.orchestrator.dispatch.sweeps import Sweeper
    from kici.orchestrator.holds.service import HeldService
    from kici.orchestrator.ingest.intake import IngestService
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
    node: Node
    """This process as a cluster node (kici.orchestrator.cluster)."""
    bus: ClusterBus
    """Messages to every node: `publish(topic, payload)` / `subscribe(topic, handler)`."""
    leadership: Leadership
    log_wakeups: LogWakeups
    """Tells the other nodes whose logs this one stored (their followers wake at once)."""
    intake: IngestService
    """Deliveries into runs: the webhook routes' and the git poller's (`kici.orchestrator.ingest.intake`)."""

    @classmethod
    def assemble(cls, state: AppState, registry: AgentRegistry, blobs: BlobStore) -> Services:
        """The services of one app, wired to its container (called by the composition root only)."""
        from kici.orchestrator.cluster.node import Node
        from kici.orchestrator.dispatch.dispatcher import Dispatcher
        from kici.orchestrator.dispatch.metrics import DispatchMetrics
        from kici.orchestrator.dispatch.sweeps import Sweeper
        from kici.orchestrator.holds.environment import EnvironmentGate
        from kici.orchestrator.holds.service import HeldService
        from kici.orchestrator.holds.trust import TrustGate
        from kici.orchestrator.ingest.intake import IngestService
        from kici.orchestrator.ingest.poller import GitPoller
        from kici.orchestrator.reporting.metrics import ReportMetrics
        from kici.orchestrator.reporting.worker import ReportWorker
        from kici.orchestrator.scheduling.scheduler import Scheduler

        settings = state.settings
        logs = LogStore(state.database, blobs, segment_bytes=settings.log_segment_bytes,
                        segment_max_age_s=settings.log_segment_max_age.total_seconds(),
                        legacy_root=default_log_root(settings.data_dir))
        ingest = state.ingest
        leadership = Leadership()
        dispatcher = Dispatcher(state, registry, ingest, logs, DispatchMetrics(state.metrics.registry))
        reporter = ReportWorker(state, ingest, logs, metrics=ReportMetrics(state.metrics.registry),
                                leadership=leadership)
        node = Node(state, registry, leadership, ClusterBus(
            state.database, origin=f"{state.node_id}:{uuid.uuid4().hex[:12]}", poll_ms=state.settings.cluster_poll_ms
        ))
        bus = node.bus
        dispatcher.bus = bus
        metrics = state.metrics.registry
        Gauge("kici_log_followers_waiting", "Job-log followers (admin long polls, dashboard live logs) waiting "
              "for lines on this node.", registry=metrics).set_function(lambda: logs.waiting)
        log_wakeups = LogWakeups(bus, published=Counter(
            "kici_log_wakeups_published", "`job-log` wake-ups this node published for the other nodes' log "
            "followers (at most one per 50 ms, for every job written meanwhile).", registry=metrics))
        logs.on_written = log_wakeups.appended
        # state changes written by this process are reported at once: here, or by the leader when that is
        # another node
        dispatcher.report_wake = _ReportWake(reporter.wake, leadership, bus)
        _subscribe(bus, registry, dispatcher, reporter.wake, leadership)

        async def delete_run_data(run_id: str) -> None:
            await _delete_run_data(state.database, logs, blobs, run_id)

        async def evict_caches() -> int:
            from kici.orchestrator.caches import evict_unused

            return await evict_unused(state.database, blobs, state.settings.cache_max_age_delta)

        # trust holds first: a run's environment gates are created only once its trust hold is released
        held = HeldService(state.database, [TrustGate(dispatcher.limits), EnvironmentGate()], ingest,
                           wake_dispatcher=dispatcher.wake, wake_reporter=reporter.wake)
        sweeper = Sweeper(dispatcher, delete_run_data, evict_caches, leadership)
        intake = IngestService(state, ingest)
        return cls(logs=logs, dispatcher=dispatcher, sweeper=sweeper,
                   poller=GitPoller(state, intake), reporter=reporter,
                   scheduler=Scheduler(state, ingest, leadership=leadership), blobs=blobs, database=state.database,
                   held=held, node=node, bus=bus, leadership=leadership, log_wakeups=log_wakeups, intake=intake)

    async def start(self, readiness: Readiness) -> None:
        await self.node.start(readiness)  # first: it releases what a previous incarnation held
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
            ("log-wakeups", self.log_wakeups.stop),  # after the logs' last write, before the bus goes
            ("blobs", self.blobs.close),
            ("node", self.node.stop),  # last: the node leaves the cluster once its agents are released
        ):
            started = time.monotonic()
            try:
                await aio.wait_for(stop(), STOP_TIMEOUT_S)
            except TimeoutError:
                log_event("services.stop_timeout", level="warning", service=name, timeout_s=STOP_TIMEOUT_S)
            except Exception as exc:
                log_event("services.stop_failed", level="error", service=name, error=f"{type(exc).__name__}: {exc}")
            else:
                elapsed = time.monotonic() - started
                if elapsed > 1.0:
                    log_event("services.stop_slow", level="warning", service=name, seconds=round(elapsed, 2))


class _ReportWake:
    """The dispatcher's `report_wake`: the local reporting worker, and the leader's through the bus when
    this node is not the leader (one NOTIFY in flight at a time; the leader's poll covers a lost one)."""

    def __init__(self, local: Callable[[], None], leadership: Leadership, bus: ClusterBus) -> None:
        self.local = local
        self.leadership = leadership
        self.bus = bus
        self._task: asyncio.Task[None] | None = None

    def __call__(self) -> None:
        self.local()
        if not self.leadership.enabled or self.leadership.is_leader or self.bus.peers == 0:
            return
        if self._task is not None and not self._task.done():
            return

        async def publish() -> None:
            try:
                await self.bus.publish("reports.wake", {}, durable=False, local=False)
            except Exception as exc:
                log_event("reporting.cluster_wake_failed", level="warning", error=f"{type(exc).__name__}: {exc}")

        self._task = asyncio.create_task(publish())


def _subscribe(
    bus: ClusterBus, registry: AgentRegistry, dispatcher: Dispatcher, wake_reporter: Callable[[], None],
    leadership: Leadership,
) -> None:
    """What this node does with the other nodes' messages (topics: kici.orchestrator.cluster.bus)."""

    async def cancel(_topic: str, payload: dict[str, Any]) -> None:
        agent_id = str(payload.get("agent_id"))
        if registry.get(agent_id) is not None:
            await dispatcher.deliver_cancel(agent_id, str(payload.get("run_id")), str(payload.get("job_id")),
                                            reason=str(payload.get("reason") or "cancelled"),
                                            force=bool(payload.get("force")))

    async def close(_topic: str, payload: dict[str, Any]) -> None:
        agent = registry.get(str(payload.get("agent_id")))
        if agent is not None:
            if payload.get("code") == p.CloseCode.DISPATCH_ACK_TIMEOUT:
                dispatcher.retire(agent.agent_id)
            await agent.close(int(payload.get("code") or p.CloseCode.GOING_AWAY), str(payload.get("reason") or ""))

    async def token_revoked(_topic: str, payload: dict[str, Any]) -> None:
        closed = await registry.disconnect_token(str(payload.get("token_id")), "agent token revoked")
        if closed:
            log_event("agents.disconnected_revoked_token", agents=closed, token_id=payload.get("token_id"))

    def forget(_topic: str, payload: dict[str, Any]) -> None:
        dispatcher.forget([str(job) for job in payload.get("job_ids") or []], everywhere=False)

    def wake(_topic: str, _payload: dict[str, Any]) -> None:
        dispatcher.wake()

    def reports(_topic: str, _payload: dict[str, Any]) -> None:
        if leadership.may_act():
            wake_reporter()

    def source_changed(_topic: str, payload: dict[str, Any]) -> None:
        source_id = str(payload.get("source_id"))
        dispatcher.forget_source(source_id)
        dispatcher.ingest.forget_source(source_id)
        log_event("sources.cache_dropped", source_id=source_id)

    def log_appended(_topic: str, payload: dict[str, Any]) -> None:
        for job_id in payload.get("job_ids") or []:
            dispatcher.logs.notify_appended(str(job_id))

    bus.subscribe("agent.cancel", cancel)
    bus.subscribe("agent.close", close)
    bus.subscribe("agent-token.revoked", token_revoked)
    bus.subscribe("dispatch.forget", forget)
    bus.subscribe("dispatch.wake", wake)
    bus.subscribe("reports.wake", reports)
    bus.subscribe("source.changed", source_changed)
    bus.subscribe(LOG_APPENDED_TOPIC, log_appended)


async def source_changed(app: Starlette, source_id: str) -> None:
    """A source was changed, disabled or deleted (committed): every node, this one included, drops its
    cached copies of it (the dispatcher's source, the ingest's lock files and opened secrets). Should the
    message not get out, this node's caches are dropped anyway and the other nodes' expire on their own."""
    services = services_of(app)
    try:
        await services.bus.publish("source.changed", {"source_id": source_id})
    except Exception as exc:
        services.dispatcher.forget_source(source_id)
        services.dispatcher.ingest.forget_source(source_id)
        log_event("cluster.source_changed_publish_failed", level="warning", source_id=source_id,
                  error=f"{type(exc).__name__}: {exc}")


async def _delete_run_data(database: Database, logs: LogStore, blobs: BlobStore, run_id: str) -> None:
    from kici.orchestrator.artifacts import delete_run_artifacts
    from kici.orchestrator.test_reports import delete_run_reports

    await logs.delete_run(run_id)
    await delete_run_artifacts(database, blobs, run_id)
    await delete_run_reports(database, blobs, run_id)
