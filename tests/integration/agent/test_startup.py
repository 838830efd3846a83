"""Start-up of the real `kici-agent` process: settings errors, the handshake, registration, health."""

from __future__ import annotations

import asyncio
import platform
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from kici.agent import config_docs
from kici.agent.build_info import kici_build_hash
from kici.agent.config import load_settings, websocket_url
from kici.agent.connection import backoff_delay_ms
from tests.conftest import kici_env

from .conftest import TOKEN, AgentFactory, FakeOrchestrator, free_port

pytestmark = pytest.mark.timeout(90)


def run_agent(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kici.agent"], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"KICI_ORCHESTRATOR_URL": None}, "KICI_ORCHESTRATOR_URL: is required"),
        ({"KICI_AGENT_TOKEN": None}, "KICI_AGENT_TOKEN: is required"),
        ({"KICI_LABELS": "linux,kici:gpu"}, "KICI_LABELS: agent label 'kici:gpu' uses the reserved 'kici:' prefix"),
        ({"KICI_MAX_CONCURENCY": "2"}, "unknown variable KICI_MAX_CONCURENCY (did you mean KICI_MAX_CONCURRENCY?)"),
        ({"KICI_ORCHESTRATOR_URL": "ftp://x"}, "KICI_ORCHESTRATOR_URL: must be an http://, https://, ws:// or wss://"),
        ({"KICI_SANDBOX": "docker"}, "KICI_SANDBOX: Input should be 'process', 'userns' or 'bwrap'"),
    ],
)
def test_bad_settings_exit_2_with_one_line_per_problem(
    agent_env: Callable[..., dict[str, str]], settings: dict[str, str | None], expected: str
) -> None:
    env = agent_env(None, KICI_ORCHESTRATOR_URL="http://127.0.0.1:9")
    for key, value in settings.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    out = run_agent(env)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert TOKEN not in out.stderr
    assert all(line.startswith("kici-agent: ") for line in out.stderr.splitlines())


def test_several_problems_are_reported_at_once_and_dev_mode_only_warns() -> None:
    env = {"KICI_TYPO": "1", "KICI_LABELS": "kici:x", "KICI_MAX_CONCURRENCY": "0"}
    with pytest.raises(Exception) as info:
        load_settings(env)
    lines = info.value.lines  # type: ignore[attr-defined]
    assert any(line.startswith("unknown variable KICI_TYPO") for line in lines)
    assert any(line.startswith("KICI_LABELS:") for line in lines)
    assert any(line.startswith("KICI_MAX_CONCURRENCY:") for line in lines)
    assert any(line.startswith("KICI_ORCHESTRATOR_URL: is required") for line in lines)
    settings, warnings = load_settings({"KICI_TYPO": "1", "KICI_DEV": "true", "KICI_ORCHESTRATOR_URL": "https://c/o",
                                        "KICI_AGENT_TOKEN": "t", "KICI_WORK_DIR": "/tmp/x",
                                        "KICI_ENV": "/tmp/env", "KICI_RUN_ID": "r"})
    assert warnings and "KICI_TYPO" in warnings[0]
    assert settings.websocket_urls == ["wss://c/o/ws"]


def test_several_orchestrator_urls_are_validated_one_by_one() -> None:
    base = {"KICI_AGENT_TOKEN": "t", "KICI_WORK_DIR": "/tmp/x"}
    settings, _ = load_settings({**base, "KICI_ORCHESTRATOR_URL": " wss://a.example/ , https://b.example/orch,ws://c:4000/ws"})
    assert settings.websocket_urls == ["wss://a.example/ws", "wss://b.example/orch/ws", "ws://c:4000/ws"]
    for given, problem in [
        ("wss://a,ftp://b", "entry 2 ('ftp://b') must be an http://, https://, ws:// or wss:// URL"),
        ("wss://a,,wss://b", "entry 2 is empty (a stray comma?)"),
        ("wss://a,wss://a/ws", "entry 2 ('wss://a/ws') names the same orchestrator as an earlier entry"),
        ("wss://a,wss://b?x=1", "entry 2 ('wss://b?x=1') must not have a query or fragment"),
    ]:
        with pytest.raises(Exception) as info:
            load_settings({**base, "KICI_ORCHESTRATOR_URL": given})
        assert any(line.startswith("KICI_ORCHESTRATOR_URL:") and problem in line
                   for line in info.value.lines), (given, info.value.lines)  # type: ignore[attr-defined]


def test_websocket_url_and_backoff() -> None:
    assert websocket_url("http://h:4000") == "ws://h:4000/ws"
    assert websocket_url("https://h/base/") == "wss://h/base/ws"
    assert websocket_url("wss://h/b") == "wss://h/b/ws"
    # the WebSocket endpoint itself is accepted as well as the base URL
    for given in ("ws://h:4000", "ws://h:4000/", "ws://h:4000/ws", "ws://h:4000/ws/", "http://h:4000/ws"):
        assert websocket_url(given) == "ws://h:4000/ws", given
    assert websocket_url("wss://h/orch/ws") == websocket_url("https://h/orch") == "wss://h/orch/ws"
    assert [backoff_delay_ms(n, 60_000, rand=0) for n in range(3)] == [1000, 1500, 2250]
    assert backoff_delay_ms(2, 60_000, rand=1) == 2250 * 1.5
    assert backoff_delay_ms(40, 60_000, rand=0.5) == 60_000


def test_configuration_page_is_up_to_date(tmp_path: Path) -> None:
    page = Path(__file__).resolve().parents[3] / "docs" / "operator" / "agent" / "configuration.md"
    assert page.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/operator/agent/configuration.md is stale: run `.venv/bin/python -m kici.agent.config_docs`"
    )
    out = tmp_path / "c.md"
    assert config_docs.main(["--output", str(out), "--check"]) == 1
    assert config_docs.main(["--output", str(out)]) == 0
    assert config_docs.main(["--output", str(out), "--check"]) == 0


async def test_auth_failure_exits_non_zero_with_the_reason_and_does_not_retry(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory
) -> None:
    orchestrator.auth_failure = "agent token revoked"
    agent = start_agent(orchestrator)
    assert await agent.wait_exit() == 1
    assert "the orchestrator rejected this agent: agent token revoked" in agent.output
    assert len(orchestrator.connections) == 1
    assert orchestrator.connections[0].auth == {"type": "auth.request", "token": TOKEN, "protocolVersion": 1}


async def test_close_4001_during_auth_is_fatal_too(orchestrator: FakeOrchestrator, start_agent: AgentFactory) -> None:
    orchestrator.close_code_on_auth = 4001
    agent = start_agent(orchestrator)
    assert await agent.wait_exit() == 1
    assert "rejected this agent: token revoked" in agent.output
    assert len(orchestrator.connections) == 1


async def test_register_fields_auto_labels_status_heartbeats_and_stable_id(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    orchestrator.base_path = "/orch"
    agent = start_agent(orchestrator, KICI_LABELS="linux, gpu", KICI_MAX_CONCURRENCY="3")
    conn = await orchestrator.wait_registered()
    reg = conn.register
    assert reg is not None
    host = socket.gethostname().split(".")[0]
    assert reg["agent_id"].startswith(f"{host}-") and reg["message_id"]
    assert reg["labels"][:2] == ["linux", "gpu"]
    machine = platform.machine().lower()
    assert {"kici:os:linux", f"kici:arch:{machine}", f"kici:host:{host.lower()}"} <= set(reg["labels"])
    assert reg["max_concurrency"] == 3 and reg["platform"] == "linux" and reg["arch"] == platform.machine()
    assert reg["hostname"] == host and reg["cpu_count"] >= 1 and reg["total_memory_mb"] > 0
    assert reg["running_as_uid"] is not None and reg["version"] and reg["in_flight_jobs"] == []
    assert conn.messages[0] == {"type": "agent.status", "active_jobs": 0, "draining": False}
    await orchestrator.wait_message(lambda m: m["type"] == "heartbeat", what="heartbeat")
    saved = (tmp_path / "agent-work" / "agent-id").read_text().strip()
    assert saved == reg["agent_id"]
    agent.signal(15)
    assert await agent.wait_exit() == 0
    # a restart keeps the id
    again = start_agent(orchestrator)
    conn = await orchestrator.wait_registered(count=2)
    assert conn.register is not None and conn.register["agent_id"] == saved
    again.signal(15)
    assert await again.wait_exit() == 0


async def test_health_ready_and_metrics(orchestrator: FakeOrchestrator, start_agent: AgentFactory) -> None:
    port = free_port()
    await orchestrator.stop()  # not reachable at first: /ready must say so
    agent = start_agent(orchestrator, KICI_PORT=str(port))
    base = f"http://127.0.0.1:{port}"

    async def get(path: str) -> httpx.Response | None:
        try:
            async with httpx.AsyncClient() as client:
                return await client.get(base + path, timeout=5)
        except httpx.HTTPError:
            return None

    async def poll(path: str, status: int) -> httpx.Response:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            response = await get(path)
            if response is not None and response.status_code == status:
                return response
            assert asyncio.get_running_loop().time() < deadline, f"{path} never answered {status}"
            await asyncio.sleep(0.02)

    health = await poll("/health", 200)
    assert health.json()["connected"] is False and health.json()["active_jobs"] == 0
    assert health.json()["kici_hash"] == kici_build_hash()
    await poll("/ready", 503)
    await orchestrator.start(orchestrator.port)
    await orchestrator.wait_registered()
    await poll("/ready", 200)
    metrics = await poll("/metrics", 200)
    assert "kici_agent_connection_status 1" in metrics.text
    assert "# TYPE kici_agent_jobs_active gauge" in metrics.text
    agent.signal(15)
    assert await agent.wait_exit() == 0


def test_userns_requested_but_unavailable_refuses_to_start(agent_env: Callable[..., dict[str, str]],
                                                          tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: write failed /proc/self/uid_map: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = agent_env(None, KICI_ORCHESTRATOR_URL="http://127.0.0.1:9", KICI_SANDBOX="userns")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = run_agent(env)
    assert out.returncode == 2
    assert "KICI_SANDBOX=userns: unprivileged user namespaces are not available here" in out.stderr
    assert "Operation not permitted" in out.stderr


def test_help_and_version() -> None:
    env = kici_env()
    out = subprocess.run([sys.executable, "-m", "kici.agent", "--version"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("kici-agent ")


async def test_dev_mode_starts_despite_an_unknown_variable(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory
) -> None:
    agent = start_agent(orchestrator, KICI_DEV="true", KICI_LABLES="oops")
    await orchestrator.wait_registered()
    warnings = agent.events("config.warning")
    assert warnings and "KICI_LABLES" in warnings[0]["message"]
    assert "did you mean KICI_LABELS?" in warnings[0]["message"]
    agent.signal(15)
    assert await agent.wait_exit() == 0


def test_refuses_to_start_without_git(agent_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    env = agent_env(None, KICI_ORCHESTRATOR_URL="http://127.0.0.1:9")
    env["PATH"] = str(tmp_path / "empty-bin")
    out = run_agent(env)
    assert out.returncode == 2
    assert "git was not found on PATH" in out.stderr
