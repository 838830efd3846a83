"""`create_app` in-process (the pattern later route tests use): per-app metrics, readiness states."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.container import Readiness
from kici.orchestrator.db.database import Database


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator")  # type: ignore[arg-type]


async def test_apps_have_their_own_metrics(database: Database, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=database.url, base_path="/ci")
    first, second = create_app(settings, database), create_app(settings, database)
    async with client(first) as a, client(second) as b:
        for _ in range(3):
            assert (await a.get("/ci/health")).status_code == 200
        assert (await a.get("/ci/ready")).json() == {"status": "ready", "reason": None}
        assert (await b.get("/health")).status_code == 404
        # the label is the route template without the base path, so dashboards do not depend on it
        assert 'kici_http_requests_total{method="GET",route="/health",status="200"} 3.0' in (
            await a.get("/ci/metrics")
        ).text
        assert 'route="/health"' not in (await b.get("/ci/metrics")).text


async def test_ready_reports_starting_then_unavailable(tmp_path: Path) -> None:
    url = f"postgresql://kici@127.0.0.1:{closed_port()}/kici"
    database = Database.connect(url, connect_timeout=2)
    readiness = Readiness(prepared=False, reason="applying migrations")
    app = create_app(Settings(data_dir=tmp_path, database_url=url), database, readiness=readiness)
    try:
        async with client(app) as http:
            starting = await http.get("/ready")
            assert starting.status_code == 503
            assert starting.json() == {"status": "starting", "reason": "applying migrations"}
            readiness.mark_prepared()  # e.g. the database went away after start-up
            down = await http.get("/ready")
            assert down.status_code == 503 and down.json()["status"] == "unavailable"
            assert down.json()["reason"].startswith("database unreachable: ")
            assert (await http.get("/health")).json()["status"] == "ok"
    finally:
        await database.close()
