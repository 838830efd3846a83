"""The agents connected to this orchestrator process, for the dispatcher to find and talk to.

The registry holds only registered connections (an agent that has not sent `agent.register` yet is not
in it). It is per process and in memory; the `agents` table says what is connected cluster-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Gauge
from starlette.websockets import WebSocket

from kici.engine.protocol import (
    AgentMessage,
    AgentStatus,
    AuthFailure,
    CloseCode,
    Message,
    close_reason,
    encode,
)
from kici.orchestrator.agents.token_cache import AgentTokenCache
from kici.orchestrator.agents.writes import AgentWrites
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.metrics import Metrics

SEND_TIMEOUT_S = 5.0


class AgentListener(Protocol):
    """What the dispatcher learns from agent sessions. Every method is awaited inside the session's
    receive loop, so an agent's messages are handled one after the other, in order."""

    async def registered(self, agent: AgentConnection) -> list[str]:
        """The agent registered (before `register.ack`): reclaim its in-flight jobs; the ids accepted."""
        ...

    async def ready(self, agent: AgentConnection) -> None:
        """`register.ack` was sent: the agent may be given work."""
        ...

    async def status(self, agent: AgentConnection) -> None:
        """A new `agent.status` (in `agent.status`)."""
        ...

    async def message(self, agent: AgentConnection, message: AgentMessage) -> None:
        """Any other valid post-registration message except `heartbeat`."""
        ...

    async def disconnected(self, agent: AgentConnection, released: list[str]) -> None:
        """The connection ended (not replaced by a newer one); `released` jobs went `recovering`."""
        ...

    async def sync(self, agent: AgentConnection) -> None:
        """`delivery.sync`: return once everything the agent sent before it is durable (the session then
        answers `delivery.synced`); raises when it cannot be made so."""
        ...


@dataclass(eq=False)
class AgentConnection:
    """One registered agent connection. Fields are facts from its `agent.register`; `status` and the
    `last_*` times change while it is connected."""

    agent_id: str
    connection_id: str
    token_id: str
    org_id: str
    labels: tuple[str, ...]
    max_concurrency: int
    version: str | None
    hostname: str | None
    platform: str | None
    arch: str | None
    in_flight_jobs: tuple[tuple[str, str], ...]
    """(run_id, job_id) pairs the agent reported at registration."""
    websocket: WebSocket = field(repr=False)
    connected_at: dt.datetime = field(default_factory=utcnow)
    last_seen_at: dt.datetime = field(default_factory=utcnow)
    last_seen_monotonic: float = field(default_factory=time.monotonic)
    status: AgentStatus | None = None
    """The last `agent.status` (active jobs, draining), None until the agent sends one."""
    holds_jobs: bool = False
    """Its registration found queue rows dispatched to it or recovering for it: the listener must reclaim
    or settle them (when False and the agent reports no in-flight jobs, there is nothing to do)."""
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def seen(self) -> None:
        self.last_seen_at = utcnow()
        self.last_seen_monotonic = time.monotonic()

    async def send(self, message: Message) -> None:
        """Send one message; frames from concurrent senders never interleave. Raises if the socket is gone,
        and `TimeoutError` when the agent has not taken the frame within `SEND_TIMEOUT_S` (a peer that stops
        reading must not stall the dispatcher, which sends from one loop)."""
        async with asyncio.timeout(SEND_TIMEOUT_S):
            async with self._send_lock:
                await self.websocket.send_text(encode(message))

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # already closed by the peer or by ourselves
            await self.websocket.close(code=code, reason=close_reason(reason))


class AgentRegistry:
    """Registered agent connections of this process, by agent id.

    Public API (for the dispatcher): `connected_agents()`, `get(agent_id)`, `send(agent_id, message)`,
    and `listener`, told about registrations, statuses, job messages and disconnects.
    `claim`/`release`/`lock` are the session's.
    """

    def __init__(self, database: Database, metrics: Metrics | None = None) -> None:
        self._agents: dict[str, AgentConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.listener: AgentListener | None = None
        self.tokens = AgentTokenCache()
        """Agent tokens as this process last read them (sessions authenticate and re-check through it)."""
        self.writes = AgentWrites(database)
        """The sessions' registrations and last-seen times, written grouped."""
        self._gauge: Gauge | None = None
        if metrics is not None:
            self._gauge = Gauge(
                "kici_agents_connected",
                "Agents with a registered WebSocket connection to this orchestrator process.",
                registry=metrics.registry,
            )
            self._gauge.set(0)

    def connected_agents(self) -> list[AgentConnection]:
        """The registered connections, oldest first."""
        return sorted(self._agents.values(), key=lambda a: a.connected_at)

    def get(self, agent_id: str) -> AgentConnection | None:
        return self._agents.get(agent_id)

    def __len__(self) -> int:
        return len(self._agents)

    async def send(self, agent_id: str, message: Message) -> bool:
        """Send `message` to the agent; False when it is not connected here or the send failed (the
        session notices the broken socket and cleans up)."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return False
        try:
            await agent.send(message)
        except Exception:
            return False
        return True

    async def disconnect_token(self, token_id: str, reason: str) -> list[str]:
        """Close every connection of this process authenticated with `token_id` (`auth.failure` + 4010: the
        agent stops instead of reconnecting); new connections with it are refused from now on. The agent ids
        closed."""
        self.tokens.forget(token_id)
        closed: list[str] = []
        for agent in [a for a in self._agents.values() if a.token_id == token_id]:
            with contextlib.suppress(Exception):  # the peer may be gone already; close anyway
                await agent.send(AuthFailure(reason=reason))
            await agent.close(CloseCode.AUTH_FAILED, reason)
            closed.append(agent.agent_id)
        return closed

    def lock(self, agent_id: str) -> asyncio.Lock:
        """Serialises registration and disconnect handling of one agent id, so the `agents` row always
        ends up describing the connection that is in the registry."""
        return self._locks.setdefault(agent_id, asyncio.Lock())

    def claim(self, agent: AgentConnection) -> AgentConnection | None:
        """Make `agent` the agent id's connection; the connection it replaces (same token), if any."""
        previous = self._agents.get(agent.agent_id)
        self._agents[agent.agent_id] = agent
        self._update_gauge()
        return previous

    def release(self, agent: AgentConnection) -> bool:
        """Forget `agent` if it is still the agent id's connection (not replaced by a newer one)."""
        if self._agents.get(agent.agent_id) is not agent:
            return False
        del self._agents[agent.agent_id]
        self._update_gauge()
        return True

    def _update_gauge(self) -> None:
        if self._gauge is not None:
            self._gauge.set(len(self._agents))
