"""An in-process orchestrator (uvicorn on a free port, lifespan on: dispatcher and sweeps running) and
simulated agents speaking the real protocol over real WebSockets, for the dispatch and tracking tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kici.engine import aio
from kici.engine.events import Event
from kici.engine.lockfile import Workflow
from kici.engine.protocol import PROTOCOL_VERSION
from kici.orchestrator.agents import AgentTimeouts
from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.container import services_of
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, new_id
from kici.orchestrator.server import bind_socket
from kici.orchestrator.services import Services
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.sources import create_source
from kici.orchestrator.store.tokens import create_admin_token, create_agent_token

FAST_TIMEOUTS = AgentTimeouts(auth_s=2, register_s=2, heartbeat_unhealthy_s=20, heartbeat_timeout_s=30,
                              last_seen_write_s=0)


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # leave pytest's signal handlers alone
        yield


async def until(condition: Callable[[], Awaitable[bool]], *, within: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.02)


def workflow(jobs: list[dict[str, Any]], *, name: str = "ci", timeout: int | None = None,
             concurrency: dict[str, Any] | None = None) -> Workflow:
    spec: dict[str, Any] = {
        "name": name,
        "source": {"file": ".kici/workflows/ci.py", "export": f"#{name}"},
        "contentHash": "c" * 64,
        "compileSchemaVersion": 1,
        "triggers": [],
        "jobs": [{"steps": [{"name": "s"}], **job} for job in jobs],
    }
    if timeout is not None:
        spec["timeout"] = timeout
    if concurrency is not None:
        spec["concurrency"] = {"hasGroup": True, **concurrency}
    return Workflow.model_validate(spec)


def exact(*labels: str) -> list[dict[str, str]]:
    return [{"kind": "exact", "value": label} for label in labels]


@dataclass
class Orchestrator:
    app: Any
    database: Database
    base_url: str
    admin_token: str
    source_id: str
    agent_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/ws"

    @property
    def services(self) -> Services:
        return services_of(self.app)

    async def agent_token(self, labels: list[str]) -> str:
        key = ",".join(sorted(labels))
        if key not in self.agent_tokens:
            async with self.database.transaction() as conn:
                created = await create_agent_token(conn, name=f"pool-{key or 'any'}", labels=labels)
            self.agent_tokens[key] = created.plaintext
        return self.agent_tokens[key]

    async def create_run(self, wf: Workflow, *, sha: str = "a" * 40, branch: str = "main") -> run_store.CreatedRun:
        settings: Settings = self.app.state.kici.settings
        async with self.database.transaction() as conn:
            created = await run_store.create_run(
                conn,
                run_store.NewRun(
                    org_id="default", workflow=wf, event=Event(type="push", branch=branch, sha=sha, repo="acme/app"),
                    repo="acme/app", ref=f"refs/heads/{branch}", sha=sha, lock_content_hash="l" * 64,
                    delivery_id=None, source_id=self.source_id,
                ),
                queue_max_depth=settings.queue_max_depth,
                queue_timeout_ms=settings.queue_timeout_ms,
            )
        await self.services.dispatcher.cancel_superseded(created.superseded)
        await self.services.dispatcher.runs_created([created.run_id])
        return created

    async def run(self, run_id: str) -> run_store.RunRecord:
        async with self.database.read() as conn:
            found = await run_store.get_run(conn, run_id)
        assert found is not None
        return found

    async def jobs(self, run_id: str) -> dict[str, run_store.JobRecord]:
        async with self.database.read() as conn:
            return {j.name: j for j in await run_store.list_jobs(conn, run_id)}

    async def wait_run(self, run_id: str, *statuses: str, within: float = 10.0) -> run_store.RunRecord:
        async def done() -> bool:
            return (await self.run(run_id)).status in statuses
        await until(done, within=within, what=f"run {run_id} to become {'/'.join(statuses)}")
        return await self.run(run_id)

    async def wait_job(self, run_id: str, name: str, *statuses: str, within: float = 10.0) -> run_store.JobRecord:
        async def done() -> bool:
            return (await self.jobs(run_id))[name].status in statuses
        await until(done, within=within, what=f"job {name} to become {'/'.join(statuses)}")
        return (await self.jobs(run_id))[name]

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
            return await client.get(path)

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
            return await client.request(method, "/api/v1/admin" + path,
                                        headers={"Authorization": f"Bearer {self.admin_token}"}, **kwargs)


@contextlib.asynccontextmanager
async def serve_orchestrator(
    database: Database, tmp_path: Path, *, timeouts: AgentTimeouts = FAST_TIMEOUTS,
    secret_key: bytes | None = None, old_secret_key: bytes | None = None, **overrides: Any
) -> AsyncIterator[Orchestrator]:
    """An orchestrator app on a free port with a git source (a path) and an owner token."""
    values: dict[str, Any] = {"sweep_interval_ms": 100, "dispatch_poll_ms": 200, **overrides}
    settings = Settings(data_dir=tmp_path / "data", database_url=database.url, **values)
    app = create_app(settings, database, secret_key=secret_key, old_secret_key=old_secret_key)
    app.state.agent_timeouts = timeouts
    async with database.transaction() as conn:
        owner = await create_admin_token(conn, name="owner", role=AdminRole.OWNER)
        source = await create_source(conn, key=None, name=f"app-{new_id()[:8]}", kind="git",
                                     config={"url": str(tmp_path / "repo")}, secrets={})
    async with serve_app(app, lifespan="on") as port:
        yield Orchestrator(app, database, f"http://127.0.0.1:{port}", owner.plaintext, source.id)


@contextlib.asynccontextmanager
async def serve_app(app: Any, *, lifespan: str) -> AsyncIterator[int]:
    """Serve `app` with uvicorn on a free port inside the test's event loop (so the database fixture's
    engine is usable by the handlers); the port. Stopped at exit, also on failure."""
    sock = bind_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    server = _QuietServer(
        uvicorn.Config(app, log_config=None, lifespan=lifespan, timeout_graceful_shutdown=2, ws="websockets-sansio")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        # past the shutdown's own bound (services.STOP_TIMEOUT_S per service): giving up earlier cancels the
        # lifespan half-way through stopping, and the database fixture then closes under it
        with contextlib.suppress(Exception):
            await aio.wait_for(task, 60)
        sock.close()


class SimAgent:
    """A simulated agent: does the handshake, collects what the orchestrator sends, and sends what the
    test tells it to. `auto` answers dispatches like a healthy agent (ack, running, success)."""

    def __init__(self, orch: Orchestrator, agent_id: str, labels: list[str], *, max_concurrency: int = 1,
                 token_labels: list[str] | None = None) -> None:
        self.orch = orch
        self.agent_id = agent_id
        self.labels = labels
        self.max_concurrency = max_concurrency
        self.token_labels = token_labels if token_labels is not None else labels
        self.ws: ClientConnection | None = None
        self.inbox: list[dict[str, Any]] = []
        self.register_ack: dict[str, Any] | None = None
        self.close_code: int | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.auto: str | None = None
        """`success`/`failed`: answer every dispatch by acking, running and finishing with that state."""
        self.auto_ack = True
        self.outputs: dict[str, Any] = {}

    async def connect(self, in_flight: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        token = await self.orch.agent_token(self.token_labels)
        self.ws = await connect(self.orch.ws_url, open_timeout=5, close_timeout=2)
        await self.send({"type": "auth.request", "token": token, "protocolVersion": PROTOCOL_VERSION})
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert reply["type"] == "auth.success", reply
        await self.send({
            "type": "agent.register", "message_id": "m-1", "agent_id": self.agent_id, "labels": self.labels,
            "max_concurrency": self.max_concurrency,
            "in_flight_jobs": [{"run_id": r, "job_id": j} for r, j in in_flight or []],
        })
        ack = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
        assert ack["type"] == "register.ack", ack
        self.register_ack = ack
        self.close_code = None
        self._reader = asyncio.create_task(self._read())
        return ack

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for frame in self.ws:
                message = json.loads(frame)
                self.inbox.append(message)
                self._changed.set()
                if message["type"] == "job.dispatch" and self.auto is not None:
                    await self._answer(message)
        except ConnectionClosed:
            pass
        self.close_code = self.ws.close_code
        self._changed.set()

    async def _answer(self, dispatch: dict[str, Any]) -> None:
        ids = {"run_id": dispatch["run_id"], "job_id": dispatch["job_id"]}
        if self.auto_ack:
            await self.send({"type": "job.ack", **ids})
        await self.status(dispatch, "running")
        await self.send({"type": "log.chunk", **ids, "step_index": 0, "lines": [f"hello from {self.agent_id}"],
                         "timestamp": time.time(), "seq": 0})
        await self.status(dispatch, self.auto or "success", outputs=self.outputs or None)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(message))

    async def status(self, dispatch: dict[str, Any], state: str, **extra: Any) -> None:
        await self.send({"type": "job.status", "run_id": dispatch["run_id"], "job_id": dispatch["job_id"],
                         "state": state, "timestamp": time.time(), **{k: v for k, v in extra.items() if v is not None}})

    def received(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.inbox if m["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, within: float = 10.0) -> list[dict[str, Any]]:
        async def enough() -> bool:
            return len(self.received(kind)) >= count
        await until(enough, within=within, what=f"{count} {kind} message(s) at {self.agent_id}")
        return self.received(kind)

    async def wait_closed(self, within: float = 10.0) -> int | None:
        async def closed() -> bool:
            return self._reader is not None and self._reader.done()
        await until(closed, within=within, what=f"{self.agent_id}'s connection to close")
        return self.close_code

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)

    async def __aenter__(self) -> SimAgent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
