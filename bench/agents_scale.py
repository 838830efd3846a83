"""Agents at scale: what many connected agents cost one orchestrator node, how fast a reconnect storm is
absorbed, and completed jobs/s with one or several nodes on one PostgreSQL database.

Real `kici-orchestrator` processes (fresh PostgreSQL database, or an SQLite file); simulated agents speak
the real protocol over real WebSockets from several client processes (`--clients`, so the load generator is
not one Python process competing with the orchestrator for a core). Orchestrator CPU and RSS come from
/proc. Series (`--series`, all by default):

- **idle**: the node's CPU with no agents (baseline), then `--agents` agents connect at once (their first
  registration, rows created: reported as `first_registration`) and stay connected, heartbeating at the
  agents' default interval (`--heartbeat-s`, 30 s, first heartbeat right after registration like the real
  agent), for `--idle-s` (60 s): the node's CPU in % of one core over that window and its RSS.
- **storm**: `--in-flight` of the agents are given a job each (one webhook, a run of that many jobs; the agents
  acknowledge and report it running, then keep it), then every connection is cut (socket aborted, as when a
  node dies or the network between fails) and, once the node has recorded them all gone (their jobs
  `recovering`: `all_disconnects_handled_s`), all agents re-register at the same moment, reporting their
  in-flight jobs: time from that moment until every agent has its `register.ack` (and the jobs
  reclaimed), and the phases of a registration (WebSocket open, `auth.success`, `register.ack`).
  Repeated `--storms` times.
- **nodes**: `--nodes N` orchestrator processes on one fresh PostgreSQL database, 50 agents (`--tp-agents`)
  spread over them, webhooks spread over them, `--throughput-runs` runs of `--jobs-per-run` independent
  jobs: completed jobs/s until every node has recorded its jobs finished (as `bench/dispatch.py`'s
  throughput phase).

    .venv/bin/python bench/agents_scale.py                     # PostgreSQL: idle, storm, 1 node
    .venv/bin/python bench/agents_scale.py --series nodes --nodes 2
    .venv/bin/python bench/agents_scale.py --db both --series idle,storm
    .venv/bin/python bench/agents_scale.py --quick --db sqlite  # a short pass (the test suite runs this)

`BENCH_PROFILE=<file>` runs the (first) orchestrator under cProfile (CPU time; with `BENCH_PROFILER=yappi`
under yappi, when installed) and writes its stats there on exit (read them with `pstats`);
`BENCH_KEEP=1` keeps the temporary directory with the orchestrators' logs.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import (  # the sibling benchmark's orchestrator and webhook helpers
    ADMIN_TOKEN,
    REPO,
    WEBHOOK_SECRET,
    Orchestrator,
    SimAgent,
    cpu_reference,
    drop_postgres,
    finished_jobs,
    fresh_postgres,
    machine_busy,
    make_repo,
    percentile,
    post_push,
)

# -- the client processes (simulated agents) ---------------------------------------------------------

COMPRESSION = None if os.environ.get("BENCH_NO_DEFLATE") else "deflate"
"""Agents offer permessage-deflate like the real agent (websockets' default); BENCH_NO_DEFLATE=1: they
do not, to see what compression costs the orchestrator."""


class ScaleAgent:
    """One simulated agent: handshake, heartbeats, and jobs it is given kept running (`hold`)."""

    def __init__(self, agent_id: str, url: str, token: str, heartbeat_s: float) -> None:
        self.agent_id = agent_id
        self.url = url
        self.token = token
        self.heartbeat_s = heartbeat_s
        self.ws: ClientConnection | None = None
        self.jobs: dict[str, str] = {}
        """job id → run id of the jobs this agent was given and reports running."""
        self.reclaimed = 0
        self.heartbeats = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def register(self) -> tuple[float, float, float, float]:
        """Connect, authenticate and register (reporting the held jobs); the times it started, had the
        WebSocket open, `auth.success` and `register.ack`."""
        start = time.monotonic()
        self.ws = await connect(self.url, open_timeout=120, max_size=None, close_timeout=2,
                                compression=COMPRESSION)
        opened = time.monotonic()
        await self.ws.send(json.dumps({"type": "auth.request", "token": self.token, "protocolVersion": 1}))
        reply = json.loads(await self.ws.recv())
        if reply["type"] != "auth.success":
            raise RuntimeError(f"{self.agent_id}: {reply}")
        authenticated = time.monotonic()
        await self.ws.send(json.dumps({
            "type": "agent.register", "message_id": "m", "agent_id": self.agent_id, "labels": [],
            "max_concurrency": 1, "version": "bench", "hostname": "bench",
            "in_flight_jobs": [{"run_id": run, "job_id": job} for job, run in self.jobs.items()],
        }))
        ack = json.loads(await self.ws.recv())
        if ack["type"] != "register.ack":
            raise RuntimeError(f"{self.agent_id}: {ack}")
        done = time.monotonic()
        self.reclaimed = len(ack.get("reclaimed_jobs") or [])
        self.jobs = {job: run for job, run in self.jobs.items() if job in set(ack.get("reclaimed_jobs") or [])}
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._heartbeat())]
        return start, opened, authenticated, done

    async def _heartbeat(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.ws.send(json.dumps({"type": "heartbeat", "timestamp": time.time()}))
                self.heartbeats += 1
                await asyncio.sleep(self.heartbeat_s)

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                message = json.loads(frame)
                if message["type"] != "job.dispatch":
                    continue
                ids = {"run_id": message["run_id"], "job_id": message["job_id"]}
                await self.ws.send(json.dumps({"type": "job.ack", **ids}))
                await self.ws.send(json.dumps({"type": "job.status", **ids, "state": "running",
                                               "timestamp": time.time()}))
                self.jobs[message["job_id"]] = message["run_id"]

    def drop(self) -> None:
        """Cut the connection without a close handshake, as when the node (or the network) dies."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self.ws is not None:
            self.ws.transport.abort()
            self.ws = None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 3)


async def _register_all(agents: list[ScaleAgent], at: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    results = await asyncio.gather(*(a.register() for a in agents), return_exceptions=True)
    times = [r for r in results if isinstance(r, tuple)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return {
        "registered": len(times), "failed": len(errors), "errors": errors[:3],
        "last_ack": max((t[3] for t in times), default=at),
        "durations": [t[3] - t[0] for t in times],
        "open_s": [t[1] - t[0] for t in times],
        "auth_s": [t[2] - t[1] for t in times],
        "register_s": [t[3] - t[2] for t in times],
        "reclaimed": sum(a.reclaimed for a in agents),
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def client_main(args: argparse.Namespace) -> None:
    """A client process: `args.count` agents; commands on stdin, one JSON answer per line on stdout."""
    urls = args.url.split(",")
    agents = [
        ScaleAgent(f"scale-{i}", urls[i % len(urls)], args.token, args.heartbeat_s)
        for i in range(args.first, args.first + args.count)
    ]
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        answer: dict[str, Any] = {}
        if command["do"] == "register":
            answer = await _register_all(agents, command["at"])
        elif command["do"] == "drop":
            for agent in agents:
                agent.drop()
        elif command["do"] == "stats":
            answer = {"jobs": sum(len(a.jobs) for a in agents), "heartbeats": sum(a.heartbeats for a in agents)}
        elif command["do"] == "quit":
            break
        answer["cpu_s"] = _own_cpu()
        print(json.dumps(answer), flush=True)
    await asyncio.gather(*(a.close() for a in agents))


class Clients:
    """The client processes, each holding a share of the agents."""

    def __init__(self, processes: int, agents: int, url: str, token: str, heartbeat_s: float) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        share, extra = divmod(agents, processes)
        first = 0
        for i in range(processes):
            count = share + (1 if i < extra else 0)
            if count == 0:
                continue
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, "--client", "--url", url, "--token", token, "--first", str(first),
                 "--count", str(count), "--heartbeat-s", str(heartbeat_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))
            first += count

    async def ask(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        line = json.dumps(command) + "\n"
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line)
            proc.stdin.flush()

        def answer(proc: subprocess.Popen[str]) -> dict[str, Any]:
            assert proc.stdout is not None
            text = proc.stdout.readline()
            if not text:
                raise RuntimeError(f"client process exited with {proc.wait()}")
            return json.loads(text)  # type: ignore[no-any-return]

        return list(await asyncio.gather(*(asyncio.to_thread(answer, p) for p in self.procs)))

    async def register_all(self) -> dict[str, Any]:
        """Every agent of every client (re)registers at the same moment: the storm's numbers."""
        cpu0 = sum(a["cpu_s"] for a in await self.ask({"do": "stats"}))
        at = time.monotonic() + 0.5  # CLOCK_MONOTONIC is one clock for every process of the machine
        answers = await self.ask({"do": "register", "at": at})
        failed = sum(a["failed"] for a in answers)
        if failed:
            raise RuntimeError(f"{failed} agents could not register: {answers[0]['errors'] or answers[-1]['errors']}")
        durations = [d for a in answers for d in a["durations"]]

        def phase(name: str) -> dict[str, float]:
            values = [d for a in answers for d in a[name]]
            return {"p50": round(statistics.median(values), 3), "p99": round(percentile(values, 99), 3)}

        return {
            "agents": len(durations),
            "all_registered_s": round(max(a["last_ack"] for a in answers) - at, 3),
            "registration_p50_s": round(statistics.median(durations), 3),
            "registration_p99_s": round(percentile(durations, 99), 3),
            "phases_s": {"websocket_open": phase("open_s"), "auth": phase("auth_s"), "register": phase("register_s")},
            "reclaimed_jobs": sum(a["reclaimed"] for a in answers),
            "clients_cpu_s": round(sum(a["cpu_s"] for a in answers) - cpu0, 2),
        }

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"do": "quit"}) + "\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- orchestrator nodes --------------------------------------------------------------------------------


PROFILED = """
import os, runpy, sys
out, sys.argv = sys.argv[1], ["kici-orchestrator"]
if os.environ.get("BENCH_PROFILER") == "yappi":  # coroutine- and greenlet-aware: numbers per call are right
    import yappi
    yappi.set_clock_type("cpu")
    yappi.start()
    stop = lambda: (yappi.stop(), yappi.get_func_stats().save(out, type="pstat"))
else:  # the standard library's: an async function counts one call per resumption
    import cProfile, time
    profile = cProfile.Profile(time.process_time)  # CPU time: waits for a core or the database do not count
    profile.enable()
    stop = lambda: (profile.disable(), profile.dump_stats(out))
try:
    runpy.run_module("kici.orchestrator", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    stop()
"""
"""`python -c PROFILED <stats file>`: the orchestrator under cProfile, counting CPU time."""


class Node(Orchestrator):
    """An orchestrator process (`bench/dispatch.py`'s), optionally under cProfile, with /proc readings."""

    def __init__(self, database_url: str, data_dir: Path, profile: str | None = None) -> None:
        super().__init__(database_url, data_dir, python_args=("-c", PROFILED, profile) if profile else ())
        self.profiled = bool(profile)

    def stop(self) -> None:
        if self.profiled and self.proc.poll() is None:  # a profiled shutdown is slow: let it write its stats
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(180)
        super().stop()

    def memory_mb(self) -> dict[str, float]:
        """Resident set size now and its peak (VmRSS, VmHWM) in MiB."""
        found: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = round(int(value.split()[0]) / 1024, 1)
        return found

    def errors(self, limit: int = 3) -> str:
        """The node's last error log lines (to explain a failed series)."""
        lines = Path(self.stderr.name).read_text(errors="replace").splitlines()
        return "\n".join([line for line in lines if '"error"' in line][-limit:])

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"


async def metric(client: httpx.AsyncClient, node: Node, name: str) -> float:
    for line in (await client.get(f"{node.url}/metrics")).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


async def until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.1)


async def cpu_over(node: Node, seconds: float) -> float:
    """The node's CPU over the next `seconds`, in % of one core."""
    cpu0, t0 = node.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)
    return round(100 * (node.cpu_seconds() - cpu0) / (time.monotonic() - t0), 2)


async def admin_setup(client: httpx.AsyncClient, node: Node, repo: Path | None) -> str:
    """An agent token (and, with `repo`, the git source webhooks go to); the token's plaintext."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    created = await client.post(f"{node.url}/api/v1/admin/agent-tokens", headers=admin,
                                json={"name": "scale", "labels": []})
    created.raise_for_status()
    if repo is not None:
        source = await client.post(f"{node.url}/api/v1/admin/sources", headers=admin, json={
            "name": "bench", "kind": "git", "config": {"url": str(repo), "repo": REPO},
            "secrets": {"webhook_secret": WEBHOOK_SECRET}})
        source.raise_for_status()
    return str(created.json()["token"])


async def idle_and_storms(database_url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Series idle and storm on one node."""
    series = set(args.series)
    in_flight = args.in_flight if "storm" in series else 0
    repo = work / "repo"
    sha = make_repo(repo, max(1, in_flight)) if in_flight else ""
    node = Node(database_url, work / "data", os.environ.get("BENCH_PROFILE"))
    clients: Clients | None = None
    result: dict[str, Any] = {"agents": args.agents}
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            await node.wait_ready(client)
            token = await admin_setup(client, node, repo if in_flight else None)

            async def connected(n: int) -> bool:
                return await metric(client, node, "kici_agents_connected") == n

            async def all_rows_disconnected() -> bool:
                listed = await client.get(f"{node.url}/api/v1/admin/agents", params={"connected": "true"},
                                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                listed.raise_for_status()
                return not listed.json()

            if "idle" in series:
                await asyncio.sleep(args.settle_s)
                result["baseline_no_agents"] = {"cpu_pct_of_core": await cpu_over(node, args.baseline_s),
                                                **node.memory_mb()}
            clients = Clients(args.clients, args.agents, node.ws_url, token, args.heartbeat_s)
            cpu0 = node.cpu_seconds()
            first = await clients.register_all()
            first["orchestrator_cpu_s"] = round(node.cpu_seconds() - cpu0, 2)
            result["first_registration"] = first
            await until(lambda: connected(args.agents), 30, f"{args.agents} agents connected")
            if "idle" in series:
                await asyncio.sleep(args.settle_s)
                beats0 = sum(a["heartbeats"] for a in await clients.ask({"do": "stats"}))
                cpu = await cpu_over(node, args.idle_s)
                stats = await clients.ask({"do": "stats"})
                result["idle"] = {
                    "window_s": args.idle_s, "heartbeat_interval_s": args.heartbeat_s,
                    "heartbeats_received": sum(a["heartbeats"] for a in stats) - beats0,
                    "cpu_pct_of_core": cpu, **node.memory_mb(),
                }
            if "storm" in series:
                storms: list[dict[str, Any]] = []
                if in_flight:
                    await post_push(client, f"{node.url}/webhook/default/git/bench", "tp", sha, "in-flight")

                    async def holding() -> bool:
                        assert clients is not None
                        return sum(a["jobs"] for a in await clients.ask({"do": "stats"})) >= in_flight

                    await until(holding, 60, f"{in_flight} jobs running on the agents")
                for _ in range(args.storms):
                    dropped = time.monotonic()
                    await clients.ask({"do": "drop"})
                    await until(lambda: connected(0), 120, "the node to see every connection gone")
                    await until(all_rows_disconnected, 120, "every agent's row to say disconnected")
                    gone_s = time.monotonic() - dropped
                    cpu0 = node.cpu_seconds()
                    storm = await clients.register_all()
                    storm["all_disconnects_handled_s"] = round(gone_s, 2)
                    storm["orchestrator_cpu_s"] = round(node.cpu_seconds() - cpu0, 2)
                    storm["in_flight_jobs"] = in_flight
                    storm.update(node.memory_mb())
                    if storm["reclaimed_jobs"] != in_flight:
                        raise RuntimeError(f"{storm['reclaimed_jobs']} of {in_flight} in-flight jobs reclaimed")
                    storms.append(storm)
                    await until(lambda: connected(args.agents), 30, f"{args.agents} agents connected")
                result["storms"] = storms
            result.update({"final_" + k: v for k, v in node.memory_mb().items()})
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n{node.errors()}") from None
    finally:
        if clients is not None:
            clients.stop()
        node.stop()
    return result


async def nodes_throughput(database_url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Series nodes: `args.nodes` orchestrators on one database, `args.tp_agents` agents spread over them."""
    repo = work / "repo"
    sha = make_repo(repo, args.jobs_per_run)
    nodes: list[Node] = []
    agents: list[SimAgent] = []
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    try:
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            for i in range(args.nodes):  # one after the other: the first one migrates the database
                data = work / f"node{i}" / "data"
                data.parent.mkdir(parents=True)
                nodes.append(Node(database_url, data, os.environ.get("BENCH_PROFILE") if i == 0 else None))
                await nodes[-1].wait_ready(client)
            token = await admin_setup(client, nodes[0], repo)
            dispatched: dict[str, float] = {}
            for i in range(args.tp_agents):
                agent = SimAgent(i, nodes[i % len(nodes)].ws_url, token, dispatched)
                await agent.start()
                agents.append(agent)
            hooks = [f"{n.url}/webhook/default/git/bench" for n in nodes]

            async def finished() -> float:
                return sum([await finished_jobs(client, n.url) for n in nodes])

            for i, hook in enumerate(hooks):  # every node's lock-file cache filled
                await post_push(client, hook, "main", sha, f"warm-up-{i}")

            async def warmed() -> bool:
                return await finished() >= len(hooks)

            await until(warmed, 60, "the warm-up runs")
            before = await finished()
            total = args.throughput_runs * args.jobs_per_run
            semaphore = asyncio.Semaphore(8)

            async def post(i: int) -> None:
                async with semaphore:
                    await post_push(client, hooks[i % len(hooks)], "tp", sha, f"tp-{i}-{uuid.uuid4().hex[:8]}")

            cpu0 = [n.cpu_seconds() for n in nodes]
            busy0, pg0, own0 = machine_busy(), postgres_cpu(), _own_cpu()
            t0 = time.perf_counter()
            await asyncio.gather(*(post(i) for i in range(args.throughput_runs)))

            async def all_done() -> bool:
                return await finished() >= before + total

            await until(all_done, 600, f"{total} jobs finished")
            elapsed = time.perf_counter() - t0
            cpu = [n.cpu_seconds() - c for n, c in zip(nodes, cpu0, strict=True)]
            busy1, pg1, own1 = machine_busy(), postgres_cpu(), _own_cpu()
    finally:
        for agent in agents:
            await agent.stop()
        for node in nodes:
            node.stop()
    return {
        "nodes": args.nodes, "agents": args.tp_agents, "runs": args.throughput_runs,
        "jobs_per_run": args.jobs_per_run, "jobs": total, "elapsed_s": round(elapsed, 2),
        "completed_jobs_per_s": round(total / elapsed, 1),
        "orchestrator_cpu_s_per_node": [round(c, 2) for c in cpu],
        "orchestrator_cpu_ms_per_job": round(sum(cpu) * 1000 / total, 2),
        # where the two cores went: a second node only helps while the machine has CPU to spare
        "machine_cpu_busy_pct": round(100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1),
        "postgres_cpu_s": round(pg1 - pg0, 2),
        "bench_process_cpu_s": round(own1 - own0, 2),  # the 50 simulated agents and the webhook sender
    }


def postgres_cpu() -> float:
    """CPU seconds of every `postgres` process on the machine so far (/proc; the server is local)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1:stat.rindex(")")] != "postgres":
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def on_database(db: str, args: argparse.Namespace, bench: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"kici-scale-{db}-"))
    try:
        if db == "sqlite":
            return await bench(f"sqlite:///{work / 'kici.db'}", work, args)  # type: ignore[no-any-return]
        url, name = await fresh_postgres(args.postgres_url)
        try:
            return await bench(url, work, args)  # type: ignore[no-any-return]
        finally:
            await drop_postgres(args.postgres_url, name)
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {work} (orchestrator logs: orchestrator-<port>.log)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference(),
                    "load_average": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if {"idle", "storm"} & set(args.series):
        for db in dbs:
            result[db] = await on_database(db, args, idle_and_storms)
    if "nodes" in args.series:
        db = "sqlite" if args.db == "sqlite" else "postgresql"
        result[f"nodes_{db}"] = await on_database(db, args, nodes_throughput)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="postgresql")
    parser.add_argument("--series", default="idle,storm,nodes", help="comma-separated: idle, storm, nodes")
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4, help="client processes holding the agents")
    parser.add_argument("--heartbeat-s", type=float, default=30.0, help="agents' heartbeat interval")
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--baseline-s", type=float, default=20.0, help="CPU window with no agents connected")
    parser.add_argument("--settle-s", type=float, default=5.0, help="pause before each CPU window")
    parser.add_argument("--storms", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=100, help="agents holding a running job in the storm")
    parser.add_argument("--nodes", type=int, default=1, help="orchestrator processes in the nodes series")
    parser.add_argument("--tp-agents", type=int, default=50)
    parser.add_argument("--throughput-runs", type=int, default=200)
    parser.add_argument("--jobs-per-run", type=int, default=10)
    parser.add_argument("--postgres-url", default=os.environ.get(
        "KICI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--quick", action="store_true", help="a short pass of every series")
    # a client process (started by the benchmark itself)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main(args))
        return
    args.series = [s.strip() for s in args.series.split(",") if s.strip()]
    unknown = set(args.series) - {"idle", "storm", "nodes"}
    if unknown:
        parser.error(f"unknown series {sorted(unknown)}: choose from idle, storm, nodes")
    if args.nodes > 1 and args.db == "sqlite" and "nodes" in args.series:
        parser.error("several nodes share one PostgreSQL database: --nodes > 1 needs --db postgresql")
    if args.quick:
        args.agents, args.clients, args.idle_s, args.baseline_s, args.settle_s = 40, 2, 2.0, 1.0, 0.5
        args.storms, args.in_flight, args.throughput_runs, args.jobs_per_run, args.tp_agents = 1, 4, 4, 4, 5
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
