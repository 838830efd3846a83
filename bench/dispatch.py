"""Dispatch benchmark: a real orchestrator process, simulated agents over real WebSockets, signed git
webhooks over HTTP.

Two phases per database (SQLite file, and a fresh PostgreSQL database):
- latency: webhooks posted at a steady rate (default 20/s), each creating a one-job run; reports the time
  from posting the webhook to the `job.dispatch` arriving at an agent (p50/p95/p99);
- throughput: runs of several independent jobs posted back to back; the simulated agents answer every
  dispatch at once (ack, running, one log chunk, success) and the phase ends when the orchestrator has
  recorded every job finished; reports completed jobs per second.

The agents run no steps: this measures the orchestrator (ingest, queue, claims, tracking), not an agent.
Prints one JSON object.

`--secrets N`: every job of both phases declares N secrets (`job(secrets=[...])`) that exist — even ones
in the repository's scope and in `org` (the repository's wins), odd ones in `org` only — so each dispatch
resolves, opens and records N secrets; the agents check that every `job.dispatch` carries all N. Compare
with the same command without it (the orchestrator has a secret key either way).

    .venv/bin/python bench/dispatch.py                 # both databases, 50 agents
    .venv/bin/python bench/dispatch.py --secrets 20    # the same, every job declaring 20 secrets
    .venv/bin/python bench/dispatch.py --quick         # a short pass (the test suite runs this)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from kici.engine import lockfile as lf

ADMIN_TOKEN = "kici_bench_" + "0" * 40
WEBHOOK_SECRET = "bench-webhook-secret"
SECRET_KEY = "5e" * 32
REPO = "bench/app"


def secret_names(count: int) -> list[str]:
    return [f"BENCH_SECRET_{i:02d}" for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def make_repo(root: Path, jobs_per_run: int, secrets: int = 0) -> str:
    """A repository whose lock file has `latency` (one job, on push to main) and `throughput`
    (`jobs_per_run` independent jobs, on push to `tp`), each job declaring `secrets` secrets; returns the
    commit."""
    declared = secret_names(secrets) or None
    def wf(name: str, branch: str, jobs: int) -> lf.Workflow:
        return lf.Workflow(
            name=name, source=lf.SourceRef(file=f".kici/workflows/{name}.py", export=f"#{name}"),
            content_hash=hashlib.sha256(name.encode()).hexdigest(), compile_schema_version=1,
            triggers=[lf.PushTrigger(branches=[lf.BranchPattern(type="glob", pattern=branch)])],
            jobs=[lf.Job(name=f"job{i}", steps=[lf.Step(name="true")], secrets=declared) for i in range(jobs)],
        )
    lock = lf.build_lock_file([wf("latency", "main", 1), wf("throughput", "tp", jobs_per_run)])
    (root / ".kici").mkdir(parents=True)
    (root / ".kici" / "kici.lock.json").write_text(lf.render_lock_file(lock))
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "bench")
    return git(root, "rev-parse", "HEAD")


class Orchestrator:
    def __init__(self, database_url: str, data_dir: Path, *, python_args: tuple[str, ...] = ()) -> None:
        """`python_args`: given to the interpreter before `-m kici.orchestrator` (e.g. a profiler's)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update({
            "KICI_DATA_DIR": str(data_dir), "KICI_DATABASE_URL": database_url, "KICI_PORT": str(self.port),
            "KICI_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN, "KICI_LOG_LEVEL": "warning", "KICI_LOG_FORMAT": "json",
            "KICI_QUEUE_MAX_DEPTH": "100000", "KICI_SECRET_KEY": SECRET_KEY,
        })
        self.stderr = open(data_dir.parent / f"orchestrator-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, *python_args, "-m", "kici.orchestrator"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, stdin=subprocess.DEVNULL)

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"orchestrator exited with {self.proc.returncode}; see {self.stderr.name}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{self.url}/ready")).status_code == 200:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError("orchestrator did not become ready in 60 s")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the orchestrator process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class SimAgent:
    """Answers every dispatch at once: ack, running, one log chunk, success."""

    def __init__(self, index: int, url: str, token: str, dispatched: dict[str, float], secrets: int = 0) -> None:
        self.agent_id = f"sim-{index}"
        self.secrets = secrets
        self.wrong_secrets = 0
        """Dispatches that did not carry exactly the declared secrets (must stay 0)."""
        self.url = url
        self.token = token
        self.dispatched = dispatched
        self.ws: ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.jobs = 0

    async def start(self) -> None:
        self.ws = await connect(self.url, open_timeout=10, max_size=None)
        await self.ws.send(json.dumps({"type": "auth.request", "token": self.token, "protocolVersion": 1}))
        assert json.loads(await self.ws.recv())["type"] == "auth.success"
        await self.ws.send(json.dumps({"type": "agent.register", "message_id": "m", "agent_id": self.agent_id,
                                       "labels": [], "max_concurrency": 1}))
        assert json.loads(await self.ws.recv())["type"] == "register.ack"
        self.task = asyncio.create_task(self.serve())

    async def serve(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                message = json.loads(frame)
                if message["type"] != "job.dispatch":
                    continue
                if len(message.get("secrets") or {}) != self.secrets:
                    self.wrong_secrets += 1
                delivery = message["event"].get("delivery_id")
                if delivery is not None:  # `git:<source id>:<X-Kici-Delivery>`
                    self.dispatched.setdefault(delivery.rsplit(":", 1)[-1], time.perf_counter())
                ids = {"run_id": message["run_id"], "job_id": message["job_id"]}
                now = time.time()
                for out in (
                    {"type": "job.ack", **ids},
                    {"type": "job.status", **ids, "state": "running", "timestamp": now},
                    {"type": "log.chunk", **ids, "step_index": 0, "lines": ["ok"], "timestamp": now, "seq": 0},
                    {"type": "job.status", **ids, "state": "success", "timestamp": now},
                ):
                    await self.ws.send(json.dumps(out))
                self.jobs += 1

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5)


def _profiler(pid: int) -> subprocess.Popen[bytes] | None:
    """BENCH_PROFILE=<file>: sample the orchestrator during the throughput phase with py-spy (when it is
    installed next to this Python) into a collapsed-stack file."""
    target = os.environ.get("BENCH_PROFILE")
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not target or not spy:
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "-o", target, "-f", "raw", "-r", "250",
                             "--duration", os.environ.get("BENCH_PROFILE_S", "6")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far (Linux /proc/stat), to tell a CPU-bound phase."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _own_cpu() -> float:
    """CPU seconds of this process (the simulated agents and the webhook sender share the machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def signed(body: bytes) -> dict[str, str]:
    digest = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


RESPONSE_MS: list[float] = []


async def post_push(client: httpx.AsyncClient, url: str, branch: str, sha: str, delivery: str) -> None:
    body = json.dumps({"ref": f"refs/heads/{branch}", "before": "0" * 40, "after": sha}).encode()
    start = time.perf_counter()
    response = await client.post(url, content=body, headers={**signed(body), "X-Kici-Delivery": delivery})
    RESPONSE_MS.append((time.perf_counter() - start) * 1000)
    if response.status_code >= 300:
        raise RuntimeError(f"webhook answered {response.status_code}: {response.text}")


async def finished_jobs(client: httpx.AsyncClient, base: str) -> float:
    text = (await client.get(f"{base}/metrics")).text
    for line in text.splitlines():
        if line.startswith('kici_jobs_finished_total{status="success"}'):
            return float(line.split()[-1])
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def bench_one(database_url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    repo = work / "repo"
    sha = make_repo(repo, args.jobs_per_run, args.secrets)
    orch = Orchestrator(database_url, work / "data")
    agents: list[SimAgent] = []
    dispatched: dict[str, float] = {}
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    try:
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await orch.wait_ready(client)
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            created = await client.post(f"{orch.url}/api/v1/admin/agent-tokens", headers=admin,
                                        json={"name": "sim", "labels": []})
            created.raise_for_status()
            token = created.json()["token"]
            source = await client.post(f"{orch.url}/api/v1/admin/sources", headers=admin, json={
                "name": "bench", "kind": "git", "config": {"url": str(repo), "repo": REPO},
                "secrets": {"webhook_secret": WEBHOOK_SECRET}})
            source.raise_for_status()
            for i, name in enumerate(secret_names(args.secrets)):
                for scope in ([f"repo:{REPO}", "org"] if i % 2 == 0 else ["org"]):
                    stored = await client.put(f"{orch.url}/api/v1/admin/secrets/{name}", headers=admin,
                                              json={"scope": scope, "value": f"{scope}-{name}-{uuid.uuid4().hex}"})
                    stored.raise_for_status()
            hook = f"{orch.url}/webhook/default/git/bench"
            ws_url = orch.url.replace("http://", "ws://") + "/ws"
            for i in range(args.agents):
                agent = SimAgent(i, ws_url, token, dispatched, args.secrets)
                await agent.start()
                agents.append(agent)
            await post_push(client, hook, "main", sha, "warm-up")  # fills the lock-file cache
            await _wait(lambda: _done(client, orch.url, 1), 30)

            # -- latency at a steady rate
            posted: dict[str, float] = {}
            interval = 1.0 / args.rate
            start = time.perf_counter()
            pending: list[asyncio.Task[None]] = []
            for i in range(args.latency_webhooks):
                delivery = f"lat-{i}-{uuid.uuid4().hex[:8]}"
                due = start + i * interval
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                posted[delivery] = time.perf_counter()
                pending.append(asyncio.create_task(post_push(client, hook, "main", sha, delivery)))
            await asyncio.gather(*pending)
            responses = list(RESPONSE_MS[1:])
            expected = 1 + args.latency_webhooks
            await _wait(lambda: _done(client, orch.url, expected), 60)
            latencies = [(dispatched[d] - t) * 1000 for d, t in posted.items() if d in dispatched]

            # -- throughput: runs of independent jobs, posted back to back
            before = await finished_jobs(client, orch.url)
            total = args.throughput_runs * args.jobs_per_run
            semaphore = asyncio.Semaphore(8)

            async def post(i: int) -> None:
                async with semaphore:
                    await post_push(client, hook, "tp", sha, f"tp-{i}-{uuid.uuid4().hex[:8]}")

            spy = _profiler(orch.proc.pid)
            busy0 = machine_busy()
            cpu0 = orch.cpu_seconds()
            self0 = _own_cpu()
            t0 = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(args.throughput_runs)))
            ingest_s = time.perf_counter() - t0
            await _wait(lambda: _done(client, orch.url, before + total), 600)
            elapsed = time.perf_counter() - t0
            cpu = orch.cpu_seconds() - cpu0
            busy1 = machine_busy()
            own_cpu = _own_cpu() - self0
            if spy is not None:
                spy.wait()
    finally:
        for agent in agents:
            await agent.stop()
        orch.stop()
    wrong = sum(a.wrong_secrets for a in agents)
    if wrong:
        raise RuntimeError(f"{wrong} dispatches did not carry the {args.secrets} declared secrets")
    return {
        "agents": args.agents,
        "secrets_per_job": args.secrets,
        "latency": {
            "webhooks": args.latency_webhooks,
            "rate_per_s": args.rate,
            "dispatched": len(latencies),
            "p50_ms": round(statistics.median(latencies), 2),
            "p95_ms": round(percentile(latencies, 95), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies), 2),
            "webhook_response_p50_ms": round(statistics.median(responses), 2),
        },
        "throughput": {
            "runs": args.throughput_runs,
            "jobs_per_run": args.jobs_per_run,
            "jobs": total,
            "webhooks_posted_s": round(ingest_s, 2),
            "elapsed_s": round(elapsed, 2),
            "completed_jobs_per_s": round(total / elapsed, 1),
            "machine_cpu_busy_pct": round(100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1),
            "orchestrator_cpu_s": round(cpu, 2),
            "orchestrator_cpu_ms_per_job": round(cpu * 1000 / total, 2),
            "load_generator_cpu_s": round(own_cpu, 2),
        },
    }


async def _done(client: httpx.AsyncClient, base: str, expected: float) -> bool:
    return await finished_jobs(client, base) >= expected


async def _wait(check: Any, within: float) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not finished within {within} s")
        await asyncio.sleep(0.1)


async def on_each_database(
    args: argparse.Namespace, prefix: str, bench_one: Callable[[str, Path, argparse.Namespace], Awaitable[Any]]
) -> dict[str, Any]:
    """`bench_one(database_url, work_dir, args)` on SQLite and/or a fresh PostgreSQL database (`args.db`:
    sqlite, postgresql or both), each in a temp dir removed afterwards: {db: its result}."""
    results: dict[str, Any] = {}
    for db in (["sqlite", "postgresql"] if args.db == "both" else [args.db]):
        work = Path(tempfile.mkdtemp(prefix=f"{prefix}-{db}-"))
        try:
            if db == "sqlite":
                results[db] = await bench_one(f"sqlite:///{work / 'kici.db'}", work, args)
            else:
                url, name = await fresh_postgres(args.postgres_url)
                try:
                    results[db] = await bench_one(url, work, args)
                finally:
                    await drop_postgres(args.postgres_url, name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return results


async def fresh_postgres(base_url: str) -> tuple[str, str]:
    import asyncpg

    name = f"kici_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return base_url.rsplit("/", 1)[0] + "/" + name, name


async def drop_postgres(base_url: str, name: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(base_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def cpu_reference() -> float:
    """Seconds for a fixed pure-Python loop: how fast this host was during the run."""
    start = time.perf_counter()
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    return round(time.perf_counter() - start, 3)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference()},
        "date": time.strftime("%Y-%m-%d"),
    }
    result.update(await on_each_database(args, "kici-bench", bench_one))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rate", type=float, default=20.0, help="webhooks per second in the latency phase")
    parser.add_argument("--latency-webhooks", type=int, default=300)
    parser.add_argument("--throughput-runs", type=int, default=200)
    parser.add_argument("--jobs-per-run", type=int, default=10)
    parser.add_argument("--secrets", type=int, default=0, help="secrets every job declares (all exist)")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "KICI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--quick", action="store_true", help="a short pass: 5 agents, few webhooks")
    args = parser.parse_args()
    if args.quick:
        args.agents, args.latency_webhooks, args.throughput_runs, args.jobs_per_run = 5, 10, 5, 4
        args.rate = 50.0
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
