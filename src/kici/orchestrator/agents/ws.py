"""The agents' WebSocket route, `{KICI_BASE_PATH}/ws` (see `kici.orchestrator.agents.session`)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from kici.orchestrator.agents.registry import AgentRegistry
from kici.orchestrator.agents.session import AgentSession, AgentTimeouts
from kici.orchestrator.container import AppState

router = APIRouter(tags=["agents"])


@router.websocket("/ws")
async def agent_socket(websocket: WebSocket) -> None:
    state: AppState = websocket.app.state.kici
    registry: AgentRegistry = websocket.app.state.agents
    timeouts: AgentTimeouts = websocket.app.state.agent_timeouts
    session = AgentSession(
        websocket, database=state.database, settings=state.settings, registry=registry, timeouts=timeouts,
        node_id=state.node_id or None,
    )
    await session.run()
