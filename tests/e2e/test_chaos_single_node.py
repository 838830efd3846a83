"""Chaos on one orchestrator: twenty `kill -9` cycles under load on two agents, on SQLite and PostgreSQL. A
matrix run is in flight from the start and every restarted orchestrator receives a new push before it dies, so
each kill lands while jobs are queued, running and finishing. Every job must end `success` and every step
must have run exactly once: no job failed that never started (the agent reconnecting without it), none
declared stale for heartbeats no orchestrator could receive (the stale threshold here is 4 s, and every
fourth outage lasts longer than that), none run twice."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import git, write_files

from .conftest import WORKFLOW_HEADER, System, wait_for

CYCLES = 20
FIRST_RUN_JOBS = 30
PUSH_JOBS = 4
STALE_S = 4


@pytest.mark.timeout(900)  # twenty restarts of a real orchestrator: minutes on a loaded machine
def test_twenty_kill9_cycles_under_load_lose_nothing(system: System, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # Jobs of mixed lengths: short ones keep dispatch and results flowing through every restart, long ones
    # (2 s) outlive a restart, so their heartbeats go unheard while no orchestrator runs.
    step_script = (f'echo ran >> "{marks}/$KICI_JOB_ID"; '
                   'case "$KICI_JOB" in *0\\\\)|*5\\\\)) sleep 2;; *) sleep 0.3;; esac')
    workflow = WORKFLOW_HEADER + f'''

first = job("first", matrix={{"i": list(range({FIRST_RUN_JOBS}))}}, steps=[step("mark", '{step_script}')])
more = job("more", matrix={{"i": list(range({PUSH_JOBS}))}}, steps=[step("mark", '{step_script}')])

ci = workflow("ci", on=[push(branches=["main"], paths=[".kici/**"])], jobs=[first])
pushes = workflow("pushes", on=[push(branches=["main"], paths=["load/**"])], jobs=[more])
'''
    stale_fast = {"KICI_JOB_HEARTBEAT_INTERVAL_MS": "1000", "KICI_STALE_DETECTOR_THRESHOLD_MULTIPLIER": "4.0"}
    orchestrator = system.start_orchestrator(**stale_fast)
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="3")
    system.start_agent("a2", KICI_MAX_CONCURRENCY="3")
    shas = [system.commit({".kici/workflows/ci.py": workflow}, "thirty jobs")]
    system.wait_run(shas[0], "running")
    rng = random.Random(11)
    for cycle in range(CYCLES):
        # a push to the live orchestrator (the hook posts it), then the kill at a different moment each cycle:
        # right away (agents still re-registering, results in flight), once both agents are back, or once
        # more work has started
        shas.append(push_load(system, cycle))
        wait_for(lambda: any(r["sha"] == shas[-1] for r in system.runs()), within=30, what="the push's run")
        moment = rng.choice(["now", "agents", "progress"])
        if moment != "now":
            wait_for(lambda: connected(system) == 2, within=30, what="both agents to reconnect")
        pushed = FIRST_RUN_JOBS + (cycle + 1) * PUSH_JOBS
        seen = len(list(marks.iterdir()))
        if moment == "progress" and seen < pushed:  # (unless every job pushed so far has started)
            wait_for(lambda n=seen: len(list(marks.iterdir())) > n, within=30, what="another job to start")
        orchestrator.proc.send_signal(signal.SIGKILL)
        orchestrator.proc.wait(timeout=10)
        if cycle % 4 == 3:  # an outage longer than the stale threshold: heartbeats nobody could receive
            killed = time.monotonic()
            wait_for(lambda t=killed: time.monotonic() - t > STALE_S + 1, within=STALE_S + 5, what="the outage")
        orchestrator = system.start_orchestrator(**stale_fast)
    statuses: dict[str, str] = {}
    failed: dict[str, tuple[str, str | None]] = {}
    for sha in shas:
        final = system.wait_run(sha, "success", "failed", "cancelled", within=180)
        statuses[sha] = final["status"]
        for name, j in system.jobs(final["id"]).items():
            if j["status"] != "success":
                failed[f"{sha[:7]} {name}"] = (j["status"], j.get("error"))
    assert not failed, failed
    assert set(statuses.values()) == {"success"}, statuses
    ran = {p.name: p.read_text().count("ran") for p in marks.iterdir()}
    assert len(ran) == FIRST_RUN_JOBS + CYCLES * PUSH_JOBS, len(ran)
    twice = {job_id: count for job_id, count in ran.items() if count != 1}
    assert not twice, twice


def push_load(system: System, cycle: int) -> str:
    """A commit touching only `load/` (the lock file unchanged, nothing to compile): a four-job run."""
    write_files(system.repo, {f"load/{cycle}.txt": f"{cycle}\n"})
    git(system.repo, "add", "-A")
    git(system.repo, "commit", "-q", "-m", f"load {cycle}")
    return git(system.repo, "rev-parse", "HEAD").strip()


def connected(system: System) -> int:
    try:
        return sum(a["connected"] for a in system.admin("GET", "/agents").json())
    except httpx.HTTPError:
        return 0
