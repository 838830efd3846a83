"""End-to-end benchmark: a real orchestrator (SQLite, the embedded default), real `kici-agent` processes
and a local git repository with compiled workflows; webhooks posted over HTTP, signed as the git hook
signs them.

- latency: one-step `true` workflow, one run at a time (default 30): webhook → run success, median and
  p95, split into phases from the orchestrator's own timestamps and the agent's `job.cloned` log:
  ingest (webhook answered, run created), dispatch (queued → handed to the agent), clone, runner start
  (to the first step starting), step, report (step end → run finished);
- throughput: 100 pushes posted back to back (distinct deliveries of the same commit) with 4 agents:
  runs completed per second, from the first post to the last run finished;
- logs: a step printing 1,000,000 lines (`seq`), timed from the step's start to the job finished (every
  line stored: the agent sends the job's status after its last log chunk); the lines stored are counted;
- per-job CPU: the CPU time (user + system) of every process of the throughput phase — the orchestrator,
  the agents, and everything they started (git, runners, the runner forkserver and its children) — read
  from /proc before and after the phase with everything idle, divided by the pushes. A process's own
  time is `utime + stime`; its exited children's (reaped, recursively) is `cutime + cstime`: summing both
  over the live processes of the tree counts every process once, also those that came and went.

Prints one JSON object.

    .venv/bin/python bench/e2e.py            # full
    .venv/bin/python bench/e2e.py --quick    # 3 runs, 10 pushes, 20,000 lines (the test suite runs this)
    .venv/bin/python bench/e2e.py --no-prestart   # agents spawn a new runner interpreter per job
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import (  # the sibling benchmark's orchestrator and webhook helpers
    ADMIN_TOKEN,
    WEBHOOK_SECRET,
    Orchestrator,
    cpu_reference,
    git,
    machine_busy,
    percentile,
    post_push,
)

WORKFLOWS = '''\
from kici import job, push, step, workflow

quick = workflow("quick", on=[push(branches=["main"])], jobs=[job("true", steps=[step("true", "true")])])
logs = workflow("logs", on=[push(branches=["logs"])],
                jobs=[job("print", steps=[step("seq", "seq 1 {lines}")])])
'''


def _ts(value: str | None) -> float:
    assert value is not None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _cpu_fields(pid: int) -> tuple[int, int, int, str] | None:
    """(ppid, own ticks, reaped children's ticks, command line) of a live process, None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]), cmdline


def tree_cpu(orchestrator: int, agents: list[int]) -> dict[str, float]:
    """CPU seconds so far of the orchestrator's and the agents' whole process trees, by role: `orchestrator`
    (its tree), `agent` (the agent processes themselves), `forkserver` (the runner forkservers
    themselves), `job_processes` (everything the agents and forkservers started: git, runners, steps)."""
    procs: dict[int, tuple[int, int, int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _cpu_fields(int(name))) is not None:
            procs[int(name)] = fields
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in procs.items():
        children.setdefault(ppid, []).append(pid)

    def below(pid: int) -> list[int]:
        found, todo = [], list(children.get(pid, []))
        while todo:
            child = todo.pop()
            found.append(child)
            todo.extend(children.get(child, []))
        return found

    tick = os.sysconf("SC_CLK_TCK")
    roles = {"orchestrator": 0, "agent": 0, "forkserver": 0, "job_processes": 0}
    if orchestrator in procs:
        roles["orchestrator"] = sum(procs[p][1] + procs[p][2] for p in [orchestrator, *below(orchestrator)])
    for agent in agents:
        if agent not in procs:
            continue
        roles["agent"] += procs[agent][1]
        roles["job_processes"] += procs[agent][2]
        for pid in below(agent):
            _ppid, own, reaped, cmdline = procs[pid]
            if "kici.runner.forkserver" in cmdline:
                roles["forkserver"] += own
                roles["job_processes"] += reaped
            else:
                roles["job_processes"] += own + reaped
    return {role: ticks / tick for role, ticks in roles.items()}


class Agent:
    def __init__(self, name: str, url: str, token: str, work: Path, prestart: bool) -> None:
        self.log = work.parent / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update({
            "KICI_ORCHESTRATOR_URL": url, "KICI_AGENT_TOKEN": token, "KICI_AGENT_ID": name,
            "KICI_WORK_DIR": str(work), "KICI_LOG_LEVEL": "info",
            **({} if prestart else {"KICI_RUNNER_PRESTART": "false"}),  # unset: also runs code before the setting
            **({"KICI_AGENT_STEP_USER": "root"} if os.geteuid() == 0 else {}),
        })
        self.handle = open(self.log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "kici.agent"], env=env, stdout=self.handle,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def clone_ms(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            if '"job.cloned"' in line:
                event = json.loads(line)
                found[event["job_id"]] = float(event["duration_ms"])
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.handle.close()


class Bench:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work = work
        self.args = args
        self.repo = work / "repo"
        self.orch = Orchestrator(f"sqlite:///{work / 'kici.db'}", work / "data")
        self.agents: list[Agent] = []
        self.client = httpx.AsyncClient(timeout=120)
        self.hook = f"{self.orch.url}/webhook/default/git/bench"

    async def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.client.request(method, f"{self.orch.url}/api/v1/admin{path}",
                                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kwargs)
        response.raise_for_status()
        return response.json()

    def make_repo(self) -> dict[str, str]:
        (self.repo / ".kici" / "workflows").mkdir(parents=True)
        (self.repo / ".kici" / "workflows" / "bench.py").write_text(WORKFLOWS.format(lines=self.args.lines))
        git(self.repo, "init", "-q", "-b", "main")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
        subprocess.run([sys.executable, "-m", "kici", "compile"], cwd=self.repo, check=True, capture_output=True,
                       env=env)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", "bench")
        git(self.repo, "branch", "logs")
        sha = git(self.repo, "rev-parse", "HEAD")
        return {"main": sha, "logs": sha}

    async def start(self, agents: int) -> None:
        await self.orch.wait_ready(self.client)
        # as root (CI), `nobody` may not be able to run this Python: the agents' steps then run as root
        body = {"name": "bench", "labels": [], "allow_root_steps": os.geteuid() == 0}
        token = (await self.admin("POST", "/agent-tokens", json=body))["token"]
        await self.admin("POST", "/sources", json={"name": "bench", "kind": "git", "config": {"url": str(self.repo)},
                                                   "secrets": {"webhook_secret": WEBHOOK_SECRET}})
        for i in range(agents):
            self.agents.append(Agent(f"agent-{i}", self.orch.url, token, self.work / f"agent-{i}",
                                     not self.args.no_prestart))
        deadline = time.monotonic() + 60
        while len([a for a in await self.admin("GET", "/agents?connected=true")]) < agents:
            if time.monotonic() > deadline:
                raise RuntimeError("agents did not connect")
            await asyncio.sleep(0.05)

    async def run_of(self, delivery: str) -> dict[str, Any]:
        """The run a delivery created (read from the event log of the delivery)."""
        event = await self.admin("GET", f"/events/git:{await self.source_id()}:{delivery}")
        [run_id] = event["run_ids"]
        return dict(await self.admin("GET", f"/runs/{run_id}"))

    _source: str | None = None

    async def source_id(self) -> str:
        if self._source is None:
            self._source = str((await self.admin("GET", "/sources/bench"))["id"])
        return self._source

    async def wait_finished(self, run_id: str, within: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while True:
            run = dict(await self.admin("GET", f"/runs/{run_id}"))
            if run["finished_at"] is not None:
                return run
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id} did not finish: {run['status']}")
            # times come from the orchestrator's timestamps, so a slower poll costs no precision (and
            # leaves the orchestrator's CPU to the work being measured)
            await asyncio.sleep(0.05)

    async def latency(self, sha: str) -> dict[str, Any]:
        totals: list[float] = []
        phases: dict[str, list[float]] = {k: [] for k in ("ingest", "dispatch", "clone", "runner_start", "step",
                                                          "report")}
        for i in range(self.args.runs + 1):  # the first run warms caches (lock file, imports on disk)
            delivery = f"lat-{i}-{uuid.uuid4().hex[:8]}"
            t0 = time.time()
            await post_push(self.client, self.hook, "main", sha, delivery)
            answered = time.time()
            run = await self.run_of(delivery)
            run = await self.wait_finished(run["id"])
            if run["status"] != "success":
                raise RuntimeError(f"run {run['id']} ended {run['status']}: {run['failure_reason']}")
            if i == 0:
                continue
            [job] = await self.admin("GET", f"/runs/{run['id']}/jobs")
            queue_row = await self._dispatched_at(job["id"])
            steps = await self._steps(job["id"])
            clone = self.agents[0].clone_ms().get(job["id"], 0.0) / 1000
            started = _ts(job["started_at"])
            first_step = _ts(steps[0]["started_at"])
            totals.append(_ts(run["finished_at"]) - t0)
            phases["ingest"].append(answered - t0)
            phases["dispatch"].append(queue_row - _ts(job["queued_at"]))
            phases["clone"].append(clone)
            phases["runner_start"].append(max(0.0, first_step - started - clone))
            phases["step"].append(_ts(steps[-1]["finished_at"]) - first_step)
            phases["report"].append(_ts(run["finished_at"]) - _ts(steps[-1]["finished_at"]))
        return {
            "runs": len(totals),
            "median_s": round(statistics.median(totals), 3),
            "p95_s": round(percentile(totals, 95), 3),
            "phases_median_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in phases.items()},
        }

    async def _dispatched_at(self, job_id: str) -> float:
        # the dispatch time is on the queue row; read it from the database file (the API shows active rows)
        import sqlite3

        with sqlite3.connect(self.work / "kici.db") as db:
            (value,) = db.execute("SELECT dispatched_at FROM dispatch_queue WHERE job_id = ?", (job_id,)).fetchone()
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()

    async def _steps(self, job_id: str) -> list[dict[str, Any]]:
        import sqlite3

        with sqlite3.connect(self.work / "kici.db") as db:
            rows = db.execute("SELECT started_at, finished_at FROM steps WHERE job_id = ? ORDER BY step_index",
                              (job_id,)).fetchall()
        return [{"started_at": a, "finished_at": b} for a, b in rows]

    async def throughput(self, sha: str) -> dict[str, Any]:
        deliveries = [f"tp-{i}-{uuid.uuid4().hex[:8]}" for i in range(self.args.pushes)]
        cpu0 = await self.idle_cpu()
        busy0 = machine_busy()
        t0 = time.time()
        for delivery in deliveries:
            await post_push(self.client, self.hook, "main", sha, delivery)
        posted = time.time() - t0
        runs = [await self.run_of(d) for d in deliveries]
        finished = [await self.wait_finished(r["id"], within=600) for r in runs]
        failed = [r for r in finished if r["status"] != "success"]
        if failed:
            raise RuntimeError(f"{len(failed)} runs did not succeed: {failed[0]['failure_reason']}")
        last = max(_ts(r["finished_at"]) for r in finished)
        busy1 = machine_busy()
        cpu1 = await self.idle_cpu()
        per_job = {role: round((cpu1[role] - cpu0[role]) / len(deliveries) * 1000, 1) for role in cpu0}
        return {
            "cpu_per_job_ms": {"total": round(sum(per_job.values()), 1), **per_job},
            "machine_cpu_busy_pct": round(100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1),
            "pushes": len(deliveries),
            "agents": len(self.agents),
            "posting_s": round(posted, 2),
            "elapsed_s": round(last - t0, 2),
            "runs_per_s": round(len(deliveries) / (last - t0), 2),
        }

    async def idle_cpu(self) -> dict[str, float]:
        """`tree_cpu` with the machinery idle: called before the first push and after the last run finished
        (an agent has cleaned up a job before it reports it finished; the pause lets the last status
        messages settle)."""
        await asyncio.sleep(0.5)
        return tree_cpu(self.orch.proc.pid, [a.proc.pid for a in self.agents])

    async def log_throughput(self, sha: str) -> dict[str, Any]:
        delivery = f"logs-{uuid.uuid4().hex[:8]}"
        await post_push(self.client, self.hook, "logs", sha, delivery)
        run = await self.wait_finished((await self.run_of(delivery))["id"], within=600)
        if run["status"] != "success":
            raise RuntimeError(f"log run ended {run['status']}: {run['failure_reason']}")
        [job] = await self.admin("GET", f"/runs/{run['id']}/jobs")
        steps = await self._steps(job["id"])
        elapsed = _ts(job["finished_at"]) - _ts(steps[0]["started_at"])
        stored = 0
        after = 0
        while True:  # through the API, as an operator reads it (which also flushes the storage's buffer)
            page = await self.admin("GET", f"/runs/{run['id']}/jobs/{job['id']}/logs",
                                    params={"after": after, "limit": 5000})
            stored += sum(1 for x in page["lines"] if x["step"] == 0 and x["line"].strip().isdigit())
            if page["complete"] or not page["lines"]:
                break
            after = page["next"]
        return {
            "lines": self.args.lines,
            "lines_stored": stored,
            "elapsed_s": round(elapsed, 3),
            "lines_per_s": round(stored / elapsed),
        }

    async def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.orch.stop()
        await self.client.aclose()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "database": "sqlite (embedded default)",
        "runner_prestart": not args.no_prestart,
    }
    work = Path(tempfile.mkdtemp(prefix="kici-bench-e2e-"))
    bench = Bench(work, args)
    try:
        shas = bench.make_repo()
        await bench.start(agents=1)
        result["latency"] = await bench.latency(shas["main"])
        result["logs"] = await bench.log_throughput(shas["logs"])
        for i in range(1, args.agents):
            token = (await bench.admin("POST", "/agent-tokens", json={"name": f"bench-{i}", "labels": [],
                                                                 "allow_root_steps": os.geteuid() == 0}))["token"]
            bench.agents.append(Agent(f"agent-{i}", bench.orch.url, token, work / f"agent-{i}", not args.no_prestart))
        deadline = time.monotonic() + 60
        while len(await bench.admin("GET", "/agents?connected=true")) < args.agents:
            if time.monotonic() > deadline:
                raise RuntimeError("agents did not connect")
            await asyncio.sleep(0.05)
        result["throughput"] = await bench.throughput(shas["main"])
    finally:
        await bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pushes", type=int, default=100)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-prestart", action="store_true", help="KICI_RUNNER_PRESTART=false on the agents")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.pushes, args.lines = 3, 10, 20_000
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
