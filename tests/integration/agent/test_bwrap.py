"""The `bwrap` sandbox on a real agent with real bubblewrap: what a step can see, write and reach, and a
cancel that leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kici.runner.spawn import kici_bin_dirs

from .conftest import TOKEN, AgentFactory, FakeOrchestrator, dispatch, marker_pids, wait_until, workflow_repo
from .test_token_secrecy import NOBODY, SYSTEM_PYTHON, _system_python_env, needs_system_python
from .test_toolchains import _assert_no_agent_dirs, _body, _other_interpreter, _value

pytestmark = pytest.mark.timeout(120)


def _bwrap_works() -> bool:
    if shutil.which("bwrap") is None:
        return False
    try:
        return subprocess.run(["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "true"], capture_output=True,
                              timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


requires_bwrap = pytest.mark.skipif(not _bwrap_works(), reason="bubblewrap missing or unable to create namespaces")

BODY = """
import errno, json, os, socket

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)

def read(path):
    with open(path, "rb") as handle:
        handle.read()

def write(path):
    with open(path, "w") as handle:
        handle.write("x")

def connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass

def probe(ctx):
    env = ctx.env
    return {
        "agent_id": attempt(lambda: read(os.path.join(env["AGENT_WORK_DIR"], "agent-id"))),
        "work_dir_listing": sorted(os.listdir(env["AGENT_WORK_DIR"])) if os.path.isdir(env["AGENT_WORK_DIR"]) else None,
        "jobs_listing": sorted(os.listdir(os.path.join(env["AGENT_WORK_DIR"], "jobs"))),
        "token_file": attempt(lambda: read(env["TOKEN_FILE"])),
        "orchestrator_data": attempt(lambda: read(os.path.join(env["ORCH_DATA"], "secret.key"))),
        "write_usr": attempt(lambda: write("/usr/kici-escape")),
        "write_etc": attempt(lambda: write("/etc/kici-escape")),
        "write_work_dir": attempt(lambda: write(os.path.join(env["AGENT_WORK_DIR"], "escape"))),
        "write_workspace": attempt(lambda: write("in-workspace.txt")),
        "write_tmp": attempt(lambda: write("/tmp/private")),
        "write_home": attempt(lambda: write(os.path.join(env["HOME"], "dotfile"))),
        "connect": attempt(lambda: connect(int(env["HOST_PORT"]))),
        "pids": len([p for p in os.listdir("/proc") if p.isdigit()]),
        "path": env["PATH"],
    }

def sleeper(ctx):
    ctx.sh("setsid bash -c 'exec -a {marker}-setsid sleep 300' & exec -a {marker}-main sleep 300")

contain = job("contain", steps=[step("probe", probe), "python3 -c 'import sys; print(sys.version)'"])
hang = job("hang", steps=[step("sleeper", sleeper)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[contain, hang])
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the step user can reach (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kici-bwrap-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port listening on the host's loopback (connections queue in the backlog)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def _secrets(tmp_path: Path) -> tuple[Path, Path]:
    token_file = tmp_path / "agent-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    orch_data = tmp_path / "orchestrator-data"
    orch_data.mkdir()
    (orch_data / "secret.key").write_text("orchestrator secret key\n")
    return token_file, orch_data


async def _probe(orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str,
                 port: int, network: str) -> tuple[dict[str, object], str]:
    repo = workflow_repo(tmp_path / "repo", BODY.replace("{marker}", marker))
    token_file, orch_data = _secrets(tmp_path)
    work_dir = tmp_path / "agent-work"
    start_agent(orchestrator, KICI_SANDBOX="bwrap", KICI_SANDBOX_NETWORK=network, KICI_AGENT_TOKEN="",
                KICI_AGENT_TOKEN_FILE=str(token_file))
    await orchestrator.wait_registered()
    message = dispatch(repo, "contain", env={
        "AGENT_WORK_DIR": str(work_dir), "TOKEN_FILE": str(token_file), "ORCH_DATA": str(orch_data),
        "HOST_PORT": str(port),
    })
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", "\n".join(orchestrator.log_lines(message["job_id"]))
    assert not (work_dir / "escape").exists() and not Path("/usr/kici-escape").exists()
    return final["outputs"]["probe"], message["job_id"]


@requires_bwrap
async def test_a_step_sees_only_its_workspace_and_no_network_with_network_none(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str, listener: int
) -> None:
    seen, job_id = await _probe(orchestrator, start_agent, tmp_path, marker, listener, "none")
    assert seen["agent_id"] == "ENOENT"  # the agent's work dir holds only this job's workspace
    assert seen["work_dir_listing"] == ["jobs"]
    assert seen["jobs_listing"] == [job_id, job_id + ".tools"]  # its workspace and scratch: no other job
    assert seen["token_file"] == "ENOENT"
    assert seen["orchestrator_data"] == "ENOENT"
    assert seen["write_usr"] == "EROFS"
    assert seen["write_etc"] == "EROFS"
    assert seen["write_workspace"] == "ok"
    assert seen["write_tmp"] == "ok"
    assert seen["write_home"] == "ok"
    assert seen["connect"] == "ECONNREFUSED"  # loopback of its own network namespace: nobody listens there
    assert isinstance(seen["pids"], int) and seen["pids"] < 10  # its own PID namespace
    setup = orchestrator.log_lines(job_id, -1)
    assert "sandbox: bwrap (network none)" in setup
    # the step's python is the machine's, not the agent's (whose interpreter is visible read-only)
    leaked = [e for e in str(seen["path"]).split(os.pathsep) if os.path.normpath(e) in kici_bin_dirs()]
    assert leaked == []
    assert any(line.startswith("3.") for line in orchestrator.log_lines(job_id, 1))


@requires_bwrap
async def test_network_host_reaches_the_host_and_cancel_leaves_no_process(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str, listener: int
) -> None:
    seen, _ = await _probe(orchestrator, start_agent, tmp_path, marker, listener, "host")
    assert seen["connect"] == "ok"
    assert seen["token_file"] == "ENOENT"

    repo = workflow_repo(tmp_path / "repo2", BODY.replace("{marker}", marker))
    hang = dispatch(repo, "hang")
    await orchestrator.send(hang)
    await wait_until(lambda: len(marker_pids(marker)) >= 2, 30, "the step's processes")
    sandboxed = _processes_mentioning(hang["job_id"])
    assert sandboxed, "bwrap's command line names the job's workspace"
    await orchestrator.send({"type": "job.cancel", "run_id": hang["run_id"], "job_id": hang["job_id"],
                             "reason": "stop", "force": False})
    final = await orchestrator.wait_terminal(hang["job_id"])
    assert final["state"] == "cancelled"
    assert marker_pids(marker) == []
    assert _processes_mentioning(hang["job_id"]) == []


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as handle:
                    if text.encode() in handle.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


async def test_the_agent_refuses_a_sandbox_it_cannot_provide(
    start_agent: AgentFactory, orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    network = start_agent(orchestrator, KICI_SANDBOX="process", KICI_SANDBOX_NETWORK="none")
    assert await network.wait_exit() == 2
    assert "KICI_SANDBOX_NETWORK=none needs a sandbox with its own network namespace" in network.output
    no_bwrap_path = tmp_path / "bin"
    no_bwrap_path.mkdir()
    for tool in ("git", "sh"):
        found = shutil.which(tool)
        assert found is not None
        (no_bwrap_path / tool).symlink_to(found)
    missing = start_agent(orchestrator, KICI_SANDBOX="bwrap", PATH=str(no_bwrap_path))
    assert await missing.wait_exit() == 2
    assert "KICI_SANDBOX=bwrap needs bubblewrap (`bwrap`), not found on PATH" in missing.output
    # a bwrap that cannot create namespaces here (what it prints where user namespaces are off)
    broken = no_bwrap_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    broken.chmod(0o755)
    refused = start_agent(orchestrator, KICI_SANDBOX="bwrap", PATH=str(no_bwrap_path))
    assert await refused.wait_exit() == 2
    assert ("KICI_SANDBOX=bwrap: bubblewrap cannot create its sandbox here (bwrap: No permissions to creating new "
            "namespace)") in refused.output
    assert orchestrator.connections == []


@requires_bwrap
@pytest.mark.parametrize("venv", [False, True])
async def test_python_toolchains_work_inside_bwrap_without_the_agents_interpreter_on_path(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, venv: bool
) -> None:
    other = await _other_interpreter()
    repo = workflow_repo(tmp_path / "repo", _body(other.minor, venv))
    start_agent(orchestrator, KICI_SANDBOX="bwrap", KICI_PYTHONS=other.path)
    await orchestrator.wait_registered()
    message = dispatch(repo, "t", python=other.minor, python_venv=venv)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", "\n".join(orchestrator.log_lines(message["job_id"]))
    lines = orchestrator.log_lines(message["job_id"], 0)
    assert _value(lines, "PY") == other.full
    path = _value(lines, "PATH")
    _assert_no_agent_dirs(path)
    if venv:
        assert _value(lines, "VENV") == path.split(os.pathsep)[0].removesuffix("/bin")
    else:
        assert os.path.realpath(os.path.join(path.split(os.pathsep)[0], "python")) == other.real_path


STEP_USER_BODY = """
import os

def who(ctx):
    return {"uid": os.getuid(), "token": os.path.exists(ctx.env["TOKEN_FILE"]), "home": ctx.env["HOME"],
            "home_writable": os.access(ctx.env["HOME"], os.W_OK)}

who_job = job("who", steps=[step("who", who)])
hog = job("hog", steps=["python3 -c \\"x = 'x' * (1024 << 20)\\""])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[who_job, hog])
"""


@requires_bwrap
@needs_system_python
async def test_a_root_agent_runs_bwrap_jobs_as_the_step_user_under_limits(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, agent_env: Any, shared_dir: Path, tmp_path: Path
) -> None:
    assert NOBODY is not None
    repo = workflow_repo(shared_dir / "repo", STEP_USER_BODY)
    token_file, _ = _secrets(tmp_path)
    env = agent_env(orchestrator, KICI_WORK_DIR=str(shared_dir / "work"), KICI_AGENT_TOKEN="",
                    KICI_AGENT_TOKEN_FILE=str(token_file), KICI_AGENT_STEP_USER="nobody", KICI_SANDBOX="bwrap",
                    KICI_JOB_MEMORY="256M", **_system_python_env())
    env.pop("KICI_AGENT_TOKEN")
    agent = start_agent(env=env, command=[SYSTEM_PYTHON, "-m", "kici.agent"])
    await orchestrator.wait_registered()
    who = dispatch(repo, "who", env={"TOKEN_FILE": str(token_file)})
    await orchestrator.send(who)
    final = await orchestrator.wait_terminal(who["job_id"])
    assert final["state"] == "success", ("\n".join(orchestrator.log_lines(who["job_id"])), agent.output)
    seen = final["outputs"]["who"]
    assert seen["uid"] == NOBODY.pw_uid and seen["token"] is False and seen["home_writable"] is True
    setup = orchestrator.log_lines(who["job_id"], -1)
    assert any("memory=256 MiB" in line for line in setup), setup
    hog = dispatch(repo, "hog")
    await orchestrator.send(hog)
    final = await orchestrator.wait_terminal(hog["job_id"])
    assert final["failure_category"] in ("memory_limit", "resources") and final["state"] == "failed", final
    if any("enforced by cgroup" in line for line in setup):
        assert final["failure_category"] == "memory_limit"
