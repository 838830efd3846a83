"""Writes many agent sessions make to the `agents` table, grouped so that their number of transactions does
not grow with the number of agents.

- **Registrations and disconnects** are group-committed: those that arrive while one transaction is being
  written go together into the next one (`store.agents.register_agents`: three statements for the whole
  group, plus one to learn which of the agents hold queue rows; a disconnect marks every agent of its group
  in one statement and releases jobs only for the agents that hold some). A reconnect storm of a thousand
  agents (a node died, its agents all come to this one) then costs a handful of transactions instead of a
  thousand, and takes one pooled connection instead of queueing for all of them.
- **`last_seen_at`** of agents that sent a heartbeat is written for all of them in one statement every
  `AgentTimeouts.last_seen_write_s` (the interval each agent's row was written at before, in one
  transaction per agent). With an interval of 0 every pass of the event loop writes what it collected.

If a grouped transaction fails (another orchestrator inserted the same new agent id at the same moment,
a deadlock), each item of the group is written again alone, so one bad item fails only its own session.
Callers serialise the writes of one agent id (`AgentRegistry.lock`), so a group never holds two of them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kici.orchestrator.db.database import Database
from kici.orchestrator.logs import log_event
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import queue as queue_store
from kici.orchestrator.store.agents import Registration

MAX_GROUP = 500
"""Items written in one transaction at most (a statement's IN list and parameter sets)."""

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Registered:
    refused: bool
    """Another token registered this agent id first: nothing was written."""
    holds_jobs: bool
    """Queue rows are dispatched to the agent or recovering for it: its registration must reclaim or
    settle them (`store.queue.reclaim`)."""


@dataclass(frozen=True)
class Disconnect:
    agent_id: str
    last_seen_at: dt.datetime
    recovery_deadline: dt.datetime
    """Until when the jobs it held stay `recovering` for it (`store.queue.release_agent_jobs`)."""
    node_id: str | None = None
    """The node whose connection ended: the row changes only while it still names that node (the agent may
    have reconnected to a sibling first; then that connection owns the jobs)."""


class GroupCommit(Generic[T, R]):
    """Items submitted while a group is being written form the next group; `write(items)` writes a group
    in one transaction and returns one result per item."""

    def __init__(self, write: Callable[[list[T]], Awaitable[list[R]]], name: str) -> None:
        self._write = write
        self._name = name
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Write `item` with the others of its group; its result once committed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=self._name)
        return await future

    async def _run(self) -> None:
        while self._pending:
            group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            live = [(item, future) for item, future in group if not future.done()]  # a session may be gone
            try:
                if live:
                    await self._commit(live)
            except BaseException as exc:  # cancelled (shutdown) or a bug: nobody may wait forever
                for _, future in [*live, *self._pending]:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("stopping"))
                self._pending = []
                raise

    async def _commit(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._write([item for item, _ in group])
        except Exception as exc:
            if len(group) == 1:
                group[0][1].set_exception(exc)
                return
            log_event("agent.writes_retried_alone", level="warning", writes=self._name, items=len(group),
                      error=f"{type(exc).__name__}: {exc}")
            for item, future in group:
                try:
                    result = (await self._write([item]))[0]
                except Exception as alone:
                    if not future.done():
                        future.set_exception(alone)
                else:
                    if not future.done():
                        future.set_result(result)
            return
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)


class AgentWrites:
    def __init__(self, database: Database) -> None:
        self.database = database
        self._registrations = GroupCommit(self._register, "kici-agent-registrations")
        self._disconnects = GroupCommit(self._disconnect, "kici-agent-disconnects")
        self._seen: dict[str, dt.datetime] = {}
        self._seen_flush: asyncio.TimerHandle | None = None
        self._seen_writes: set[asyncio.Task[None]] = set()

    async def register(self, registration: Registration) -> Registered:
        """Mark the agent's row connected (`store.agents.register_agents`); what that found."""
        return await self._registrations.submit(registration)

    async def disconnect(self, disconnect: Disconnect) -> list[str]:
        """Mark the agent's row disconnected and its jobs `recovering` (`store.queue.release_agent_jobs`);
        the job ids released."""
        return await self._disconnects.submit(disconnect)

    async def _register(self, registrations: list[Registration]) -> list[Registered]:
        async with self.database.transaction() as conn:
            refused = await agent_store.register_agents(conn, registrations)
            holding = await queue_store.agents_holding_jobs(conn, [r.agent_id for r in registrations])
        return [Registered(r.agent_id in refused, r.agent_id in holding) for r in registrations]

    async def _disconnect(self, disconnects: list[Disconnect]) -> list[list[str]]:
        released: dict[str, list[str]] = {}
        async with self.database.transaction() as conn:
            anywhere = [d for d in disconnects if d.node_id is None]
            await agent_store.mark_agents_disconnected(conn, {d.agent_id: d.last_seen_at for d in anywhere})
            still_ours = {d.agent_id for d in anywhere}
            for d in disconnects:
                if d.node_id is not None and await agent_store.mark_agent_disconnected(
                    conn, d.agent_id, last_seen_at=d.last_seen_at, node_id=d.node_id
                ):
                    still_ours.add(d.agent_id)
            holding = await queue_store.agents_holding_jobs(conn, sorted(still_ours))
            for d in disconnects:
                if d.agent_id in holding:
                    released[d.agent_id] = await queue_store.release_agent_jobs(
                        conn, d.agent_id, recovery_deadline=d.recovery_deadline
                    )
        return [released.get(d.agent_id, []) for d in disconnects]

    # -- last seen ---------------------------------------------------------------------------------

    def seen(self, agent_id: str, at: dt.datetime, *, interval_s: float) -> None:
        """The agent sent a heartbeat at `at`: its row's `last_seen_at` says so within `interval_s`."""
        self._seen[agent_id] = at
        if self._seen_flush is None:
            self._seen_flush = asyncio.get_running_loop().call_later(interval_s, self._flush_seen)

    def forget_seen(self, agent_id: str) -> None:
        """The agent's connection ended: its row gets its last-seen time with the disconnect instead."""
        self._seen.pop(agent_id, None)

    def _flush_seen(self) -> None:
        self._seen_flush = None
        seen, self._seen = self._seen, {}
        if seen:
            task = asyncio.create_task(self._write_seen(seen), name="kici-agent-last-seen")
            self._seen_writes.add(task)
            task.add_done_callback(self._seen_writes.discard)

    async def _write_seen(self, seen: dict[str, dt.datetime]) -> None:
        try:
            async with self.database.transaction() as conn:
                await agent_store.touch_agents(conn, seen)
        except Exception as exc:  # informational: the agents' next heartbeats write it again
            log_event("agent.last_seen_write_failed", level="warning", agents=len(seen),
                      error=f"{type(exc).__name__}: {exc}")
