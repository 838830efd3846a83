"""This orchestrator process as a node of the cluster.

- **Join** (at start, before the node is ready): the row `nodes[node id]` is written with a fresh
  incarnation and a lease of `KICI_NODE_LEASE_SECONDS`. A name held by a live process is refused: a row
  whose lease has not run out is waited out, and if its holder renews it meanwhile, start-up fails. Under
  the default name, holding the data dir's lock file proves the holder is dead (an earlier incarnation of
  this very node), so the row is taken over at once. Agents the previous incarnation held, which nobody
  holds any more, are released: their jobs go `recovering` and are reclaimed when the agents reconnect.
  Agents held by live siblings are never touched.
- **Heartbeat** (every third of the lease): the node's lease is renewed; the leader lease renewed (or,
  when free, acquired with a new term); nodes whose lease ran out are deleted by exactly one survivor
  (a conditional DELETE), which then releases their agents like the join does; the leader also prunes old
  bus messages. A node that finds its own row gone (it was declared dead while paused) closes its agents'
  connections — they reconnect and reclaim their jobs — and joins again under a new incarnation.
- **Leave** (clean shutdown, after the agent connections closed): the leader lease is released and the
  row deleted, so the others take over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from typing import IO

from prometheus_client import Counter, Gauge

from kici.engine import aio
from kici.engine.protocol import CloseCode
from kici.orchestrator.agents.registry import AgentRegistry
from kici.orchestrator.cluster.bus import ClusterBus, prune_horizon
from kici.orchestrator.cluster.identity import lock_data_dir, node_address
from kici.orchestrator.cluster.leadership import FencedOut, Leadership
from kici.orchestrator.container import AppState, Readiness
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import cluster as cluster_store
from kici.orchestrator.store import queue as queue_store

LOCK_WAIT_MS = 1000
"""How long a lease update waits for the lease row's lock (held by a leader duty's fenced transaction)."""
PRUNE_EVERY_S = 60.0


class NodeNameInUse(Exception):
    """Another live orchestrator holds this node name (`KICI_NODE_NAME`)."""


class ClusterMetrics:
    def __init__(self, state: AppState) -> None:
        registry = state.metrics.registry
        self.nodes = Gauge("kici_cluster_nodes", "Live orchestrator nodes (unexpired leases) this node sees.",
                           registry=registry)
        self.is_leader = Gauge("kici_cluster_is_leader", "1 while this node holds the leader lease.",
                               registry=registry)
        self.leader_changes = Counter(
            "kici_cluster_leader_changes", "Times this node became or stopped being the leader.", registry=registry)
        self.fenced = Counter(
            "kici_cluster_fenced_writes",
            "Leader-duty writes refused because this node no longer held the leader lease under its term.",
            registry=registry)
        self.takeovers = Counter(
            "kici_cluster_agents_taken_over",
            "Agents this node released because the node holding them was gone (their jobs went recovering).",
            registry=registry)
        info = Gauge("kici_cluster_node_info", "Always 1; the label names this node.", ["node"], registry=registry)
        info.labels(node=state.node_id).set(1)


class Node:
    def __init__(self, state: AppState, registry: AgentRegistry, leadership: Leadership, bus: ClusterBus) -> None:
        self.state = state
        self.settings = state.settings
        self.db = state.database
        self.registry = registry
        self.leadership = leadership
        self.bus = bus
        self.node_id = state.node_id
        self.incarnation = uuid.uuid4().hex
        self.address: str | None = None
        """Shown to peers and operators; `serve` sets it from the listening socket."""
        self.lease = dt.timedelta(seconds=self.settings.node_lease_seconds)
        self.metrics = ClusterMetrics(state)
        self.joined = False
        self._lock_file: IO[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self._bus_started = False
        self._pruned_at = 0.0
        leadership.on_lost = self._lost
        leadership.on_refused = self.metrics.fenced.inc

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self, readiness: Readiness) -> None:
        """Join now when the database is prepared already (tests, in-process apps); otherwise `serve`
        joins during start-up preparation (`join`) and the heartbeat starts once that is done."""
        if readiness.prepared and not self.joined:
            await self.join()
        self._task = asyncio.create_task(self._loop(readiness), name="kici-node")

    async def join(self) -> None:
        if not self.settings.node_name:
            self._lock_file = await asyncio.to_thread(lock_data_dir, self.settings.data_dir)
        address = self.address or node_address(self.settings)
        await self._claim_name(address)
        self.leadership.enable(self.node_id, int(self.lease.total_seconds() * 1000))
        self.joined = True
        log_event("cluster.node_joined", node=self.node_id, incarnation=self.incarnation, address=address,
                  lease_s=self.settings.node_lease_seconds)
        await self._release_previous_incarnation()
        if not self._bus_started:
            await self.bus.start()
            self._bus_started = True
        await self.heartbeat()

    async def stop(self) -> None:
        if self._task is not None:
            await aio.cancel_and_wait(self._task)
            self._task = None
        if self._bus_started:
            await self.bus.stop()
            self._bus_started = False
        if self.joined:
            try:
                await self.leave()
            except Exception as exc:  # the others declare this node dead after its lease instead
                log_event("cluster.leave_failed", level="warning", error=f"{type(exc).__name__}: {exc}")
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def leave(self) -> None:
        term = self.leadership.term
        async with self.db.transaction() as conn:
            now = await cluster_store.db_now(conn)
            if term is not None:
                await cluster_store.limit_lock_wait(conn, LOCK_WAIT_MS)
                await cluster_store.release_lease(conn, self.node_id, term, now=now)
            await cluster_store.delete_node(conn, self.node_id, self.incarnation)
        if term is not None:
            self.leadership.term = None
            self.metrics.is_leader.set(0)
        self.joined = False
        log_event("cluster.node_left", node=self.node_id, was_leader=term is not None, term=term)

    async def _loop(self, readiness: Readiness) -> None:
        while not (readiness.prepared and self.joined):
            await asyncio.sleep(0.05)
        interval = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except Exception as exc:  # the database is away, say: the lease may run out; try again
                log_event("cluster.heartbeat_failed", level="warning", error=f"{type(exc).__name__}: {exc}")

    # -- joining -----------------------------------------------------------------------------------

    async def _claim_name(self, address: str) -> None:
        seen: dt.datetime | None = None
        while True:
            async with self.db.transaction() as conn:
                now = await cluster_store.db_now(conn)
                existing = await cluster_store.get_node(conn, self.node_id, for_update=True)
                free = (
                    existing is None or existing.lease_expires_at <= now or self._lock_file is not None
                )
                if free:
                    await cluster_store.put_node(conn, node_id=self.node_id, incarnation=self.incarnation,
                                                 address=address, version=self.state.version, now=now,
                                                 lease=self.lease)
                    return
                assert existing is not None
                if seen is not None and existing.lease_expires_at > seen:
                    started = existing.started_at.isoformat(timespec="seconds")
                    raise NodeNameInUse(
                        f"node name {self.node_id!r} is in use by a live orchestrator (address "
                        f"{existing.address or 'unknown'}, started {started}); give each orchestrator its own "
                        "KICI_NODE_NAME"
                    )
                seen = existing.lease_expires_at
                wait = (existing.lease_expires_at - now).total_seconds()
            log_event("cluster.node_name_held", level="warning", node=self.node_id, wait_s=round(wait, 2),
                      holder_address=existing.address,
                      hint="waiting for the lease of an earlier process with this name to run out")
            await asyncio.sleep(min(max(wait, 0.05) + 0.05, self.lease.total_seconds()))

    async def _release_previous_incarnation(self) -> None:
        """Agents shown as connected through this node name that are not connected to this process: the
        previous incarnation's (crashed or killed); their jobs go `recovering`. Also agents connected
        through no node at all (rows from an orchestrator that predates nodes)."""
        async with self.db.read() as conn:
            held: list[tuple[str, str | None]] = [
                (agent_id, self.node_id) for agent_id in await cluster_store.agents_of_node(conn, self.node_id)
            ]
            held += [(agent_id, None) for agent_id, node_id in await cluster_store.orphaned_agents(conn, unowned=True)
                     if node_id is None]
        released = [agent_id for agent_id, node_id in held if await self._release(agent_id, node_id)]
        if released:
            log_event("cluster.previous_incarnation_released", node=self.node_id, agents=released)

    async def _release(self, agent_id: str, node_id: str | None) -> bool:
        window = dt.timedelta(milliseconds=2 * self.settings.agent_max_reconnect_delay_ms)
        async with self.registry.lock(agent_id):
            if self.registry.get(agent_id) is not None:
                return False  # it reconnected here meanwhile
            async with self.db.transaction() as conn:
                if not await agent_store.mark_orphan_disconnected(conn, agent_id, node_id):
                    return False  # reconnected through another node meanwhile
                now = await cluster_store.db_now(conn)
                jobs = await queue_store.release_agent_jobs(conn, agent_id, recovery_deadline=now + window)
        if jobs:
            log_event("dispatch.jobs_recovering_after_restart", agent_id=agent_id, jobs=jobs, node=node_id)
        return True

    # -- heartbeat ---------------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        """One beat: renew this node's lease, hold or seek the leader lease, take over dead nodes."""
        async with self.db.transaction() as conn:
            now = await cluster_store.db_now(conn)
            renewed = await cluster_store.renew_node(conn, self.node_id, self.incarnation, now=now, lease=self.lease)
        if not renewed:
            await self._rejoin()
            return
        await self._lead()
        await self._take_over_dead_nodes()
        await self._refresh_metrics()
        if self.leadership.is_leader and time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
            self._pruned_at = time.monotonic()
            with contextlib.suppress(FencedOut):
                async with self.db.transaction() as conn:
                    await self.leadership.fence(conn, "prune_bus_events")
                    await cluster_store.prune_events(conn, before=prune_horizon(await cluster_store.db_now(conn)))

    async def _rejoin(self) -> None:
        log_event("cluster.node_lease_lost", level="warning", node=self.node_id, incarnation=self.incarnation,
                  reason="this node's row is gone: it was declared dead (paused or cut off longer than its lease)")
        term = self.leadership.term
        if term is not None:
            self.leadership.lost(term, action="node_lease", reason="node declared dead")
        # its agents were released by a survivor (their jobs are recovering): they must register again to
        # reclaim them, here or elsewhere
        for agent in self.registry.connected_agents():
            await agent.close(CloseCode.GOING_AWAY, "orchestrator node rejoining the cluster")
        self.incarnation = uuid.uuid4().hex
        await self._claim_name(self.address or node_address(self.settings))
        log_event("cluster.node_joined", node=self.node_id, incarnation=self.incarnation, rejoined=True)

    async def _lead(self) -> None:
        term = self.leadership.term
        async with self.db.transaction() as conn:
            await cluster_store.limit_lock_wait(conn, LOCK_WAIT_MS)
            now = await cluster_store.db_now(conn)
            if term is not None:
                renewed = await cluster_store.renew_lease(conn, self.node_id, term, now=now, lease=self.lease)
                gained = None
            else:
                renewed = False
                await cluster_store.ensure_lease(conn)
                gained = await cluster_store.acquire_lease(conn, self.node_id, now=now, lease=self.lease)
        if term is not None and not renewed:
            self.leadership.refuse(term, "renew_leader_lease")
        elif gained is not None:
            self.leadership.gained(gained)
            self.metrics.is_leader.set(1)
            self.metrics.leader_changes.inc()
            log_event("cluster.leader_elected", node=self.node_id, term=gained)

    def _lost(self, term: int) -> None:
        self.metrics.is_leader.set(0)
        self.metrics.leader_changes.inc()

    async def _take_over_dead_nodes(self) -> None:
        async with self.db.read() as conn:
            now = await cluster_store.db_now(conn)
            expired = await cluster_store.expired_nodes(conn, now=now)
        for node in expired:
            if node.id == self.node_id:
                continue
            async with self.db.transaction() as conn:
                removed = await cluster_store.remove_dead_node(conn, node, now=await cluster_store.db_now(conn))
            if removed:
                log_event("cluster.node_lost", level="warning", node=node.id, address=node.address,
                          lease_expired_at=node.lease_expires_at.isoformat(), taken_over_by=self.node_id)
        async with self.db.read() as conn:
            orphans = await cluster_store.orphaned_agents(conn)
        released = [agent_id for agent_id, node_id in orphans if await self._release(agent_id, node_id)]
        if released:
            self.metrics.takeovers.inc(len(released))
            log_event("cluster.agents_taken_over", level="warning", node=self.node_id, agents=released)

    async def _refresh_metrics(self) -> None:
        async with self.db.read() as conn:
            now = await cluster_store.db_now(conn)
            live = [n for n in await cluster_store.list_nodes(conn) if n.lease_expires_at > now]
        self.metrics.nodes.set(len(live))
        self.bus.peers = len([n for n in live if n.id != self.node_id])
        self.metrics.is_leader.set(1 if self.leadership.is_leader else 0)
