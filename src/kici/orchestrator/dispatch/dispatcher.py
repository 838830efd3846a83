"""The dispatcher: hands queued jobs to connected agents and tracks what they report.

- **Dispatch.** A drain pass claims jobs for every connected agent with a free slot
  (`store.queue.claim_next`, exactly-once even against other orchestrators) and sends `job.dispatch`. A
  pass runs when something may have changed — runs created, an agent registered or reported a status,
  a job finished or was rejected — and on a short poll (`dispatch_poll_ms`) as the cross-process
  fallback. Wake-ups coalesce: a burst of events costs one pass.
- **Slots.** Each agent connection's dispatched-and-unfinished jobs are counted here against its
  `max_concurrency`; an agent that rejected a job as `busy` gets nothing until it reports `agent.status`
  or finishes a job, one that reports `draining` gets nothing more.
- **Tracking.** `job.ack`, `job.reject`, `job.status`, `step.status`, `log.chunk` and `job.heartbeat`
  go to the stores; each is accepted only from the agent the job was dispatched to (the stores' guarded
  updates check the owner; logs are checked against the connection's jobs).
- **Reconnects.** On registration the agent's reported in-flight jobs are reclaimed
  (`store.queue.reclaim`) and named in `register.ack`; a reclaimed job whose run is being cancelled is
  told to cancel again.

The dispatcher keeps no state another orchestrator would need: slots describe this process's own
connections, and everything about jobs lives in the database. What concerns another node's agents goes
through the cluster bus (`kici.orchestrator.cluster.bus`): cancels and closes for agents connected
elsewhere, slots freed by sweeps, and a wake-up for the other dispatchers when runs were created here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import httpx
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine import aio
from kici.engine import protocol as p
from kici.engine.states import JobEvent, JobState, RunStatus
from kici.orchestrator.agents.registry import AgentConnection, AgentRegistry
from kici.orchestrator.cluster.bus import ClusterBus
from kici.orchestrator.container import AppState, Readiness
from kici.orchestrator.db.schema import SourceKind, utcnow
from kici.orchestrator.dispatch.batching import WriteBatcher
from kici.orchestrator.dispatch.metrics import DispatchMetrics
from kici.orchestrator.dispatch.payload import (
    DispatchContext,
    DispatchError,
    DispatchRetry,
    RunCache,
    build_dispatch,
    load_context,
)
from kici.orchestrator.dispatch.secrets import JobSecretsError, deliver, withheld
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.logs import log_event
from kici.orchestrator.providers.base import CloneAccess, ProviderError
from kici.orchestrator.storage.logs import LogStore
from kici.orchestrator.store import queue as queue_store
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.queue import AgentSlot, Claim
from kici.orchestrator.store.runs import QueueLimits, RunRecord, SettleResult, Superseded
from kici.orchestrator.store.sources import Source, get_source

Delivered = dict[str, str] | JobSecretsError | None
"""A job's declared secrets as its claim resolved them (`dispatch.secrets.deliver`); None: not resolved yet."""

SOURCE_CACHE_S = 10.0
"""How long a source read for a dispatch is reused. A change made anywhere in the cluster drops it at once
(`forget_source`, on the bus's `source.changed`); the bound covers a lost message."""
DRAIN_WINDOW = 50
ACK_WRITE_DELAY_S = 1.0
DEFER_BASE_S = 1.0
WRITE_LANES = 8
"""Parallel group-commit lanes on PostgreSQL (each uses one pooled connection at a time)."""
DEFER_MAX_S = 30.0
"""Minimum pending rows read per drain pass (more when more slots are free)."""


@dataclass
class _Slots:
    connection_id: str
    jobs: set[str] = field(default_factory=set)
    busy: bool = False
    """Rejected a job as busy: wait for its next `agent.status` or finished job."""
    draining: bool = False


class Dispatcher:
    """Implements `AgentListener` for the registry; `start()`/`stop()` run its drain loop."""

    def __init__(
        self,
        state: AppState,
        registry: AgentRegistry,
        ingest: Ingest,
        logs: LogStore,
        metrics: DispatchMetrics,
    ) -> None:
        self.state = state
        self.settings = state.settings
        self.db = state.database
        self.registry = registry
        self.ingest = ingest
        self.logs = logs
        self.metrics = metrics
        self._slots: dict[str, _Slots] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._sources: dict[str, tuple[float, Source]] = {}
        self._http: httpx.AsyncClient | None = None
        self._rotation = 0
        self._runs = RunCache()
        self._acks: dict[str, asyncio.TimerHandle] = {}
        """Acks not written yet: the `running` that follows at once makes the write unnecessary."""
        self._background: set[asyncio.Task[None]] = set()
        # (an app built without a database, as for its OpenAPI schema, gets one lane and never starts it)
        postgres = getattr(self.db, "is_postgresql", False)
        self.writes = WriteBatcher(self.db, lanes=WRITE_LANES if postgres else 1)
        self._deferred: dict[str, float] = {}
        """Job id → monotonic time before which a job whose dispatch failed for a passing reason waits."""
        self.limits = QueueLimits(self.settings.queue_max_depth, self.settings.queue_timeout_ms)
        self.report_wake: Callable[[], None] = lambda: None
        """Told after writes that may have queued reports (the reporting worker's `wake`)."""
        self.bus: ClusterBus | None = None
        """The cross-node bus (set by `Services`): cancels and closes for agents held by another node, slots
        freed and wake-ups for the other nodes' dispatchers."""
        self._cluster_wake: asyncio.Task[None] | None = None
        registry.listener = self
        ingest.on_runs_created = self.runs_created
        ingest.on_superseded = self.cancel_superseded

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, readiness: Readiness) -> None:
        self.writes.start()
        self._task = asyncio.create_task(self._loop(readiness), name="kici-dispatcher")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        # Unwritten acks can be dropped: the next start releases this process's agents' jobs to
        # `recovering` (when the node joins the cluster, kici.orchestrator.cluster.node), which clears their ack
        # deadlines anyway.
        for handle in self._acks.values():
            handle.cancel()
        self._acks.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.writes.stop()
        if self._task is not None:
            await aio.cancel_and_wait(self._task)
        if self._http is not None:
            await self._http.aclose()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self, readiness: Readiness) -> None:
        while not readiness.prepared:  # migrations first: the queue tables may not exist yet
            await asyncio.sleep(0.05)
        # agents a previous incarnation of this node held were released when the node joined the cluster
        # (kici.orchestrator.cluster.node), before the database was marked prepared
        poll = self.settings.dispatch_poll_ms / 1000
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await aio.wait_for(self._wake.wait(), poll)
            self._wake.clear()
            try:
                await self.drain()
            except Exception as exc:  # the database hiccupped: try again on the next wake-up or poll
                log_event("dispatch.drain_failed", level="error", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(min(poll, 1.0))

    # -- hooks ------------------------------------------------------------------------------------

    async def runs_created(self, run_ids: Iterable[str]) -> None:
        created = list(run_ids)
        self.metrics.runs_created.inc(len(created))
        self.wake()
        self.wake_cluster()
        if any(run_store.may_be_reported(run_id) for run_id in created):
            self.report_wake()

    async def registered(self, agent: AgentConnection) -> list[str]:
        reported = [job_id for _run_id, job_id in agent.in_flight_jobs]
        if not reported and not agent.holds_jobs:  # nothing to reclaim nor settle (most of a storm)
            self._slots[agent.agent_id] = _Slots(agent.connection_id)
            return []
        # group-committed in the lane of (the first of) its runs: in a reconnect storm the agents of one
        # run reclaim in a few shared transactions instead of queueing one by one for the run's lock
        reclaimed = await self.writes.submit(
            partial(queue_store.reclaim, agent_id=agent.agent_id, job_ids=reported, limits=self.limits,
                    labels=list(agent.labels)),
            key=agent.in_flight_jobs[0][0] if agent.in_flight_jobs else agent.agent_id,
        )
        self._slots[agent.agent_id] = _Slots(agent.connection_id, set(reclaimed))
        # the agent may have sent these jobs' chunks to another orchestrator since this one last saw them
        await self.logs.forget(reclaimed)
        if reported:
            log_event("dispatch.reclaimed", agent_id=agent.agent_id, reported=reported, reclaimed=reclaimed)
        return reclaimed

    async def ready(self, agent: AgentConnection) -> None:
        slots = self._slots.get(agent.agent_id)
        if slots is not None and slots.jobs:
            # a job cancelled while its agent was away is told again now
            async with self.db.read() as conn:
                doomed: list[tuple[str, str, str]] = []
                for job_id in sorted(slots.jobs):
                    job = await run_store.get_job(conn, job_id)
                    run = await run_store.get_run(conn, job.run_id) if job is not None else None
                    if job is not None and run is not None and run.status == RunStatus.CANCELLING.value:
                        doomed.append((job.run_id, job_id, run.cancelled_by or "cancelled"))
            for run_id, job_id, reason in doomed:
                await self.send_cancel(agent.agent_id, run_id, job_id, reason=reason, force=False)
        self.wake()

    async def status(self, agent: AgentConnection) -> None:
        slots = self._slots_of(agent)
        if slots is not None and agent.status is not None:
            slots.busy = False
            slots.draining = agent.status.draining
        self.wake()

    async def disconnected(self, agent: AgentConnection, released: list[str]) -> None:
        slots = self._slots.get(agent.agent_id)
        if slots is not None and slots.connection_id == agent.connection_id:
            del self._slots[agent.agent_id]

    def _slots_of(self, agent: AgentConnection) -> _Slots | None:
        slots = self._slots.get(agent.agent_id)
        return slots if slots is not None and slots.connection_id == agent.connection_id else None

    def retire(self, agent_id: str) -> None:
        """Dispatch nothing more to this agent's current connection (it is about to be closed)."""
        slots = self._slots.get(agent_id)
        if slots is not None:
            slots.draining = True

    def forget(self, job_ids: Iterable[str], *, everywhere: bool = True) -> None:
        """Jobs that ended without their agent's report (stale, recovery timeout): free their slots, here
        and (`everywhere`) on the other nodes, whose agents may hold them."""
        wanted = set(job_ids)
        if not wanted:
            return
        for slots in self._slots.values():
            slots.jobs -= wanted
        self.wake()
        if everywhere and self.bus is not None and self.bus.peers > 0:
            self._publish_soon("dispatch.forget", {"job_ids": sorted(wanted)})

    def wake_cluster(self) -> None:
        """Wake the other nodes' dispatchers (work was queued here that their agents may take). Coalesced:
        one NOTIFY in flight at a time; their `dispatch_poll_ms` poll covers a lost one."""
        bus = self.bus
        if bus is None or bus.peers == 0 or (self._cluster_wake is not None and not self._cluster_wake.done()):
            return

        async def publish() -> None:
            try:
                await bus.publish("dispatch.wake", {}, durable=False, local=False)
            except Exception as exc:
                log_event("dispatch.cluster_wake_failed", level="warning", error=f"{type(exc).__name__}: {exc}")

        self._cluster_wake = task = asyncio.create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _publish_soon(self, topic: str, payload: dict[str, object], *, local: bool = False) -> None:
        """Publish a durable bus message from a background task (callers may be inside a transaction)."""
        bus = self.bus
        if bus is None:
            return

        async def publish() -> None:
            try:
                await bus.publish(topic, payload, local=local)
            except Exception as exc:
                log_event("cluster.publish_failed", level="error", topic=topic, error=f"{type(exc).__name__}: {exc}")

        task = asyncio.create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close_agent(self, agent_id: str, code: int, reason: str) -> None:
        """Close the agent's connection, on whichever node holds it."""
        agent = self.registry.get(agent_id)
        if agent is not None:
            await agent.close(code, reason)
        elif self.bus is not None:
            await self.bus.publish("agent.close", {"agent_id": agent_id, "code": code, "reason": reason}, local=False)

    # -- dispatch ---------------------------------------------------------------------------------

    def _free(self, agent: AgentConnection) -> int:
        slots = self._slots_of(agent)
        if slots is None or slots.busy or slots.draining:
            return 0
        if agent.status is not None and agent.status.draining:
            return 0
        return agent.max_concurrency - len(slots.jobs)

    async def drain(self) -> int:
        """One pass: match the oldest pending jobs to connected agents with free slots and claim them. The
        number of jobs dispatched. Costs one read plus one claim per job handed out, however many agents
        are connected."""
        agents = [a for a in self.registry.connected_agents() if self._free(a) > 0]
        if not agents:
            return 0
        free = sum(self._free(a) for a in agents)
        window = max(4 * free, DRAIN_WINDOW)
        async with self.db.read() as conn:
            rows = await queue_store.pending_rows(conn, limit=window)
        if not rows:
            return 0
        # start with a different agent each pass, so equal agents share the work
        self._rotation = (self._rotation + 1) % len(agents)
        agents = agents[self._rotation:] + agents[: self._rotation]
        slots = {a.agent_id: AgentSlot(a.agent_id, list(a.labels)) for a in agents}
        planned: dict[str, int] = {}
        picks: list[tuple[AgentConnection, queue_store.PendingRow]] = []
        now = time.monotonic()
        self._deferred = {job: until for job, until in self._deferred.items() if until > now}
        for row in rows:
            if row.job_id in self._deferred:
                continue
            open_agents = [a for a in agents if self._free(a) - planned.get(a.agent_id, 0) > 0]
            if not open_agents:
                break
            agent = next((a for a in open_agents if row.routes_to(slots[a.agent_id])), None)
            if agent is None:
                continue  # nobody connected here may run it: it waits
            picks.append((agent, row))
            planned[agent.agent_id] = planned.get(agent.agent_id, 0) + 1
            agents.append(agents.pop(agents.index(agent)))  # next job: another agent first
        timeout = self.settings.dispatch_ack_timeout_ms
        # Each run is read and parsed once, before the claims (the first hand-out of a run used to do it):
        # then a job that declares secrets has them resolved and its delivery recorded in its claim's
        # transaction, and no job of the pass reads its run again.
        await self._cache_runs({row.run_id for _, row in picks})
        # submitted together, claims of one lane share its transaction (conditional updates keep them exact)
        claims = await asyncio.gather(*(
            self.writes.submit(partial(self._claim_in, row=row, agent=slots[agent.agent_id], ack_timeout_ms=timeout),
                               key=row.run_id)
            for agent, row in picks
        ), return_exceptions=True)
        handing: list[tuple[AgentConnection, Claim, queue_store.PendingRow, Delivered]] = []
        lost = 0
        for (agent, row), claimed in zip(picks, claims, strict=True):
            if isinstance(claimed, BaseException):
                log_event("dispatch.claim_failed", level="error", error=f"{type(claimed).__name__}: {claimed}")
                continue
            claim, secrets = claimed
            if claim is not None:
                handing.append((agent, claim, row, secrets))
            else:
                lost += 1
        # handed out together: whatever writes hand-outs still make share group-committed transactions
        sent = sum(await asyncio.gather(*(
            self._hand_out(agent, claim, row, secrets) for agent, claim, row, secrets in handing
        )))
        if (len(rows) == window and sent) or (lost and len(rows) > len(picks)):
            # a long queue: come back for the rest; or rows this pass lost to another claimer (another node
            # took them, or was taking them) while others wait that this node's free agents could run
            self.wake()
        return sent

    async def _claim_in(
        self, conn: AsyncConnection, *, row: queue_store.PendingRow, agent: AgentSlot, ack_timeout_ms: int
    ) -> tuple[Claim | None, Delivered]:
        """Claim `row` in the caller's transaction and, when its job declares secrets and its run is cached,
        resolve them and record their delivery in that same transaction (None: not done here)."""
        claim = await queue_store.claim_row_in(conn, row, agent, ack_timeout_ms=ack_timeout_ms)
        cached = self._runs.peek(row.run_id) if claim is not None else None
        lock_job = cached[1].job(row.job) if cached is not None else None
        # a job with a deployment environment: its resolved name (the `env:` scope) is read at hand-out
        if claim is None or cached is None or lock_job is None or not lock_job.secrets or lock_job.environments:
            return claim, None
        return claim, await deliver(conn, self.state.keyring, run=cached[0], lock_job=lock_job, environment=None,
                                    job_id=claim.job_id, attempt=claim.attempt)

    async def _cache_runs(self, run_ids: set[str]) -> None:
        """Read the runs not in the run cache yet, in one read. A run that cannot be loaded is left out: its
        jobs' hand-outs meet the same error and fail with it."""
        missing = [run_id for run_id in run_ids if self._runs.peek(run_id) is None]
        if not missing:
            return
        async with self.db.read() as conn:
            for run_id in missing:
                with contextlib.suppress(DispatchError):
                    await self._runs.get(conn, run_id)

    async def _hand_out(
        self,
        agent: AgentConnection,
        claim: Claim,
        row: queue_store.PendingRow | None = None,
        delivered: Delivered = None,
    ) -> bool:
        """`delivered`: the job's secrets as its claim's transaction resolved them, if it did."""
        slots = self._slots_of(agent)
        if slots is None:  # disconnected meanwhile: put the job back (not the job's fault: no attempt used)
            await self._requeue(claim, agent.agent_id, transient=True)
            return False
        slots.jobs.add(claim.job_id)
        try:
            context = await load_context(self.db, claim, self._runs, row)
            lock_job = context.workflow.job(context.job.job)
            declared = lock_job is not None and bool(lock_job.secrets)
            if declared and lock_job is not None and not context.run.secrets_allowed:
                raise withheld(context.run, lock_job)  # before a clone token is minted for it
            if isinstance(delivered, JobSecretsError):
                raise delivered
            access = await self._clone_access(context.run)
            secrets = delivered if delivered is not None else (
                await self._deliver_secrets(context, claim) if declared else {}
            )
            message = build_dispatch(
                context, access, attempt=claim.attempt, max_log_size_bytes=self.settings.max_log_size_bytes,
                secrets=secrets,
            )
        except JobSecretsError as exc:
            slots.jobs.discard(claim.job_id)
            await self._fail_undispatchable(claim, str(exc), error=str(exc), category="secrets")
            return False
        except DispatchError as exc:
            slots.jobs.discard(claim.job_id)
            await self._fail_undispatchable(claim, str(exc))
            return False
        except DispatchRetry as exc:
            # e.g. GitHub did not mint a token: back in line, not offered again for a while; the attempt
            # counts toward the job's limit
            slots.jobs.discard(claim.job_id)
            delay = min(DEFER_MAX_S, DEFER_BASE_S * 2 ** (claim.attempt - 1))
            self._deferred[claim.job_id] = time.monotonic() + delay
            log_event("job.dispatch_deferred", level="warning", run_id=claim.run_id, job_id=claim.job_id,
                      reason=str(exc), retry_in_s=delay)
            await self._requeue(claim, agent.agent_id)
            return False
        try:
            await agent.send(message)
        except Exception:  # the connection broke: not the job's fault, no attempt used
            slots.jobs.discard(claim.job_id)
            await self._requeue(claim, agent.agent_id, transient=True)
            return False
        queued = context.job.queued_at
        if queued is not None:
            self.metrics.dispatch_latency.observe(max(0.0, time.time() - queued.timestamp()))
        self.metrics.jobs_dispatched.inc()
        log_event("job.dispatched", run_id=claim.run_id, job_id=claim.job_id, agent_id=agent.agent_id,
                  attempt=claim.attempt, level="debug")
        return True

    async def _requeue(self, claim: Claim, agent_id: str, *, transient: bool = False) -> None:
        async with self.db.transaction() as conn:
            await queue_store.reject(
                conn, claim.job_id, agent_id, max_attempts=self.settings.dispatch_max_attempts, limits=self.limits,
                transient=transient,
            )
        self.wake()

    async def _fail_undispatchable(
        self, claim: Claim, reason: str, *, error: str | None = None, category: str = "dispatch"
    ) -> None:
        log_event("job.undispatchable", level="warning", run_id=claim.run_id, job_id=claim.job_id, reason=reason)
        async with self.db.transaction() as conn:
            await run_store.finish_job(
                conn, claim.job_id, JobState.FAILED, JobEvent.FAIL, error=error or f"cannot dispatch: {reason}",
                failure_category=category, limits=self.limits,
            )
        self.wake()

    async def _deliver_secrets(self, context: DispatchContext, claim: Claim) -> dict[str, str]:
        """The job's declared secrets, resolved and their delivery recorded in one group-committed
        transaction (`dispatch.secrets.deliver`); `JobSecretsError` when they cannot all be delivered."""
        lock_job = context.workflow.job(context.job.job)
        assert lock_job is not None
        resolved = await self.writes.submit(partial(
            deliver, keys=self.state.keyring, run=context.run, lock_job=lock_job, environment=context.environment,
            job_id=claim.job_id, attempt=claim.attempt,
        ), key=claim.run_id)
        if isinstance(resolved, JobSecretsError):
            raise resolved
        return resolved

    def forget_source(self, source_id: str) -> None:
        """The source changed or was deleted: the next dispatch of its jobs reads it again."""
        self._sources.pop(source_id, None)

    async def _clone_access(self, run: RunRecord) -> CloneAccess:
        if run.source_id is None:
            raise DispatchError("the run has no source to clone from")
        cached = self._sources.get(run.source_id)
        if cached is not None and cached[0] > time.monotonic():
            source = cached[1]
        else:
            async with self.db.read() as conn:
                found = await get_source(conn, run.source_id)
            if found is None:
                raise DispatchError(f"source {run.source_id} no longer exists")
            source = found
            self._sources[run.source_id] = (time.monotonic() + SOURCE_CACHE_S, source)
        try:
            secrets = (
                await self.ingest.open_secrets(self.db, source, self.state.keyring)
                if source.kind is SourceKind.GITHUB
                else {}
            )
        except Exception as exc:
            raise DispatchError(f"the secrets of source {source.name!r} cannot be opened: {exc}") from None
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=30.0)
        try:
            provider = self.ingest.provider(source, secrets, client=self._http)
        except (ProviderError, KeyError, ValueError) as exc:  # the source's configuration cannot work
            raise DispatchError(f"source {source.name!r}: {exc}") from None
        try:
            return await provider.clone_access(run.repo)
        except (ProviderError, httpx.HTTPError) as exc:  # the host did not answer: maybe next time
            raise DispatchRetry(f"source {source.name!r}: {exc}") from None

    # -- cancel -----------------------------------------------------------------------------------

    async def send_cancel(self, agent_id: str, run_id: str, job_id: str, *, reason: str, force: bool) -> bool:
        """Tell the job's agent to cancel it, through the cluster bus when another node holds its
        connection; False when it could be sent nowhere."""
        if self.registry.get(agent_id) is None and self.bus is not None:
            try:
                await self.bus.publish("agent.cancel", {"agent_id": agent_id, "run_id": run_id, "job_id": job_id,
                                                        "reason": reason, "force": force}, local=False)
            except Exception as exc:
                log_event("job.cancel_undeliverable", level="warning", run_id=run_id, job_id=job_id,
                          agent_id=agent_id, error=f"{type(exc).__name__}: {exc}")
                return False
            log_event("job.cancel_relayed", run_id=run_id, job_id=job_id, agent_id=agent_id, force=force)
            return True
        return await self.deliver_cancel(agent_id, run_id, job_id, reason=reason, force=force)

    async def deliver_cancel(self, agent_id: str, run_id: str, job_id: str, *, reason: str, force: bool) -> bool:
        """Send `job.cancel` to the agent if it is connected to this node; False otherwise."""
        sent = await self.registry.send(agent_id, p.JobCancel(run_id=run_id, job_id=job_id, reason=reason,
                                                              force=force))
        log_event("job.cancel_sent" if sent else "job.cancel_undeliverable", run_id=run_id, job_id=job_id,
                  agent_id=agent_id, force=force, level="info" if sent else "warning")
        return sent

    async def cancel_jobs(self, run_id: str, running: Iterable[tuple[str, str]], *, reason: str, force: bool) -> None:
        self.report_wake()  # called after a cancel committed: its jobs' reports are due
        for job_id, agent_id in running:
            await self.send_cancel(agent_id, run_id, job_id, reason=reason, force=force)

    async def cancel_superseded(self, superseded: Iterable[Superseded]) -> None:
        """Tell the agents of runs a new run cancelled (`cancel_in_progress`) to stop their jobs."""
        for old in superseded:
            log_event("run.superseded", run_id=old.run_id, reason=old.reason)
            await self.cancel_jobs(old.run_id, old.running, reason=old.reason, force=False)

    # -- agent messages ----------------------------------------------------------------------------

    async def message(self, agent: AgentConnection, message: p.AgentMessage) -> None:
        if isinstance(message, p.LogChunk):
            await self._log_chunk(agent, message)
        elif isinstance(message, p.StepStatusUpdate):
            await self.writes.submit(partial(
                run_store.record_step, job_id=message.job_id, step_index=message.step_index,
                name=message.step_name, state=message.state, duration_ms=message.duration_ms, error=message.error,
                agent_id=agent.agent_id,
            ), key=message.run_id)
        elif isinstance(message, p.JobStatusUpdate):
            await self._job_status(agent, message)
        elif isinstance(message, p.JobHeartbeat):
            await self.writes.submit(partial(
                run_store.touch_heartbeat, job_id=message.job_id, agent_id=agent.agent_id, now=utcnow()
            ), key=message.run_id)
        elif isinstance(message, p.JobAck):
            self._defer_ack(message.run_id, message.job_id, agent.agent_id)
        elif isinstance(message, p.JobReject):
            await self._reject(agent, message)

    async def sync(self, agent: AgentConnection) -> None:
        await self.logs.flush()

    def _defer_ack(self, run_id: str, job_id: str, agent_id: str) -> None:
        """Write the ack a moment later unless the job's `running` (which clears the ack deadline too)
        arrives first, as it does from a healthy agent; the delay is well inside the ack timeout, so the
        deadline sweep — on any orchestrator — sees the ack in time."""
        delay = min(ACK_WRITE_DELAY_S, self.settings.dispatch_ack_timeout_ms / 4000)
        self._settle_ack(job_id)
        self._acks[job_id] = asyncio.get_running_loop().call_later(delay, self._write_ack, run_id, job_id, agent_id)

    def _settle_ack(self, job_id: str) -> None:
        handle = self._acks.pop(job_id, None)
        if handle is not None:
            handle.cancel()

    def _write_ack(self, run_id: str, job_id: str, agent_id: str) -> None:
        self._acks.pop(job_id, None)

        async def write() -> None:
            try:
                await self.writes.submit(partial(queue_store.ack, job_id=job_id, agent_id=agent_id), key=run_id)
            except Exception as exc:
                log_event("job.ack_write_failed", level="error", job_id=job_id, error=f"{type(exc).__name__}: {exc}")

        task = asyncio.create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _log_chunk(self, agent: AgentConnection, chunk: p.LogChunk) -> None:
        slots = self._slots_of(agent)
        if slots is None or chunk.job_id not in slots.jobs:
            log_event("log.chunk_ignored", level="debug", agent_id=agent.agent_id, job_id=chunk.job_id)
            return
        try:
            stored = await self.logs.append(chunk.run_id, chunk.job_id, chunk.step_index, chunk.lines, chunk.seq)
        except (OSError, ValueError) as exc:
            log_event("log.store_failed", level="error", job_id=chunk.job_id, error=f"{type(exc).__name__}: {exc}")
            return
        if stored:
            self.metrics.log_lines.inc(len(chunk.lines))

    async def _job_status(self, agent: AgentConnection, update: p.JobStatusUpdate) -> None:
        self._settle_ack(update.job_id)
        if update.state != "running":
            # a finished job's lines are all readable (from any orchestrator) once its status is. Not
            # before `running`: that write clears the ack deadline and must not wait behind log writes
            try:
                await self.logs.flush()
            except OSError as exc:
                log_event("log.store_failed", level="error", job_id=update.job_id, error=str(exc))
        settled = await self.writes.submit(partial(
            run_store.record_job_state, job_id=update.job_id, state=update.state, agent_id=agent.agent_id,
            error=update.error, failure_category=update.failure_category, outputs=update.outputs,
            limits=self.limits,
        ), key=update.run_id)
        if settled is None:
            log_event("job.status_ignored", level="debug", agent_id=agent.agent_id, job_id=update.job_id,
                      state=update.state)
            return
        if run_store.may_be_reported(update.run_id):
            self.report_wake()
        if update.state == "running":
            return
        self.logs.finish(update.run_id, update.job_id)
        slots = self._slots_of(agent)
        if slots is not None:
            slots.jobs.discard(update.job_id)
            slots.busy = False
        self.metrics.jobs_finished.labels(update.state).inc()
        self._count_run(settled)
        self.wake()

    def _count_run(self, settled: SettleResult) -> None:
        if settled.finished and settled.run_status is not None:
            self.metrics.runs_finished.labels(settled.run_status).inc()

    async def _reject(self, agent: AgentConnection, reject: p.JobReject) -> None:
        self._settle_ack(reject.job_id)
        async with self.db.transaction() as conn:
            requeued = await queue_store.reject(
                conn, reject.job_id, agent.agent_id, max_attempts=self.settings.dispatch_max_attempts,
                limits=self.limits, transient=reject.reason in ("busy", "draining"),
            )
        slots = self._slots_of(agent)
        if slots is not None:
            slots.jobs.discard(reject.job_id)
            if reject.reason == "busy":
                slots.busy = True
            elif reject.reason == "draining":
                slots.draining = True
        log_event("job.rejected", agent_id=agent.agent_id, job_id=reject.job_id, reason=reject.reason,
                  outcome=requeued)
        self.wake()

