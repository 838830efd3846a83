"""The `userns` sandbox backend runs real jobs (skipped where unprivileged user namespaces are off)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import AgentFactory, FakeOrchestrator, dispatch, marker_pids, wait_until, workflow_repo

pytestmark = pytest.mark.timeout(120)


def _userns_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True,
                              timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


requires_userns = pytest.mark.skipif(not _userns_available(), reason="unprivileged user namespaces unavailable")

INSIDE = """
import os

def inside(ctx):
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    with open("/proc/1/cmdline", "rb") as f:
        init = f.read().split(b"\\0")
    return {{"uid": os.getuid(), "lowest_pid": pids[0], "init_is_runner": b"kici.runner" in init,
             "pids_seen": len(pids)}}

def sleeper(ctx):
    ctx.sh("setsid bash -c 'exec -a {marker}-setsid sleep 300' & exec -a {marker}-main sleep 300")

ns = job("ns", steps=[step("inside", inside), "echo in-namespace > result.txt && cat result.txt"])
hang = job("hang", steps=[step("sleeper", sleeper)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[ns, hang])
"""


@requires_userns
async def test_userns_backend_runs_a_job_in_its_own_namespaces(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str
) -> None:
    repo = workflow_repo(tmp_path / "repo", INSIDE.format(marker=marker))
    start_agent(orchestrator, KICI_SANDBOX="userns")
    await orchestrator.wait_registered()
    message = dispatch(repo, "ns")
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    inside = final["outputs"]["inside"]
    assert inside["uid"] == 0  # root mapped to the agent's own uid
    assert inside["lowest_pid"] == 1 and inside["init_is_runner"]  # a PID namespace of its own
    assert inside["pids_seen"] < 20
    assert "in-namespace" in orchestrator.log_lines(message["job_id"], 1)

    hang = dispatch(repo, "hang")
    await orchestrator.send(hang)
    await wait_until(lambda: len(marker_pids(marker)) >= 2, 30, "the step's processes")
    await orchestrator.send({"type": "job.cancel", "run_id": hang["run_id"], "job_id": hang["job_id"],
                             "reason": "stop", "force": False})
    final = await orchestrator.wait_terminal(hang["job_id"])
    assert final["state"] == "cancelled"
    assert marker_pids(marker) == []


NETWORK = """
import errno, socket

def reach(ctx):
    try:
        with socket.create_connection(("127.0.0.1", int(ctx.env["HOST_PORT"])), timeout=5):
            return {"result": "connected"}
    except OSError as exc:
        return {"result": errno.errorcode.get(exc.errno or 0, type(exc).__name__)}

net = job("net", steps=[step("reach", reach)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[net])
"""


@requires_userns
async def test_userns_with_network_none_reaches_nothing(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", NETWORK)
    start_agent(orchestrator, KICI_SANDBOX="userns", KICI_SANDBOX_NETWORK="none")
    await orchestrator.wait_registered()
    with socket.socket() as listener:  # listening on the host's loopback: outside the job's namespace
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        message = dispatch(repo, "net", env={"HOST_PORT": str(listener.getsockname()[1])})
        await orchestrator.send(message)
        final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", "\n".join(orchestrator.log_lines(message["job_id"]))
    # unshare --net brings no interface up, not even loopback: the host is unreachable
    assert final["outputs"]["reach"] == {"result": "ENETUNREACH"}
    assert "sandbox: userns (network none)" in orchestrator.log_lines(message["job_id"], -1)
