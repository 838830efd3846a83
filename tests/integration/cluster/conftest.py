"""Real orchestrator processes sharing one fresh PostgreSQL database, and simulated agents speaking the real
protocol over real WebSockets to whichever node a test points them at."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kici.engine.events import Event
from kici.engine.protocol import PROTOCOL_VERSION
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.migrate import migrate
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.sources import create_source
from kici.orchestrator.store.tokens import create_agent_token
from tests.integration.orchestrator.conftest import (  # noqa: F401 - fixtures, registered by import
    OrchestratorProcess,
    _pg_run,
    database,
    database_url,
    orchestrator_env,
    postgres_admin_url,
    postgres_session_url,
    sqlite_template,
)
from tests.integration.orchestrator.dispatch_harness import workflow

ADMIN_TOKEN = "cluster-test-admin-token-0123456789"
SECRET_KEY = "ab" * 32
LEASE_S = 3.0

NODE_ENV = {
    "KICI_NODE_LEASE_SECONDS": str(LEASE_S),
    "KICI_SWEEP_INTERVAL_MS": "200",
    "KICI_DISPATCH_POLL_MS": "300",
    "KICI_CLUSTER_POLL_MS": "200",
    "KICI_SCHEDULER_INTERVAL_MS": "200",
    "KICI_REPORT_POLL_MS": "500",
    "KICI_AGENT_MAX_RECONNECT_DELAY_MS": "60000",
    "KICI_LOG_FORMAT": "json",
    "KICI_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN,
    "KICI_SECRET_KEY": SECRET_KEY,
}


async def until(condition: Callable[[], Awaitable[bool]], *, within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Node:
    name: str
    process: OrchestratorProcess
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            return await client.request(method, "/api/v1/admin" + path,
                                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kwargs)

    async def cluster(self) -> dict[str, Any]:
        response = await self.admin("GET", "/cluster")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.process.events() if e.get("event") == name]


@dataclass
class Cluster:
    database_url: str
    database: Database
    tmp_path: Path
    source_id: str
    agent_token: str
    agent_token_id: str
    nodes: dict[str, Node] = field(default_factory=dict)
    _started: list[OrchestratorProcess] = field(default_factory=list)

    def start(self, name: str, **extra: str) -> Node:
        env = orchestrator_env(self.tmp_path, {
            **NODE_ENV, "KICI_PORT": "0", "KICI_NODE_NAME": name, "KICI_DATABASE_URL": self.database_url,
            "KICI_DATA_DIR": str(self.tmp_path / f"data-{name}"), **extra,
        })
        proc = subprocess.Popen([sys.executable, "-m", "kici.orchestrator"], env=env, cwd=self.tmp_path,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        process = OrchestratorProcess(proc)
        self._started.append(process)
        node = Node(name, process, env)
        self.nodes[name] = node
        return node

    async def ready(self, *nodes: Node) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            for node in nodes:
                url = await asyncio.to_thread(lambda n=node: n.url)  # type: ignore[misc]

                async def is_ready(url: str = url) -> bool:
                    with contextlib.suppress(httpx.HTTPError):
                        return (await client.get(url + "/ready")).status_code == 200
                    return False

                await until(is_ready, within=60, what=f"node {node.name} to be ready")

    async def create_run(self, jobs: int, *, name: str = "ci") -> run_store.CreatedRun:
        wf = workflow([{"name": f"job{i:02d}"} for i in range(jobs)], name=name)
        async with self.database.transaction() as conn:
            return await run_store.create_run(
                conn,
                run_store.NewRun(
                    org_id="default", workflow=wf, event=Event(type="push", branch="main", sha="a" * 40,
                                                               repo="acme/app"),
                    repo="acme/app", ref="refs/heads/main", sha="a" * 40, lock_content_hash="l" * 64,
                    delivery_id=None, source_id=self.source_id,
                ),
                queue_max_depth=1000, queue_timeout_ms=3_600_000,
            )

    async def jobs(self, run_id: str) -> dict[str, run_store.JobRecord]:
        async with self.database.read() as conn:
            return {j.id: j for j in await run_store.list_jobs(conn, run_id)}

    async def run(self, run_id: str) -> run_store.RunRecord:
        async with self.database.read() as conn:
            found = await run_store.get_run(conn, run_id)
        assert found is not None
        return found

    async def wait_run(self, run_id: str, *statuses: str, within: float = 30.0) -> run_store.RunRecord:
        async def done() -> bool:
            return (await self.run(run_id)).status in statuses
        await until(done, within=within, what=f"run {run_id} to become {'/'.join(statuses)}")
        return await self.run(run_id)

    async def leader(self, via: Node) -> tuple[str | None, int]:
        status = await via.cluster()
        return status["leader"], int(status["term"])


class SimAgent:
    """A simulated agent. Every job it starts is counted in `started` (a job started twice anywhere is a
    step run twice). `hold`: keep jobs running until `finish()`; otherwise they succeed after `work_s`."""

    def __init__(self, cluster: Cluster, agent_id: str, *, max_concurrency: int = 1, work_s: float = 0.2,
                 hold: bool = False, started: dict[str, int] | None = None) -> None:
        self.cluster = cluster
        self.agent_id = agent_id
        self.max_concurrency = max_concurrency
        self.work_s = work_s
        self.hold = hold
        self.started = started if started is not None else {}
        self.running: dict[str, dict[str, Any]] = {}
        """Job id → dispatch, for jobs started and not confirmed finished (what it reports in flight): as
        the real agent does, a finished job stays until `delivery.synced` confirms its status is durable."""
        self.finished: dict[str, str] = {}
        """Job id → terminal state sent but not confirmed yet (sent again after a reconnect)."""
        self._sync_id = 0
        self._syncing: dict[int, list[str]] = {}
        self.inbox: list[dict[str, Any]] = []
        self.ws: ClientConnection | None = None
        self.node: Node | None = None
        self.register_ack: dict[str, Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()

    async def connect(self, node: Node) -> dict[str, Any]:
        self.node = node
        self.ws = await connect(node.ws_url, open_timeout=5, close_timeout=2)
        await self.ws.send(json.dumps({"type": "auth.request", "token": self.cluster.agent_token,
                                       "protocolVersion": PROTOCOL_VERSION}))
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert reply["type"] == "auth.success", reply
        await self.ws.send(json.dumps({
            "type": "agent.register", "message_id": "m-1", "agent_id": self.agent_id, "labels": [],
            "max_concurrency": self.max_concurrency,
            "in_flight_jobs": [{"run_id": d["run_id"], "job_id": j} for j, d in self.running.items()],
        }))
        ack = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert ack["type"] == "register.ack", ack
        self.register_ack = ack
        self._reader = asyncio.create_task(self._read())
        for job_id in ack.get("reclaimed_jobs") or []:
            # as the real agent replays its unconfirmed messages: the job's `running` again (a duplicate is
            # ignored where it had arrived; where the lost node never wrote it, it is what starts the job)
            if job_id in self.running:
                await self.status(self.running[job_id], "running")
            if job_id in self.finished:
                self._spawn(self.finish(job_id, self.finished[job_id]))
            elif not self.hold and job_id in self.running:
                self._spawn(self._finish_later(self.running[job_id]))
        for job_id in set(self.running) - set(ack.get("reclaimed_jobs") or []):
            self.running.pop(job_id, None)  # settled by the orchestrator (or never started there)
            self.finished.pop(job_id, None)
        return ack

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                message = json.loads(frame)
                self.inbox.append(message)
                if message["type"] == "delivery.synced":
                    for sync_id in [i for i in self._syncing if i <= message["id"]]:
                        for job_id in self._syncing.pop(sync_id):
                            self.running.pop(job_id, None)
                            self.finished.pop(job_id, None)
                if message["type"] == "job.dispatch":
                    self.running[message["job_id"]] = message  # before anyone can look
                    self._spawn(self._start(message))

    async def _start(self, dispatch: dict[str, Any]) -> None:
        job_id = dispatch["job_id"]
        self.started[job_id] = self.started.get(job_id, 0) + 1
        self.running[job_id] = dispatch
        with contextlib.suppress(ConnectionClosed):
            await self.send({"type": "job.ack", "run_id": dispatch["run_id"], "job_id": job_id})
            await self.status(dispatch, "running")
        if not self.hold:
            await self._finish_later(dispatch)

    async def _finish_later(self, dispatch: dict[str, Any]) -> None:
        await asyncio.sleep(self.work_s)
        await self.finish(dispatch["job_id"])

    async def finish(self, job_id: str, state: str = "success") -> None:
        """Report the job finished, then ask for `delivery.synced`; until it comes, the job stays in
        flight and its status is sent again after a reconnect."""
        dispatch = self.running[job_id]
        self.finished[job_id] = state
        with contextlib.suppress(ConnectionClosed):
            await self.status(dispatch, state)
            self._sync_id += 1
            self._syncing[self._sync_id] = [job_id]
            await self.send({"type": "delivery.sync", "id": self._sync_id})

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(message))

    async def status(self, dispatch: dict[str, Any], state: str) -> None:
        await self.send({"type": "job.status", "run_id": dispatch["run_id"], "job_id": dispatch["job_id"],
                         "state": state, "timestamp": time.time()})

    def received(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.inbox if m["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, within: float = 20.0) -> list[dict[str, Any]]:
        async def enough() -> bool:
            return len(self.received(kind)) >= count
        await until(enough, within=within, what=f"{count} {kind} at {self.agent_id}")
        return self.received(kind)

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def close(self) -> None:
        for task in list(self._work):
            task.cancel()
        await asyncio.gather(*self._work, return_exceptions=True)
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


@pytest.fixture
def cluster_database_url(postgres_admin_url: str) -> Iterator[str]:  # noqa: F811 - the imported fixture
    """A fresh PostgreSQL database for this test's nodes, dropped afterwards."""
    name = f"kici_c_{secrets.token_hex(6)}"
    _pg_run(postgres_admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg_run(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def cluster(cluster_database_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """The database migrated and seeded (a git source, an agent token); nodes started by the test are
    killed at the end, whatever happened (a stopped one is continued first so it can die)."""
    db = Database.connect(cluster_database_url)
    await migrate(db)
    async with db.transaction() as conn:
        source = await create_source(conn, key=None, name="app", kind="git",
                                     config={"url": str(tmp_path / "repo")}, secrets={})
        token = await create_agent_token(conn, name="pool", labels=[])
    found = Cluster(cluster_database_url, db, tmp_path, source.id, token.plaintext, token.token.id)
    try:
        yield found
    finally:
        for process in found._started:
            with contextlib.suppress(ProcessLookupError):
                process.proc.send_signal(signal.SIGCONT)
            process.kill()
        await db.close()
