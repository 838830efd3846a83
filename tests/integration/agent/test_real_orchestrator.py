"""The agent against the real `kici-orchestrator` process of this tree (embedded SQLite): the handshake,
registration with self-reported labels, heartbeats and status, and the orchestrator's refusals. The
dispatcher is not part of this tree yet, so jobs are exercised against the fake orchestrator."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from kici.runner import toolchains
from tests.integration.orchestrator.conftest import StartOrchestrator, start_orchestrator  # noqa: F401

from .conftest import AgentFactory, wait_until

pytestmark = pytest.mark.timeout(120)


async def _agent_token(url: str, data: Path, labels: list[str], *, root_steps: bool | None = None) -> str:
    """A new agent token. The tests run as root, where `nobody` cannot run the test venv's Python, so the
    agent's steps run as root: by default the token allows that when the tests run as root."""
    admin = (data / "bootstrap-admin-token").read_text().strip()
    allow = os.geteuid() == 0 if root_steps is None else root_steps
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as client:
        response = await client.post("/api/v1/admin/agent-tokens",
                                     json={"name": "pool", "labels": labels, "allow_root_steps": allow})
        assert response.status_code == 201, response.text
        return str(response.json()["token"])


async def test_registers_with_the_real_orchestrator_and_is_refused_outside_its_token(
    start_orchestrator: StartOrchestrator, start_agent: AgentFactory, tmp_path: Path  # noqa: F811
) -> None:
    data = tmp_path / "orch-data"
    orchestrator = start_orchestrator({"KICI_DATA_DIR": str(data), "KICI_BASE_PATH": "/ci"})
    await asyncio.to_thread(orchestrator.wait_for_event, "orchestrator.ready")
    url = orchestrator.url
    token = await _agent_token(url, data, ["linux", "docker"])

    agent = start_agent(KICI_ORCHESTRATOR_URL=url, KICI_AGENT_TOKEN=token, KICI_LABELS="linux")
    registered = await asyncio.to_thread(orchestrator.wait_for_event, "agent.registered")
    assert registered["labels"][0] == "linux"
    assert any(label.startswith("kici:os:") for label in registered["labels"])
    assert any(label.startswith("kici:host:") for label in registered["labels"])
    await wait_until(lambda: agent.events("connection.registered"), 20, "the agent to see register.ack")
    agent.signal(15)
    assert await agent.wait_exit() == 0
    disconnected = await asyncio.to_thread(orchestrator.wait_for_event, "agent.disconnected")
    assert disconnected["close_code"] == 1000
    # nothing the agent sent was refused as invalid
    assert not [e for e in orchestrator.events() if e.get("event") == "agent.session_error"]
    assert not [e for e in orchestrator.events() if e.get("close_code") == 4003]

    # a label outside the token's list: refused, exit 1, no retry
    refused = start_agent(KICI_ORCHESTRATOR_URL=url, KICI_AGENT_TOKEN=token, KICI_LABELS="gpu")
    assert await refused.wait_exit() == 1
    assert "rejected this agent: label 'gpu' is not allowed by this agent token" in refused.output

    # an unknown token: refused the same way
    unknown = start_agent(KICI_ORCHESTRATOR_URL=url, KICI_AGENT_TOKEN="kat_" + "0" * 64)
    assert await unknown.wait_exit() == 1
    assert "rejected this agent: invalid or revoked agent token" in unknown.output
    orchestrator.stop()


@pytest.mark.parametrize("base_path", ["", "/orch"])
async def test_every_form_of_the_orchestrator_url_connects(
    start_orchestrator: StartOrchestrator, start_agent: AgentFactory, tmp_path: Path, base_path: str  # noqa: F811
) -> None:
    """Operators write the base URL, the same with a slash, or the WebSocket endpoint itself (`…/ws`):
    each must reach `/ws` (a doubled `/ws/ws` was refused with 403 and retried forever)."""
    data = tmp_path / "orch-data"
    env = {"KICI_DATA_DIR": str(data)}
    if base_path:
        env["KICI_BASE_PATH"] = base_path
    orchestrator = start_orchestrator(env)
    await asyncio.to_thread(orchestrator.wait_for_event, "orchestrator.ready")
    url = orchestrator.url.rstrip("/")
    assert url.startswith("http://") and url.endswith(base_path)
    token = await _agent_token(url, data, ["linux"])
    host_url = url.removeprefix("http://")
    forms = [f"ws://{host_url}", f"ws://{host_url}/", f"ws://{host_url}/ws", f"http://{host_url}/ws/", url]
    for form in forms:
        agent = start_agent(KICI_ORCHESTRATOR_URL=form, KICI_AGENT_TOKEN=token, KICI_LABELS="linux")
        await wait_until(lambda agent=agent: agent.events("connection.registered"), 20,  # type: ignore[misc]
                         f"the agent given {form} to register")
        agent.signal(15)
        assert await agent.wait_exit() == 0, agent.output
    orchestrator.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: an agent running steps as root")
async def test_a_root_agent_running_root_steps_needs_a_token_that_allows_them(
    start_orchestrator: StartOrchestrator, start_agent: AgentFactory, tmp_path: Path  # noqa: F811
) -> None:
    data = tmp_path / "orch-data"
    orchestrator = start_orchestrator({"KICI_DATA_DIR": str(data)})
    await asyncio.to_thread(orchestrator.wait_for_event, "orchestrator.ready")
    plain = await _agent_token(orchestrator.url, data, ["linux"], root_steps=False)
    refused = start_agent(KICI_ORCHESTRATOR_URL=orchestrator.url, KICI_AGENT_TOKEN=plain, KICI_AGENT_STEP_USER="root")
    assert await refused.wait_exit() == 1
    assert "would run job steps as root and its token does not allow root steps" in refused.output
    rooted = await _agent_token(orchestrator.url, data, ["linux"], root_steps=True)
    agent = start_agent(KICI_ORCHESTRATOR_URL=orchestrator.url, KICI_AGENT_TOKEN=rooted, KICI_AGENT_STEP_USER="root",
                        KICI_AGENT_ID="root-steps-ok")
    await wait_until(lambda: agent.events("connection.registered"), 20, "the agent to register")
    agent.signal(15)
    assert await agent.wait_exit() == 0
    orchestrator.stop()


async def test_revoking_the_token_stops_the_running_agent_at_once(
    start_orchestrator: StartOrchestrator, start_agent: AgentFactory, tmp_path: Path  # noqa: F811
) -> None:
    data = tmp_path / "orch-data"
    orchestrator = start_orchestrator({"KICI_DATA_DIR": str(data)})
    await asyncio.to_thread(orchestrator.wait_for_event, "orchestrator.ready")
    token = await _agent_token(orchestrator.url, data, ["linux"])
    agent = start_agent(KICI_ORCHESTRATOR_URL=orchestrator.url, KICI_AGENT_TOKEN=token, KICI_LABELS="linux")
    await wait_until(lambda: agent.events("connection.registered"), 20, "the agent to register")
    admin = (data / "bootstrap-admin-token").read_text().strip()
    async with httpx.AsyncClient(base_url=orchestrator.url, headers={"Authorization": f"Bearer {admin}"}) as client:
        [listed] = (await client.get("/api/v1/admin/agent-tokens")).json()
        assert (await client.delete(f"/api/v1/admin/agent-tokens/{listed['id']}")).status_code == 200
    assert await agent.wait_exit(timeout=10) == 1  # well before any heartbeat or token re-check interval
    assert "rejected this agent: agent token revoked" in agent.output
    orchestrator.stop()


async def test_python_labels_register_without_being_in_the_token_scope(
    start_orchestrator: StartOrchestrator, start_agent: AgentFactory, tmp_path: Path  # noqa: F811
) -> None:
    """`kici:python:*` are facts the agent reports (toolchains.md): a token scoped to `linux` accepts them."""
    data = tmp_path / "orch-data"
    orchestrator = start_orchestrator({"KICI_DATA_DIR": str(data)})
    await asyncio.to_thread(orchestrator.wait_for_event, "orchestrator.ready")
    token = await _agent_token(orchestrator.url, data, ["linux"])
    found = await toolchains.detect(log=lambda *a, **k: None)
    if not found:
        pytest.skip("no Python interpreter besides the agent's own on this machine")
    pythons = ",".join(i.path for i in found)
    agent = start_agent(KICI_ORCHESTRATOR_URL=orchestrator.url, KICI_AGENT_TOKEN=token, KICI_LABELS="linux",
                        KICI_PYTHONS=pythons)
    registered = await asyncio.to_thread(orchestrator.wait_for_event, "agent.registered")
    assert set(toolchains.labels(found)) <= set(registered["labels"])
    await wait_until(lambda: agent.events("connection.registered"), 20, "the agent to see register.ack")
    orchestrator.stop()
