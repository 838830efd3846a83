"""The real `kici-orchestrator` process: embedded default, PostgreSQL, health/ready/metrics over real HTTP,
base path, bootstrap token, start-up refusals, graceful shutdown. Reference behaviours 34, 35 and 40."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kici.orchestrator.db.migrate import migration_status

from .conftest import OrchestratorProcess, StartOrchestrator, orchestrator_env

TOKEN_RE = re.compile(r"kici_[0-9a-f]{64}")


def get(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, timeout=10)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_cleanly(orchestrator: OrchestratorProcess) -> None:
    start = time.monotonic()
    assert orchestrator.stop(signal.SIGTERM, timeout=15) == 0, orchestrator.stderr
    assert time.monotonic() - start < 10
    assert orchestrator.wait_for_event("orchestrator.stopped", timeout=1)["exit_code"] == 0


def test_embedded_default(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    data = tmp_path / "data"
    orchestrator = start_orchestrator({"KICI_DATA_DIR": str(data)})
    try:
        orchestrator.wait_for_event("orchestrator.ready")
        url = orchestrator.url
        assert url.startswith("http://127.0.0.1:")

        health = get(url, "/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok" and body["version"] and body["uptime_s"] >= 0
        assert body["timestamp"].endswith(("Z", "+00:00"))

        ready = get(url, "/ready")
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")

        metrics = get(url, "/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert re.search(r"^kici_up 1\.0$", metrics.text, re.M)
        assert re.search(r'^kici_http_requests_total\{method="GET",route="/health",status="200"\} 1\.0$',
                         metrics.text, re.M), metrics.text
        assert re.search(r"^kici_ready 1\.0$", metrics.text, re.M)
        assert get(url, "/no/such/route").status_code == 404
        assert 'route="<unmatched>",status="404"' in get(url, "/metrics").text

        # The data dir and its private files.
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        key_file = data / "secret-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert re.fullmatch(r"[0-9a-f]{64}\n", key_file.read_text())
        assert (data / "kici.db").is_file()

        # The bootstrap token: printed once on stderr, in the 0600 file, never in a log line.
        tokens = TOKEN_RE.findall(orchestrator.stderr)
        assert len(tokens) == 1, orchestrator.stderr
        token_file = data / "bootstrap-admin-token"
        assert token_file.read_text().strip() == tokens[0]
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert not any(tokens[0] in json.dumps(event) for event in orchestrator.events())
        created = orchestrator.wait_for_event("bootstrap.admin_token_created", timeout=1)
        assert created["file"] == str(token_file)
    finally:
        stop_cleanly(orchestrator)

    # A restart on the same data dir keeps the key, the token and the schema; prints no new token.
    key = key_file.read_text()
    again = start_orchestrator({"KICI_DATA_DIR": str(data)})
    try:
        again.wait_for_event("orchestrator.ready")
        assert get(again.url, "/ready").status_code == 200
        assert TOKEN_RE.findall(again.stderr) == []
        assert not any(e["event"] == "db.migrated" for e in again.events())
    finally:
        stop_cleanly(again)
    assert key_file.read_text() == key and token_file.read_text().strip() == tokens[0]


def test_database_url_base_path_and_pinned_token(
    start_orchestrator: StartOrchestrator, database_url: str, tmp_path: Path
) -> None:
    pinned = "pinned-admin-token-for-tests"
    orchestrator = start_orchestrator(
        {
            "KICI_DATA_DIR": str(tmp_path / "data"),
            "KICI_DATABASE_URL": database_url,
            "KICI_BASE_PATH": "/orch",
            "KICI_BOOTSTRAP_ADMIN_TOKEN": pinned,
            "KICI_SECRET_KEY": "cd" * 32,
        }
    )
    try:
        orchestrator.wait_for_event("orchestrator.ready")
        base = orchestrator.url
        assert base.endswith("/orch")
        root = base.removesuffix("/orch")
        assert get(root, "/orch/health").status_code == 200
        assert get(root, "/orch/ready").status_code == 200
        metrics = get(root, "/orch/metrics").text
        assert "kici_up 1.0" in metrics
        assert 'kici_http_requests_total{method="GET",route="/health",status="200"} 1.0' in metrics
        assert get(root, "/health").status_code == 404
        assert get(root, "/orch/openapi.json").json()["info"]["title"] == "KiCI orchestrator"
        # Pinned token: nothing printed, no token file; a configured key: no key file.
        assert TOKEN_RE.findall(orchestrator.stderr) == [] and pinned not in orchestrator.stderr
        assert not (tmp_path / "data" / "bootstrap-admin-token").exists()
        assert not (tmp_path / "data" / "secret-key").exists()
        assert asyncio.run(migration_status(database_url)).up_to_date
    finally:
        stop_cleanly(orchestrator)


def test_ready_is_503_while_the_database_is_unreachable(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    orchestrator = start_orchestrator(
        {
            "KICI_DATA_DIR": str(tmp_path / "data"),
            "KICI_DATABASE_URL": f"postgresql://kici:s3cret-pw@127.0.0.1:{closed_port()}/kici",
        }
    )
    try:
        url = orchestrator.url
        orchestrator.wait_for_event("db.unreachable")
        assert get(url, "/health").status_code == 200
        ready = get(url, "/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "starting" and "database unreachable" in ready.json()["reason"]
        assert "s3cret-pw" not in ready.text and "s3cret-pw" not in orchestrator.stderr
        assert "kici_ready 0.0" in get(url, "/metrics").text
    finally:
        stop_cleanly(orchestrator)


def test_unknown_variable_refuses_to_start(start_orchestrator: StartOrchestrator) -> None:
    orchestrator = start_orchestrator({"KICI_QUEUE_MAX_DEPHT": "5"})
    assert orchestrator.wait(timeout=30) == 2
    assert "unknown variable KICI_QUEUE_MAX_DEPHT (did you mean KICI_QUEUE_MAX_DEPTH?)" in orchestrator.stderr


def test_dev_mode_text_logs_and_sigint(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    """KICI_DEV=true turns an unknown variable into a warning; text logs; SIGINT stops cleanly too."""
    orchestrator = start_orchestrator(
        {"KICI_FOOO": "1", "KICI_DEV": "true", "KICI_LOG_FORMAT": "text", "KICI_DATA_DIR": str(tmp_path / "d")}
    )
    try:
        deadline = time.monotonic() + 30
        while "orchestrator.ready" not in orchestrator.stderr:
            assert time.monotonic() < deadline and orchestrator.proc.poll() is None, orchestrator.stderr
            time.sleep(0.05)
        warning = next(line for line in orchestrator.lines if "config.warning" in line)
        assert re.match(r'\d\d:\d\d:\d\d WARNING +config\.warning message="unknown variable KICI_FOOO ignored', warning)
        line = next(line for line in orchestrator.lines if "orchestrator.listening" in line)
        assert re.match(r"\d\d:\d\d:\d\d INFO +orchestrator\.listening host=127\.0\.0\.1 port=\d+", line), line
    finally:
        code = orchestrator.stop(signal.SIGINT, timeout=15)
    assert code == 0, orchestrator.stderr


def test_platform_mode_without_relay_settings_refuses(start_orchestrator: StartOrchestrator) -> None:
    orchestrator = start_orchestrator({"KICI_MODE": "platform"})
    assert orchestrator.wait(timeout=30) == 2
    [line] = [line for line in orchestrator.lines if line.strip()]
    assert "KICI_PLATFORM_URL" in line and "KICI_PLATFORM_TOKEN" in line


def test_bad_value_is_one_line(start_orchestrator: StartOrchestrator) -> None:
    orchestrator = start_orchestrator({"KICI_PORT": "forty"})
    assert orchestrator.wait(timeout=30) == 2
    assert [line for line in orchestrator.lines if line.strip()] == [
        "kici-orchestrator: KICI_PORT: Input should be a valid integer, unable to parse string as an integer "
        "(got 'forty')"
    ]


def test_busy_port_is_a_clear_error(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        orchestrator = start_orchestrator({"KICI_PORT": str(port), "KICI_DATA_DIR": str(tmp_path / "d")})
        assert orchestrator.wait(timeout=30) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in orchestrator.stderr


def test_migrate_command(database_url: str, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = orchestrator_env(tmp_path, {"KICI_DATABASE_URL": database_url, "KICI_DATA_DIR": str(tmp_path / "d")})
        return subprocess.run([sys.executable, "-m", "kici.orchestrator", "migrate", *args], env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)

    status = run("--status")
    assert status.returncode == 0, status.stderr
    assert "current: (empty database)" in status.stdout and "pending: 0001, 0002, 0007" in status.stdout
    applied = run()
    assert applied.returncode == 0 and "applied 0001, 0002, 0007" in applied.stdout


def test_migrate_command_reports_an_unreachable_database(tmp_path: Path) -> None:
    env = orchestrator_env(tmp_path, {"KICI_DATABASE_URL": f"postgresql://kici:pw@127.0.0.1:{closed_port()}/kici"})
    result = subprocess.run([sys.executable, "-m", "kici.orchestrator", "migrate"], env=env, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("kici-orchestrator: cannot migrate postgresql://kici:***@127.0.0.1:") and "pw@" not in line


def test_auto_migrate_false_waits_for_migrations(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    orchestrator = start_orchestrator({"KICI_DATA_DIR": str(tmp_path / "d"), "KICI_AUTO_MIGRATE": "false"})
    try:
        pending = orchestrator.wait_for_event("db.migrations_pending")
        assert pending["pending"] == ["0001", "0002", "0007"]
        ready = get(orchestrator.url, "/ready")
        assert ready.status_code == 503 and "kici-orchestrator migrate" in ready.json()["reason"]
        migrate = subprocess.run(
            [sys.executable, "-m", "kici.orchestrator", "migrate"],
            env=orchestrator_env(tmp_path, {"KICI_DATA_DIR": str(tmp_path / "d")}),
            capture_output=True, text=True, timeout=60,
        )
        assert migrate.returncode == 0, migrate.stderr
        orchestrator.wait_for_event("orchestrator.ready", timeout=30)
        assert get(orchestrator.url, "/ready").status_code == 200
    finally:
        stop_cleanly(orchestrator)
