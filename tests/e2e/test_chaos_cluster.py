"""Chaos in a cluster: three orchestrator processes on one PostgreSQL database, four real agents each given
all three URLs, one push creating a 200-job matrix, and a `kill -9` of a random orchestrator every few
seconds, restarted (same node name, same data dir) after a short random delay, at least one node up at any
time, until every job is terminal.

Every job must end `success` (none fails on its own), every step must have run exactly once (each run of
the step appends a line to a marks file named by the job id), and no job may fail that never started. The
lease is short (3 s) so a dead node's agents and jobs are taken over quickly; the agents' jobs heartbeat
every second and are declared stale after 4 s without one, so an outage nobody accounts for fails jobs."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import die_with_test_run
from tests.integration.orchestrator.conftest import OrchestratorProcess, orchestrator_env

from .conftest import FAST, OWNER_TOKEN, WORKFLOW_HEADER, System, free_port, wait_for

NODES = 3
AGENTS = 4
JOBS = 200
SLOW_EVERY = 10
"""Jobs whose index is a multiple of this sleep SLOW_S (they span kills); the others 0.2–0.6 s."""
SLOW_S = 5
LEASE_S = 3
BUDGET_S = 240.0
"""The whole chaos phase, from the push to every job terminal."""
TERMINAL = ("success", "failed", "cancelled", "timed_out", "timed_out_stale", "skipped")

CLUSTER_ENV = {
    "KICI_NODE_LEASE_SECONDS": str(LEASE_S),
    "KICI_CLUSTER_POLL_MS": "200",
    "KICI_SCHEDULER_INTERVAL_MS": "500",
    "KICI_SECRET_KEY": "cd" * 32,
    "KICI_AGENT_MAX_RECONNECT_DELAY_MS": "10000",
    "KICI_JOB_HEARTBEAT_INTERVAL_MS": "1000",
    "KICI_STALE_DETECTOR_THRESHOLD_MULTIPLIER": "4.0",
}


@dataclass
class ClusterNode:
    name: str
    port: int
    data_dir: Path
    process: OrchestratorProcess | None = None
    ready: bool = False
    restart_at: float | None = None
    incarnations: list[OrchestratorProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check_ready(self) -> bool:
        if self.process is not None and not self.ready:
            self.ready = any(e.get("event") == "orchestrator.ready" for e in self.process.events())
        return self.ready


class Chaos:
    """The three nodes, started, killed and restarted by the test; every process ends with the test."""

    def __init__(self, system: System, rng: random.Random) -> None:
        self.system = system
        self.rng = rng
        self.nodes = [ClusterNode(f"node-{i}", system.port if i == 0 else free_port(), system.tmp / f"data-{i}")
                      for i in range(NODES)]
        self.kills = 0

    def start(self, node: ClusterNode) -> None:
        env = orchestrator_env(self.system.tmp, {
            **FAST, **CLUSTER_ENV, "KICI_PORT": str(node.port), "KICI_DATA_DIR": str(node.data_dir),
            "KICI_NODE_NAME": node.name, "KICI_DATABASE_URL": self.system.database_url,
            "KICI_BOOTSTRAP_ADMIN_TOKEN": OWNER_TOKEN,
        })
        proc = subprocess.Popen([sys.executable, "-m", "kici.orchestrator"], env=env, cwd=self.system.tmp,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, preexec_fn=die_with_test_run)
        node.process = OrchestratorProcess(proc)
        node.incarnations.append(node.process)
        self.system.orchestrators.append(node.process)  # killed by the fixture's teardown, whatever happens
        node.ready = False
        node.restart_at = None

    def kill(self, node: ClusterNode, restart_in: float) -> None:
        assert node.process is not None
        node.process.proc.send_signal(signal.SIGKILL)
        node.process.proc.wait(timeout=10)
        node.process = None
        node.ready = False
        node.restart_at = time.monotonic() + restart_in
        self.kills += 1

    def tend(self) -> None:
        """Restart the nodes whose delay is over; notice the ones that became ready; fail on one that died
        by itself."""
        now = time.monotonic()
        for node in self.nodes:
            if node.process is None and node.restart_at is not None and now >= node.restart_at:
                self.start(node)
            elif node.process is not None:
                node.check_ready()
                code = node.process.proc.poll()
                if code is not None:
                    raise AssertionError(f"{node.name} exited by itself ({code}):\n{node.process.stderr[-8000:]}")

    def up(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.ready]

    def admin(self, path: str) -> Any:
        """GET an admin route through any ready node (one may die under the request): the JSON, or None."""
        for node in self.rng.sample(self.up(), len(self.up())):
            try:
                response = httpx.get(f"{node.url}/api/v1/admin{path}", timeout=10,
                                     headers={"Authorization": f"Bearer {OWNER_TOKEN}"})
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                return response.json()
        return None

    def stop_all(self) -> list[int | None]:
        """Kill every incarnation; their logs stay in the test's temp dir (`orchestrator-<node>-<n>.log`)."""
        for node in self.nodes:
            for i, process in enumerate(node.incarnations):
                process.kill()
                (self.system.tmp / f"orchestrator-{node.name}-{i}.log").write_text(process.stderr)
        return [p.proc.poll() for n in self.nodes for p in n.incarnations]

    def event_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            for process in node.incarnations:
                for event in process.events():
                    name = str(event.get("event", ""))
                    if name.startswith(("cluster.", "dispatch.", "sweep.", "agent.")):
                        counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def diagnostics(self, interesting: tuple[str, ...] = ("cluster.", "dispatch.", "sweep.", "job.", "agent.")) -> str:
        parts = []
        for node in self.nodes:
            for i, process in enumerate(node.incarnations):
                events = [e for e in process.events() if str(e.get("event", "")).startswith(interesting)
                          and e.get("event") not in ("job.status", "agent.heartbeat")]
                parts.append(f"--- {node.name} #{i} ---\n" + "\n".join(map(str, events[-60:])))
                errors = [line for line in process.lines if "Traceback" in line or '"level": "error"' in line]
                if errors:
                    parts.append("errors:\n" + "\n".join(errors[-20:]))
        for agent in self.system.agents:
            parts.append(f"--- agent {agent.work_dir.name} ---\n{agent.output()[-4000:]}")
        return "\n".join(parts)


@pytest.mark.timeout(420)  # three orchestrators, four agents and 200 jobs on a loaded 2-core machine
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_kill_9_of_random_nodes_under_a_200_job_matrix_loses_nothing(system: System, tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)  # a new sequence of kills each run; a failure names its seed
    rng = random.Random(seed)
    chaos = Chaos(system, rng)
    marks = tmp_path / "marks"
    marks.mkdir()
    # the index is the matrix value in the job name, `work (17)`
    script = (f'echo "ran $(date +%s.%N)" >> "{marks}/$KICI_JOB_ID"; i=${{KICI_JOB##*(}}; i=${{i%)}}; '
              f'if [ $((i % {SLOW_EVERY})) -eq 0 ]; then sleep {SLOW_S}; else sleep 0.$((i % 5 + 2)); fi')
    workflow = WORKFLOW_HEADER + f'''
work = job("work", matrix={{"i": list(range({JOBS}))}}, steps=[step("mark", {script!r})])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[work])
'''
    try:
        for node in chaos.nodes:
            chaos.start(node)
        for node in chaos.nodes:
            wait_for(lambda n=node: n.check_ready() or n.process.proc.poll() is not None,  # type: ignore[union-attr]
                     within=60, what=f"{node.name} to be ready")
            assert node.ready, node.process.stderr if node.process else node.name
        system.register_source()
        urls = [n.url for n in chaos.nodes]
        for i in range(AGENTS):  # each agent starts on another node and knows all three
            order = urls[i % NODES:] + urls[:i % NODES]
            system.start_agent(f"a{i}", KICI_MAX_CONCURRENCY="2", KICI_ORCHESTRATOR_URL=",".join(order))

        sha = system.commit({".kici/workflows/ci.py": workflow}, "a 200-job matrix")
        run = system.wait_run(sha, "running", within=60)
        started = time.monotonic()
        next_kill = started + rng.uniform(1.0, 3.0)
        jobs: list[dict[str, Any]] = []
        polled = 0.0
        while True:
            chaos.tend()
            now = time.monotonic()
            if now - polled > 1.0:
                polled = now
                found = chaos.admin(f"/runs/{run['id']}/jobs")
                if found is not None:
                    jobs = found
                if len(jobs) == JOBS and all(j["status"] in TERMINAL for j in jobs):
                    break
            if now >= next_kill:
                # any running node, ready or still joining (a crash loop), as long as another one is ready
                # (joining ones a fifth of the time)
                victims = [n for n in chaos.nodes if n.process is not None
                           and any(o is not n for o in chaos.up())]
                victims = [n for n in victims if n.ready != (rng.random() < 0.2)]
                if victims:
                    chaos.kill(rng.choice(victims), restart_in=rng.uniform(0.2, 6.0))
                next_kill = now + rng.uniform(1.0, 3.0)
            if now - started > BUDGET_S:
                pending = {j["name"]: j["status"] for j in jobs if j["status"] not in TERMINAL}
                raise AssertionError(f"jobs not terminal after {BUDGET_S} s ({chaos.kills} kills, seed {seed}): "
                                     f"{pending}\n{chaos.diagnostics()}")
            time.sleep(0.05)  # the poll's tick: the loop itself waits for the jobs being terminal
        elapsed = time.monotonic() - started

        failed = {j["name"]: (j["status"], j.get("error")) for j in jobs if j["status"] != "success"}
        ran = {p.name: p.read_text().count("ran") for p in marks.iterdir()}
        never_started = {name: why for name, why in failed.items()
                         if next(j["id"] for j in jobs if j["name"] == name) not in ran}
        twice = {job_id: count for job_id, count in ran.items() if count != 1}
        summary = f"{chaos.kills} kills in {elapsed:.0f} s, seed {seed}"
        assert not never_started, (f"jobs failed that never started ({summary}): {never_started}\n"
                                   f"{chaos.diagnostics()}")
        assert not failed, f"{summary}: {failed}\n{chaos.diagnostics()}"
        assert not twice, f"steps run more than once ({summary}): {twice}\n{chaos.diagnostics()}"
        assert set(ran) == {j["id"] for j in jobs}, summary
        assert chaos.kills >= 5, f"the chaos was too short to mean much: {summary}"
        final = wait_for(lambda: (r := chaos.admin(f"/runs/{run['id']}")) and r["status"] in TERMINAL and r,
                         within=30, what="the run's own status")
        assert final["status"] == "success", final
        print(summary, chaos.event_counts())
    finally:
        codes = chaos.stop_all()
    assert None not in codes, "an orchestrator outlived the test"
