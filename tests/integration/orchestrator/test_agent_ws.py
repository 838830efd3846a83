"""The agents' WebSocket (`/ws`): handshake, registration, liveness and disconnect, over real sockets.

Each test serves the app with uvicorn on a free port inside the test's event loop (so the database
fixture's engine is usable by the handlers) and connects with the `websockets` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kici.engine.protocol import PROTOCOL_VERSION, ErrorMessage
from kici.orchestrator.agents import AgentRegistry, AgentTimeouts, agent_registry
from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db.database import Database
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store.tokens import create_agent_token, revoke_agent_token

from .conftest import StartOrchestrator
from .dispatch_harness import serve_app

FAST = AgentTimeouts(auth_s=0.5, register_s=0.5, heartbeat_unhealthy_s=20, heartbeat_timeout_s=30, last_seen_write_s=0)


@dataclass
class Orchestrator:
    app: Any
    database: Database
    url: str
    token: str
    token_id: str

    @property
    def registry(self) -> AgentRegistry:
        return agent_registry(self.app)

    def set_timeouts(self, timeouts: AgentTimeouts) -> None:
        self.app.state.agent_timeouts = timeouts


@pytest.fixture
async def orchestrator(database: Database, tmp_path: Path) -> AsyncIterator[Orchestrator]:
    settings = Settings(data_dir=tmp_path, database_url=database.url, base_path="/ci")
    app = create_app(settings, database)
    app.state.agent_timeouts = FAST
    async with database.transaction() as conn:
        created = await create_agent_token(conn, name="builders", labels=["linux", "docker"])
    async with serve_app(app, lifespan="off") as port:
        yield Orchestrator(app, database, f"ws://127.0.0.1:{port}/ci/ws", created.plaintext, created.token.id)


@contextlib.asynccontextmanager
async def agent_socket(orch: Orchestrator) -> AsyncIterator[ClientConnection]:
    ws = await connect(orch.url, open_timeout=5, close_timeout=2)
    try:
        yield ws
    finally:
        await ws.close()


async def send(ws: ClientConnection, message: dict[str, Any] | str) -> None:
    await ws.send(message if isinstance(message, str) else json.dumps(message))


async def recv(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(5):
        data: dict[str, Any] = json.loads(await ws.recv())
    return data


async def until_closed(ws: ClientConnection, within: float = 5.0) -> tuple[list[dict[str, Any]], int | None, str]:
    """Every message the server sends until it closes the socket, the close code and reason."""
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        try:
            while True:
                received.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
    return received, ws.close_code, ws.close_reason or ""


def auth(token: str, version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    return {"type": "auth.request", "token": token, "protocolVersion": version}


def register(agent_id: str = "agent-1", labels: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "agent.register", "message_id": "m-1", "agent_id": agent_id, "labels": labels or [], **extra}


async def authenticated(ws: ClientConnection, orch: Orchestrator) -> str:
    await send(ws, auth(orch.token))
    reply = await recv(ws)
    assert reply["type"] == "auth.success", reply
    return str(reply["connection_id"])


async def registered(
    ws: ClientConnection, orch: Orchestrator, agent_id: str = "agent-1", labels: list[str] | None = None
) -> dict[str, Any]:
    await authenticated(ws, orch)
    await send(ws, register(agent_id, labels, version="0.1.0", hostname="box", max_concurrency=2))
    ack = await recv(ws)
    assert ack["type"] == "register.ack", ack
    return ack


async def agent_row(orch: Orchestrator, agent_id: str = "agent-1") -> agent_store.AgentRecord | None:
    async with orch.database.read() as conn:
        return await agent_store.get_agent(conn, agent_id)


async def eventually_disconnected(orch: Orchestrator, agent_id: str = "agent-1") -> agent_store.AgentRecord:
    async with asyncio.timeout(5):
        while True:
            row = await agent_row(orch, agent_id)
            if row is not None and not row.connected and orch.registry.get(agent_id) is None:
                return row
            await asyncio.sleep(0.02)


# -- handshake --------------------------------------------------------------------------------------


async def test_silent_client_is_closed_4002(orchestrator: Orchestrator) -> None:
    async with agent_socket(orchestrator) as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, code, _ = await until_closed(ws, within=3)
        assert code == 4002
        assert loop.time() - start < 2.5


async def test_bad_token_gets_auth_failure_and_4010(orchestrator: Orchestrator) -> None:
    async with agent_socket(orchestrator) as ws:
        await send(ws, auth("kat_" + "0" * 64))
        received, code, _ = await until_closed(ws)
    assert code == 4010
    assert [m["type"] for m in received] == ["auth.failure"]


async def test_revoked_token_gets_4010(orchestrator: Orchestrator) -> None:
    async with orchestrator.database.transaction() as conn:
        assert await revoke_agent_token(conn, orchestrator.token_id)
    async with agent_socket(orchestrator) as ws:
        await send(ws, auth(orchestrator.token))
        received, code, _ = await until_closed(ws)
    assert code == 4010 and received[0]["type"] == "auth.failure"


async def test_protocol_version_0_is_closed_4005(orchestrator: Orchestrator) -> None:
    async with agent_socket(orchestrator) as ws:
        await send(ws, auth(orchestrator.token, version=0))
        _, code, reason = await until_closed(ws)
    assert code == 4005 and "protocol version 0" in reason


@pytest.mark.parametrize("frame", ["{not json", json.dumps({"type": "heartbeat", "timestamp": 1.0}), "[]"])
async def test_malformed_or_wrong_first_frame_is_4003(orchestrator: Orchestrator, frame: str) -> None:
    async with agent_socket(orchestrator) as ws:
        await send(ws, frame)
        received, code, _ = await until_closed(ws)
    assert code == 4003
    assert [ErrorMessage.model_validate(m).code for m in received] == ["INVALID_MESSAGE"]


async def test_first_message_after_auth_must_be_register(orchestrator: Orchestrator) -> None:
    async with agent_socket(orchestrator) as ws:
        await authenticated(ws, orchestrator)
        await send(ws, {"type": "heartbeat", "timestamp": 1.0})
        received, code, _ = await until_closed(ws)
    assert code == 4003 and received[0]["code"] == "INVALID_MESSAGE"
    assert await agent_row(orchestrator) is None


async def test_no_register_in_time_is_4002(orchestrator: Orchestrator) -> None:
    async with agent_socket(orchestrator) as ws:
        await authenticated(ws, orchestrator)
        _, code, _ = await until_closed(ws, within=3)
    assert code == 4002


# -- registration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels", [["linux", "gpu"], ["kici:privileged:root"], ["kici:os"], ["bad label"], ["KICI:os:linux"]]
)
async def test_labels_outside_the_token_scope_are_4010(orchestrator: Orchestrator, labels: list[str]) -> None:
    async with agent_socket(orchestrator) as ws:
        await authenticated(ws, orchestrator)
        await send(ws, register(labels=labels))
        received, code, _ = await until_closed(ws)
    assert code == 4010
    assert [m["type"] for m in received] == ["auth.failure"]
    assert await agent_row(orchestrator) is None


async def test_register_stores_connected_row_and_self_labels(
    orchestrator: Orchestrator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kici.orchestrator")
    async with agent_socket(orchestrator) as ws:
        ack = await registered(ws, orchestrator, labels=["linux", "kici:os:linux", "kici:arch:x64", "kici:host:box"])
        assert ack["agent_id"] == "agent-1"
        assert ack["labels"] == ["linux", "kici:os:linux", "kici:arch:x64", "kici:host:box"]
        row = await agent_row(orchestrator)
        assert row is not None and row.connected
        assert (row.agent_token_id, row.max_concurrency, row.version, row.hostname) == (
            orchestrator.token_id, 2, "0.1.0", "box"
        )
        assert row.labels == ack["labels"] and row.last_seen_at is not None
        [agent] = orchestrator.registry.connected_agents()
        assert (agent.agent_id, agent.token_id) == ("agent-1", orchestrator.token_id)
        assert agent.labels == tuple(ack["labels"])
        metrics = orchestrator.app.state.kici.metrics.render().decode()
        assert "kici_agents_connected 1.0" in metrics

        # status is kept in memory, heartbeats move last_seen_at
        await send(ws, {"type": "agent.status", "active_jobs": 1})
        await send(ws, {"type": "heartbeat", "timestamp": 2.0})
        async with asyncio.timeout(5):
            while agent.status is None or (await agent_row(orchestrator)).last_seen_at == row.last_seen_at:  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        assert agent.status.active_jobs == 1

        # the dispatcher's way in
        assert await orchestrator.registry.send("agent-1", ErrorMessage(code="TEST", message="hello"))
        assert await recv(ws) == {"type": "error", "code": "TEST", "message": "hello"}
        assert not await orchestrator.registry.send("nobody", ErrorMessage(code="TEST", message="x"))

    # clean close → disconnected
    row = await eventually_disconnected(orchestrator)
    assert "kici_agents_connected 0.0" in orchestrator.app.state.kici.metrics.render().decode()
    events = [getattr(r, "kici_event", None) for r in caplog.records]
    for name in ("agent.connected", "agent.authenticated", "agent.registered", "agent.disconnected"):
        assert name in events
    assert orchestrator.token not in caplog.text
    assert all(orchestrator.token not in json.dumps(getattr(r, "kici_fields", {}), default=str) for r in caplog.records)


async def test_heartbeat_timeout_is_4004_and_marks_disconnected(orchestrator: Orchestrator) -> None:
    orchestrator.set_timeouts(
        AgentTimeouts(auth_s=1, register_s=1, heartbeat_unhealthy_s=0.3, heartbeat_timeout_s=0.8)
    )
    async with agent_socket(orchestrator) as ws:
        await registered(ws, orchestrator)
        await send(ws, {"type": "heartbeat", "timestamp": 1.0})  # keeps it alive a little longer
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, code, reason = await until_closed(ws, within=3)
        assert code == 4004 and reason == "heartbeat timeout"
        assert 0.5 < loop.time() - start < 2.5
    await eventually_disconnected(orchestrator)


async def test_invalid_frame_after_registration_is_4003(orchestrator: Orchestrator) -> None:
    async with agent_socket(orchestrator) as ws:
        await registered(ws, orchestrator)
        await send(ws, {"type": "job.ack", "job_id": "j"})  # run_id missing
        received, code, _ = await until_closed(ws)
    assert code == 4003 and received[-1]["code"] == "INVALID_MESSAGE"
    await eventually_disconnected(orchestrator)


async def test_agent_id_held_by_another_token_is_4010(orchestrator: Orchestrator) -> None:
    async with orchestrator.database.transaction() as conn:
        other = await create_agent_token(conn, name="other", labels=["linux"])
    async with agent_socket(orchestrator) as first, agent_socket(orchestrator) as second:
        await registered(first, orchestrator)
        await send(second, auth(other.plaintext))
        assert (await recv(second))["type"] == "auth.success"
        await send(second, register("agent-1"))
        received, code, _ = await until_closed(second)
        assert code == 4010 and received[0]["type"] == "auth.failure"
        assert "bound to another agent token" in received[0]["reason"]
        # the first connection is untouched
        row = await agent_row(orchestrator)
        assert row is not None and row.connected and row.agent_token_id == orchestrator.token_id
        assert orchestrator.registry.get("agent-1") is not None


async def test_reconnect_with_the_same_token_replaces_the_old_connection(orchestrator: Orchestrator) -> None:
    async with agent_socket(orchestrator) as first:
        await registered(first, orchestrator)
        async with agent_socket(orchestrator) as second:
            await registered(second, orchestrator)
            _, code, _ = await until_closed(first)
            assert code == 1001
            await asyncio.sleep(0.1)  # the old session's clean-up must not mark the agent disconnected
            row = await agent_row(orchestrator)
            assert row is not None and row.connected
            [agent] = orchestrator.registry.connected_agents()
            assert await orchestrator.registry.send(agent.agent_id, ErrorMessage(code="T", message="to second"))
            assert (await recv(second))["message"] == "to second"
    await eventually_disconnected(orchestrator)


# -- the real process ---------------------------------------------------------------------------------


async def test_kici_orchestrator_process_serves_ws(
    start_orchestrator: StartOrchestrator, database: Database, tmp_path: Path
) -> None:
    """`kici-orchestrator` as deployed (its own uvicorn configuration) serves `{base}/ws`."""
    async with database.transaction() as conn:
        created = await create_agent_token(conn, name="proc", labels=["linux"])
    process = start_orchestrator(
        {
            "KICI_DATA_DIR": str(tmp_path / "data"),
            "KICI_DATABASE_URL": database.url,
            "KICI_BASE_PATH": "/orch",
            "KICI_SECRET_KEY": "cd" * 32,
        }
    )
    await asyncio.to_thread(process.wait_for_event, "orchestrator.ready")
    url = (await asyncio.to_thread(lambda: process.url)).replace("http://", "ws://") + "/ws"
    async with connect(url, open_timeout=5, close_timeout=2) as ws:
        await send(ws, auth(created.plaintext))
        assert (await recv(ws))["type"] == "auth.success"
        await send(ws, register("proc-agent", ["linux", "kici:os:linux"]))
        assert (await recv(ws))["labels"] == ["linux", "kici:os:linux"]
        async with database.read() as conn:
            row = await agent_store.get_agent(conn, "proc-agent")
        assert row is not None and row.connected
    async with asyncio.timeout(10):
        while True:
            async with database.read() as conn:
                row = await agent_store.get_agent(conn, "proc-agent")
            if row is not None and not row.connected:
                break
            await asyncio.sleep(0.05)
    await asyncio.to_thread(process.stop)
    events = {e.get("event") for e in process.events()}
    assert {"agent.registered", "agent.disconnected"} <= events
    assert created.plaintext not in process.stderr
