"""Harness for the agent's integration tests: a fake orchestrator (a real `websockets` server on a free
port speaking the orchestrator side of `kici.engine.protocol`), the real `kici-agent` process, and real
git repositories holding compiled workflows."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from kici.runner import proctree
from tests.conftest import git, kici_env, make_repo, run_kici

TOKEN = "kat_" + "ab" * 32
Message = dict[str, Any]


async def wait_until(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy (and return that); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Connection:
    ws: ServerConnection
    auth: Message | None = None
    register: Message | None = None
    messages: list[Message] = field(default_factory=list)
    """Everything received after the handshake, in order."""


class FakeOrchestrator:
    """The orchestrator side of the protocol, scripted by the test.

    `reclaim(in_flight_job_ids)` decides `register.ack.reclaimed_jobs` (default: all of them).
    `delivery.sync` is answered with `delivery.synced` (and not recorded in `messages`) unless
    `withhold_sync` is set, as by an orchestrator that read the agent's frames but died before storing them.
    `auth_failure` makes every auth.request fail with that reason; `close_code_on_auth` closes instead.
    """

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.server: Server | None = None
        self.port = 0
        self.base_path = ""
        self.token = TOKEN
        self.auth_failure: str | None = None
        self.close_code_on_auth: int | None = None
        self.reclaim: Callable[[list[str]], list[str]] = lambda ids: ids
        self.connect_times: list[float] = []
        self.withhold_sync = False
        self.syncs = 0

    async def start(self, port: int = 0) -> None:
        self.server = await serve(self._handler, "127.0.0.1", port)
        self.port = int(next(iter(self.server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    async def _handler(self, ws: ServerConnection) -> None:
        self.connect_times.append(time.monotonic())
        assert ws.request is not None
        if ws.request.path != f"{self.base_path}/ws":
            await ws.close(4003, f"wrong path {ws.request.path}")
            return
        conn = Connection(ws)
        self.connections.append(conn)
        try:
            conn.auth = json.loads(await ws.recv())
            if self.close_code_on_auth is not None:
                await ws.close(self.close_code_on_auth, "token revoked")
                return
            if self.auth_failure is not None or conn.auth.get("token") != self.token:
                reason = self.auth_failure or "invalid or revoked agent token"
                await ws.send(json.dumps({"type": "auth.failure", "reason": reason}))
                await ws.close(4010, reason)
                return
            await ws.send(json.dumps({"type": "auth.success", "connection_id": str(uuid.uuid4())}))
            conn.register = json.loads(await ws.recv())
            in_flight = [j["job_id"] for j in conn.register.get("in_flight_jobs", [])]
            await ws.send(json.dumps({
                "type": "register.ack", "agent_id": conn.register["agent_id"], "labels": conn.register["labels"],
                "reclaimed_jobs": self.reclaim(in_flight),
            }))
            async for frame in ws:
                message = json.loads(frame)
                if message.get("type") == "delivery.sync":
                    self.syncs += 1
                    if not self.withhold_sync:
                        await ws.send(json.dumps({"type": "delivery.synced", "id": message["id"]}))
                    continue
                conn.messages.append(message)
        except Exception:  # the agent went away mid-handshake: the test looks at what was recorded
            return

    # -- looking at what arrived ------------------------------------------------------------------------

    @property
    def current(self) -> Connection:
        assert self.connections, "the agent never connected"
        return self.connections[-1]

    def messages(self, type_: str | None = None, job_id: str | None = None) -> list[Message]:
        out = []
        for conn in self.connections:
            for m in conn.messages:
                if (type_ is None or m["type"] == type_) and (job_id is None or m.get("job_id") == job_id):
                    out.append(m)
        return out

    def job_messages(self, job_id: str) -> list[Message]:
        return [m for c in self.connections for m in c.messages if m.get("job_id") == job_id]

    def terminal(self, job_id: str) -> Message | None:
        for m in self.messages("job.status", job_id):
            if m["state"] != "running":
                return m
        return None

    async def wait_registered(self, count: int = 1, timeout: float = 30.0) -> Connection:
        await wait_until(lambda: sum(1 for c in self.connections if c.register) >= count
                         and self.current.messages, timeout, f"registration #{count}")
        return self.current

    async def wait_terminal(self, job_id: str, timeout: float = 60.0) -> Message:
        return await wait_until(lambda: self.terminal(job_id), timeout, f"terminal status of {job_id}")  # type: ignore[no-any-return]

    async def wait_message(self, predicate: Callable[[Message], bool], timeout: float = 30.0,
                           what: str = "message") -> Message:
        def find() -> Message | None:
            return next((m for c in self.connections for m in c.messages if predicate(m)), None)

        return await wait_until(find, timeout, what)  # type: ignore[no-any-return]

    async def send(self, message: Message) -> None:
        await self.current.ws.send(json.dumps(message))

    def log_lines(self, job_id: str, step_index: int | None = None) -> list[str]:
        chunks = sorted(self.messages("log.chunk", job_id), key=lambda m: m["seq"])
        seen: set[int] = set()
        lines: list[str] = []
        for chunk in chunks:  # like the orchestrator: a replayed seq is stored once
            if chunk["seq"] in seen:
                continue
            seen.add(chunk["seq"])
            if step_index is None or chunk["step_index"] == step_index:
                lines.extend(chunk["lines"])
        return lines


@pytest.fixture
async def orchestrator() -> AsyncIterator[FakeOrchestrator]:
    fake = FakeOrchestrator()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


# ------------------------------------------------------------------------------------------ the agent process


class AgentProcess:
    def __init__(self, env: Mapping[str, str], log_path: Path, command: Sequence[str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(command or [sys.executable, "-m", "kici.agent"]), env=dict(env), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[Message]:
        out = []
        for line in self.output.splitlines():
            if line.startswith("{"):
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout, f"agent exit\n{self.output}")
        return int(self.proc.returncode)

    def stop(self) -> None:
        if self.proc.poll() is None:
            descendants = proctree.descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for pid in descendants:  # nothing the agent started may outlive a test
                proctree.kill_tree(pid, grace=0)
        self._log.close()


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def agent_env(tmp_path: Path) -> Callable[..., dict[str, str]]:
    def make(orchestrator: FakeOrchestrator | None = None, **settings: str) -> dict[str, str]:
        env = {
            "KICI_WORK_DIR": str(tmp_path / "agent-work"),
            "KICI_AGENT_TOKEN": TOKEN,
            "KICI_HEARTBEAT_INTERVAL_MS": "500",
            "KICI_JOB_HEARTBEAT_INTERVAL_MS": "300",
            "KICI_MAX_RECONNECT_DELAY_MS": "300",
            "KICI_SHUTDOWN_TIMEOUT_MS": "10000",
            "KICI_CANCEL_GRACE_MS": "5000",
            "HOME": str(tmp_path / "home"),
        }
        if os.geteuid() == 0:
            # as root the agent would pick `nobody` as step user where `nobody` can run this Python, and this
            # harness's private tmp dirs would then be out of the steps' reach: root steps, the same on every
            # machine (test_token_secrecy exercises the step user on purpose)
            env["KICI_AGENT_STEP_USER"] = "root"
        if orchestrator is not None:
            env["KICI_ORCHESTRATOR_URL"] = orchestrator.url
        env.update(settings)
        return kici_env({k: v for k, v in env.items() if v is not None})

    return make


@pytest.fixture
async def start_agent(tmp_path: Path, agent_env: Callable[..., dict[str, str]]) -> AsyncIterator[AgentFactory]:
    started: list[AgentProcess] = []

    def start(orchestrator: FakeOrchestrator | None = None, *, env: Mapping[str, str] | None = None,
              command: Sequence[str] | None = None, **settings: str) -> AgentProcess:
        full = dict(env) if env is not None else agent_env(orchestrator, **settings)
        agent = AgentProcess(full, tmp_path / f"agent-{len(started)}.log", command)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        # in a thread: the fake orchestrator shares this event loop and must keep answering meanwhile
        await asyncio.to_thread(agent.stop)


# ------------------------------------------------------------------------------------------ workflows


@dataclass
class WorkflowRepo:
    path: Path
    sha: str
    lock: dict[str, Any]

    def workflow(self, name: str | None = None) -> dict[str, Any]:
        for wf in self.lock["workflows"]:
            if name is None or wf["name"] == name:
                return wf  # type: ignore[no-any-return]
        raise KeyError(name)


HEADER = "from kici import workflow, job, step, push, Retry\n"


def workflow_repo(root: Path, body: str, *, extra: Mapping[str, str] | None = None) -> WorkflowRepo:
    """A git repository whose `.kici/workflows/ci.py` is `body`, compiled and committed on `main`."""
    import textwrap

    files = {".kici/workflows/ci.py": HEADER + textwrap.dedent(body).lstrip("\n"), **(extra or {})}
    make_repo(root, files, commit=False)
    compiled = run_kici("compile", cwd=root)
    assert compiled.returncode == 0, compiled.stderr
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "workflow")
    sha = git(root, "rev-parse", "HEAD").strip()
    lock = json.loads((root / ".kici" / "kici.lock.json").read_text())
    return WorkflowRepo(root, sha, lock)


def dispatch(repo: WorkflowRepo, job: str, *, job_id: str | None = None, **overrides: Any) -> Message:
    wf = repo.workflow(overrides.pop("workflow_name", None))
    message: Message = {
        "type": "job.dispatch",
        "message_id": str(uuid.uuid4()),
        "run_id": overrides.pop("run_id", "run-" + uuid.uuid4().hex[:8]),
        "job_id": job_id or "job-" + uuid.uuid4().hex[:8],
        "repo_url": str(repo.path),
        "ref": "main",
        "sha": repo.sha,
        "workflow": wf["name"],
        "job": job,
        "display_name": job,
        "workflow_file": wf["source"]["file"],
        "export": wf["source"]["export"],
        "content_hash": wf["contentHash"],
        "event": {"type": "push", "branch": "main", "target_branch": "main", "sha": repo.sha},
        "timestamp": time.time(),
    }
    message.update(overrides)
    return message


def marker_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `marker`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and proctree.alive(int(name)):
            found.append(int(name))
    return found


@pytest.fixture
def marker() -> Iterator[str]:
    value = f"kici-agent-test-{uuid.uuid4().hex[:10]}"
    yield value
    for pid in marker_pids(value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
