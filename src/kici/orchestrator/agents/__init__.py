"""Agent connections: the `/ws` endpoint, the handshake and liveness of each connection, and the
registry of connected agents the dispatcher sends through.

`mount_agents(app, prefix)` installs it: the route `{prefix}/ws`, `app.state.agents` (an `AgentRegistry`)
and `app.state.agent_timeouts` (an `AgentTimeouts`; tests replace it with shorter limits).
"""

from __future__ import annotations

from fastapi import FastAPI

from kici.orchestrator.agents.registry import AgentConnection, AgentListener, AgentRegistry
from kici.orchestrator.agents.session import AgentSession, AgentTimeouts

__all__ = [
    "AgentConnection",
    "AgentListener",
    "AgentRegistry",
    "AgentSession",
    "AgentTimeouts",
    "agent_registry",
    "mount_agents",
]


def mount_agents(app: FastAPI, prefix: str = "", *, timeouts: AgentTimeouts | None = None) -> AgentRegistry:
    """Add the agents' WebSocket route and registry to an orchestrator app (after `app.state.kici`)."""
    from kici.orchestrator.agents.ws import router

    registry = AgentRegistry(app.state.kici.database, app.state.kici.metrics)
    app.state.agents = registry
    app.state.agent_timeouts = timeouts or AgentTimeouts()
    app.include_router(router, prefix=prefix)
    return registry


def agent_registry(app: FastAPI) -> AgentRegistry:
    registry: AgentRegistry = app.state.agents
    return registry
