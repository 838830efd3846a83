"""Resource limits on a real agent: a memory hog fails with the `memory_limit` category and the agent runs
the next job; a fork loop stops at the pids limit; the CPU quota lands in the job's cgroup; rlimits as the
fallback; limits under bwrap; and settings the agent refuses at start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kici.agent.sandbox.limits import Cgroup1Limiter, LimitsUnavailable

from .conftest import AgentFactory, FakeOrchestrator, WorkflowRepo, dispatch, workflow_repo

pytestmark = pytest.mark.timeout(120)


def _cgroup1_works() -> bool:
    try:
        Cgroup1Limiter().probe()
    except LimitsUnavailable:
        return False
    return True


requires_cgroup1 = pytest.mark.skipif(not _cgroup1_works(), reason="no writable cgroup v1 memory/pids/cpu here")

BODY = """
from kici import Resources

HOG = "python3 -c \\"x = 'x' * (1024 << 20); print('still alive with', len(x))\\""

FORKS = '''
import os, sys, time
children = []
try:
    for _ in range(300):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    print("forked", len(children), "without a limit")
except OSError as exc:
    print("forked", len(children), "then:", exc)
for pid in children:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
sys.exit(1)
'''

def own_cgroup(ctx):
    found = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.strip().split(":", 2)
            for controller in controllers.split(","):
                found[controller] = path
    def read(controller, name):
        with open(f"/sys/fs/cgroup/{controller}{found[controller]}/{name}") as handle:
            return handle.read().strip()
    return {"memory": read("memory", "memory.limit_in_bytes"), "pids": read("pids", "pids.max"),
            "cpu_quota": read("cpu", "cpu.cfs_quota_us"), "cpu_period": read("cpu", "cpu.cfs_period_us")}

hog = job("hog", steps=[HOG], resources=Resources(memory="128M"))
def write_forks(ctx):
    with open("forks.py", "w") as handle:
        handle.write(FORKS)

forks = job("forks", steps=[step("write", write_forks), step("forks", "python3 forks.py")],
            resources=Resources(pids=40))
fine = job("fine", steps=[step("cgroup", own_cgroup), "echo fine"], resources=Resources(cpus=0.5, pids=200))
greedy = job("greedy", steps=["true"], resources=Resources(memory="8G"))
ci = workflow("ci", on=[push(branches=["main"])], jobs=[hog, forks, fine, greedy])
"""


async def _run(orchestrator: FakeOrchestrator, repo: WorkflowRepo, job: str) -> dict[str, Any]:
    """Dispatch `job` with its lock file's `resources` (as the orchestrator does) and wait for its end."""
    lock_job = next(j for j in repo.workflow()["jobs"] if j["name"] == job)
    message = dispatch(repo, job, resources=lock_job.get("resources"))
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    final["setup"] = orchestrator.log_lines(message["job_id"], -1)
    final["logs"] = orchestrator.log_lines(message["job_id"])
    return final


@requires_cgroup1
async def test_a_memory_hog_fails_with_the_category_and_the_agent_lives(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", BODY)
    assert repo.workflow()["jobs"][0]["resources"] == {"memory": 128 << 20}
    agent = start_agent(orchestrator, KICI_JOB_MAX_MEMORY="1G")
    await orchestrator.wait_registered()

    hog = await _run(orchestrator, repo, "hog")
    assert hog["state"] == "failed", hog
    assert hog["failure_category"] == "memory_limit"
    assert str(hog["error"]).startswith("memory limit exceeded: the job's processes reached their limit of 128 MiB")
    assert not any(line.startswith("still alive with") for line in hog["logs"])
    assert any("enforced by cgroup v1" in line and "memory=128 MiB" in line for line in hog["setup"])

    fine = await _run(orchestrator, repo, "fine")  # the agent survived and runs the next job
    assert fine["state"] == "success", fine
    seen = fine["outputs"]["cgroup"]
    assert seen["cpu_quota"] == "50000" and seen["cpu_period"] == "100000"
    assert seen["pids"] == "200"
    assert agent.proc.poll() is None

    greedy = await _run(orchestrator, repo, "greedy")  # above KICI_JOB_MAX_MEMORY: refused, not lowered
    assert greedy["state"] == "failed"
    assert greedy["failure_category"] == "resources"
    assert "memory=8 GiB is above this agent's maximum 1 GiB" in str(greedy["error"])
    assert _leftover_cgroups() == []


@requires_cgroup1
async def test_a_fork_loop_stops_at_the_pids_limit(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", BODY)
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    forks = await _run(orchestrator, repo, "forks")
    assert forks["state"] == "failed"
    assert forks["failure_category"] == "pids_limit", "\n".join(forks["logs"])
    counts = [line for line in forks["logs"] if line.startswith("forked ")]
    assert counts and "then:" in counts[0], counts
    assert int(counts[0].split()[1]) < 40
    assert _leftover_cgroups() == []


def _leftover_cgroups() -> list[str]:
    limiter = Cgroup1Limiter()
    return [str(p) for base in limiter.bases.values() for p in base.glob("kici-job-*")]


async def test_rlimits_as_the_fallback(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) missing")
    repo = workflow_repo(tmp_path / "repo", BODY)
    start_agent(orchestrator, KICI_RESOURCE_LIMITS="rlimit")
    await orchestrator.wait_registered()
    hog = await _run(orchestrator, repo, "hog")
    assert hog["state"] == "failed"
    assert any("MemoryError" in line for line in hog["logs"])
    assert any("enforced by rlimits" in line and "RLIMIT_AS" in line for line in hog["setup"])


@requires_cgroup1
async def test_limits_apply_inside_bwrap(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap missing")
    repo = workflow_repo(tmp_path / "repo", BODY)
    start_agent(orchestrator, KICI_SANDBOX="bwrap")
    await orchestrator.wait_registered()
    hog = await _run(orchestrator, repo, "hog")
    assert hog["failure_category"] == "memory_limit", hog
    assert "sandbox: bwrap (network host)" in hog["setup"]


def _agent(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kici.agent"], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"KICI_RESOURCE_LIMITS": "cgroup2"}, "KICI_RESOURCE_LIMITS=cgroup2: cgroup v2: "),
        ({"KICI_JOB_MEMORY": "lots"}, "KICI_JOB_MEMORY: memory='lots' must be a size such as 512M, 4G or 1.5G"),
        ({"KICI_JOB_MEMORY": "2G", "KICI_JOB_MAX_MEMORY": "1G"}, "KICI_JOB_MEMORY is above KICI_JOB_MAX_MEMORY"),
        ({"KICI_JOB_CPUS": "0"}, "KICI_JOB_CPUS: cpus='0' must be a number of CPUs greater than 0"),
        ({"KICI_SANDBOX_NETWORK": "isolated"}, "KICI_SANDBOX_NETWORK: Input should be 'host' or 'none'"),
    ],
)
def test_bad_limit_settings_stop_the_agent(
    agent_env: Callable[..., dict[str, str]], settings: dict[str, str], expected: str
) -> None:
    if "cgroup2" in str(settings.values()) and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        pytest.skip("this machine may have a usable cgroup v2 hierarchy")
    out = _agent(agent_env(None, KICI_ORCHESTRATOR_URL="http://127.0.0.1:9", **settings))
    assert out.returncode == 2, out
    assert expected in out.stderr, out.stderr
