"""Report latency benchmark: from a job finishing to its GitHub check run `completed` at the API.

In one process: the orchestrator's run store on a real database (a SQLite file, or PostgreSQL with
`--database-url`), the reporting worker running as in the orchestrator (its background loop, woken by
state changes), and a minimal local GitHub API (installation tokens, check runs) over real HTTP that
timestamps each check run's completion. Jobs of GitHub-reported runs are created, started and finished at
a steady rate (default 20 finished jobs/s): each run is created, its job starts 100 ms later and finishes
500 ms after that, so the check run goes queued → in_progress → completed like a real short job.

Reports the latency from the finishing transaction's commit to the fake API receiving `completed`
(median, p95, p99, max) and how many reports were lost (a job whose completion never arrived). Prints one
JSON object.

    .venv/bin/python bench/report_latency.py                         # SQLite, 30 s at 20 jobs/s
    .venv/bin/python bench/report_latency.py --database-url postgresql://postgres@127.0.0.1:5432/bench
    .venv/bin/python bench/report_latency.py --quick                 # 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kici.engine.events import Event
from kici.engine.lockfile import Workflow
from kici.orchestrator.config import Settings
from kici.orchestrator.container import AppState, Readiness
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.migrate import migrate
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.metrics import Metrics
from kici.orchestrator.reporting.worker import ReportWorker
from kici.orchestrator.storage.blobs_fs import FilesystemBlobStore
from kici.orchestrator.storage.logs import LogStore
from kici.orchestrator.store import outbox
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.sources import create_source

APP_ID = 4242
REPO = "bench/app"


class FakeChecksAPI:
    """Installation tokens and check runs; records when each job's check run was completed."""

    def __init__(self) -> None:
        self.completed_at: dict[str, float] = {}  # external_id (job id) → perf_counter
        self.calls = 0
        self._ids: dict[int, str] = {}
        self._next = 1
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict[str, Any]:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return json.loads(raw) if raw else {}

            def do_POST(self) -> None:
                body = self._body()
                if self.path.endswith("/access_tokens"):
                    self._answer(201, {"token": "ghs_" + secrets.token_hex(8), "expires_at": "2099-01-01T00:00:00Z"})
                    return
                with api._lock:
                    check_id = api._next
                    api._next += 1
                    api._ids[check_id] = body["external_id"]
                api._record(check_id, body)
                self._answer(201, {"id": check_id, **body})

            def do_PATCH(self) -> None:
                body = self._body()
                check_id = int(self.path.rsplit("/", 1)[1])
                api._record(check_id, body)
                self._answer(200, {"id": check_id, **body})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _record(self, check_id: int, body: dict[str, Any]) -> None:
        now = time.perf_counter()
        with self._lock:
            self.calls += 1
            if body.get("status") == "completed":
                self.completed_at.setdefault(self._ids[check_id], now)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cpu_reference() -> float:
    """Seconds for a fixed pure-Python loop: how fast this (shared) host was during the run."""
    start = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    return round(time.perf_counter() - start, 3)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(database_url: str | None, rate: float, seconds: float, tmp: Path) -> dict[str, Any]:
    url = database_url or f"sqlite:///{tmp / 'kici.db'}"
    db = Database.connect(url)
    api = FakeChecksAPI()
    key = os.urandom(32)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    logs = LogStore(db, FilesystemBlobStore(tmp / "blobs"))
    worker: ReportWorker | None = None
    try:
        await migrate(db)
        settings = Settings(data_dir=tmp / "data", database_url=url)
        async with db.transaction() as conn:
            source = await create_source(conn, key=key, name=f"gh-{secrets.token_hex(4)}", kind="github",
                                         config={"app_id": APP_ID, "api_url": api.url},
                                         secrets={"private_key": pem, "webhook_secret": "w"})
        state = AppState(settings=settings, database=db, metrics=Metrics("bench"), readiness=Readiness(),
                         version="bench", secret_key=key)
        worker = ReportWorker(state, Ingest.from_settings(settings), logs)
        await worker.start(state.readiness)
        wf = Workflow.model_validate({
            "name": "ci", "source": {"file": ".kici/workflows/ci.py", "export": "#ci"}, "contentHash": "0" * 64,
            "compileSchemaVersion": 1, "triggers": [], "jobs": [{"name": "build", "steps": [{"name": "s"}]}],
        })
        event = Event(type="push", name="push", repo=REPO, sha="b" * 40, payload={"installation": {"id": 7}})
        reporting = {"github": {"installation_id": 7}}
        finished_at: dict[str, float] = {}

        async def one_job() -> None:
            async with db.transaction() as conn:
                created = await run_store.create_run(
                    conn,
                    run_store.NewRun(org_id="default", workflow=wf, event=event, repo=REPO, ref="refs/heads/main",
                                     sha="b" * 40, lock_content_hash=None, delivery_id=None, source_id=source.id,
                                     reporting=reporting),
                    queue_max_depth=100_000, queue_timeout_ms=3_600_000,
                )
            worker.wake()
            job_id = next(iter(created.job_ids.values()))
            await asyncio.sleep(0.1)
            async with db.transaction() as conn:
                await run_store.record_job_state(conn, job_id, state="running", agent_id=None)
            worker.wake()
            await asyncio.sleep(0.5)
            async with db.transaction() as conn:
                await run_store.record_job_state(conn, job_id, state="success", agent_id=None)
            finished_at[job_id] = time.perf_counter()
            worker.wake()

        total = int(rate * seconds)
        tasks = []
        start = time.perf_counter()
        for i in range(total):  # a steady rate of job starts → the same rate of finishes 0.6 s later
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_job()))
        await asyncio.gather(*tasks)
        deadline = time.perf_counter() + 30
        while len(api.completed_at) < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        latencies = [(api.completed_at[j] - t) * 1000 for j, t in finished_at.items() if j in api.completed_at]
        async with db.read() as conn:
            counts = await outbox.count_by_status(conn)
        return {
            "database": "postgresql" if url.startswith("postgresql") else "sqlite",
            "jobs": total,
            "rate_jobs_per_s": rate,
            "completed_reports": len(latencies),
            "lost": total - len(latencies),
            "latency_ms": {
                "median": round(statistics.median(latencies), 1) if latencies else None,
                "p95": round(_percentile(latencies, 0.95), 1) if latencies else None,
                "p99": round(_percentile(latencies, 0.99), 1) if latencies else None,
                "max": round(max(latencies), 1) if latencies else None,
            },
            "api_calls": api.calls,
            "outbox": counts,
        }
    finally:
        if worker is not None:
            await worker.stop()
        await logs.close()
        api.close()
        await db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="PostgreSQL URL of an empty database (default: a SQLite file)")
    parser.add_argument("--rate", type=float, default=20.0, help="finished jobs per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="5 seconds")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(prefix="kici-bench-report-") as tmp:
        result = asyncio.run(bench(args.database_url, args.rate, seconds, Path(tmp)))
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                         "host_cpu_reference_s": cpu_reference(), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
