"""Defect 3 (issue 9): a job step must not obtain the agent token by any means tried here.

Real agent processes (against the fake orchestrator), real steps. The step runs `probe.py`, which tries
the agent's `/proc/<pid>/environ`, `cmdline`, open fds, `mem` (through `maps`), `ptrace(PTRACE_ATTACH)`,
every process's environ and cmdline it can read, and every file of the agent's work dir, and prints one
JSON line saying where a `kat_…` token turned up.

Two set-ups: the agent running as an unprivileged user (steps run as that same user: the non-dumpable
flag and the re-exec without `KICI_AGENT_TOKEN` protect the token), and the agent running as root with
the token in a file (steps run as the step user `nobody`). Both use the system interpreter with this
tree on PYTHONPATH, because the test venv's interpreter lives below /root, which `nobody` cannot enter.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import git

from .conftest import TOKEN, AgentFactory, FakeOrchestrator, dispatch, workflow_repo

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                       reason="needs Linux and root (to start agents and steps as other users)"),
]

SYSTEM_PYTHON = "/usr/bin/python3"
TREE = Path(__file__).resolve().parents[3]

PROBE = r'''
import ctypes, errno, json, os, re, sys

pid = int(os.environ["AGENT_PID"])
work_dir = os.environ["AGENT_WORK_DIR"]
pattern = re.compile(rb"kat_[0-9a-f]{64}")
found = {}

def attempt(name, read):
    try:
        data = read()
    except OSError as exc:
        found[name] = "denied:" + errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return
    found[name] = "attached" if data == b"attached" else "TOKEN" if pattern.search(data) else "no-token"

def read(path):
    with open(path, "rb") as handle:
        return handle.read()

def fds():
    out = b""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        out += os.readlink(path).encode() + b"\n"
        try:
            handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            out += os.read(handle, 1 << 16)
        except OSError:
            pass
        finally:
            os.close(handle)
    return out

def memory(pid=pid):
    out = b""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                out += mem.read(min(end - start, 1 << 24))
            except OSError:
                continue
    return out

def ptrace(pid=pid):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
        os.waitpid(pid, 0x40000000)  # __WALL: the tracee has stopped; only then can it be detached
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH: let the agent go on
        return b"attached"
    raise OSError(ctypes.get_errno(), "ptrace")

def every_process():
    out = b""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            for name in ("environ", "cmdline"):
                try:
                    out += read(f"/proc/{entry}/{name}")
                except OSError:
                    pass
    return out

def work_files():
    out = b""
    for root, dirs, files in os.walk(work_dir):
        for name in files:
            try:
                out += read(os.path.join(root, name))
            except OSError:
                pass
    return out

attempt("environ", lambda: read(f"/proc/{pid}/environ"))
attempt("cmdline", lambda: read(f"/proc/{pid}/cmdline"))
attempt("fds", fds)
attempt("mem", memory)
attempt("ptrace", ptrace)
attempt("every_process", every_process)
attempt("work_dir", work_files)
if os.environ.get("TOKEN_FILE"):
    attempt("token_file", lambda: read(os.environ["TOKEN_FILE"]))
found["uid"] = os.getuid()

def forkserver():
    """The runner forkserver this step's runner was forked from: the topmost ancestor with its command
    line (a forked runner keeps the command line of the server it was forked from)."""
    ancestor, server = os.getppid(), None
    while ancestor > 1:
        if b"kici.runner.forkserver" in read(f"/proc/{ancestor}/cmdline"):
            server = ancestor
        with open(f"/proc/{ancestor}/stat", "rb") as handle:
            ancestor = int(handle.read().rsplit(b")", 1)[1].split()[1])
    return server

server = forkserver()
found["forkserver"] = server is not None
if server is not None:
    # it forks every later job: planting code in it would reach them
    attempt("forkserver_mem", lambda: memory(server))
    attempt("forkserver_ptrace", lambda: ptrace(server))
print("PROBE " + json.dumps(found, sort_keys=True))
'''

WORKFLOW = """
probe = job("probe", steps=[step("probe", "python3 probe.py")])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[probe])
"""

NOBODY = pwd.getpwnam("nobody") if sys.platform.startswith("linux") else None


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kici-secrecy-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _system_python_env() -> dict[str, str]:
    site = next((TREE / ".venv" / "lib").glob("python3*/site-packages"))
    return {"PYTHONPATH": f"{TREE / 'src'}{os.pathsep}{site}"}


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _probe_result(orchestrator: FakeOrchestrator, job_id: str) -> dict[str, Any]:
    lines = [line for line in orchestrator.log_lines(job_id) if line.startswith("PROBE ")]
    assert lines, orchestrator.log_lines(job_id)
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("PROBE "))
    return result


def _assert_nothing_leaked(result: dict[str, Any]) -> None:
    leaked = {where: what for where, what in result.items() if what in ("TOKEN", "attached")}
    assert not leaked, f"the step got at the agent token: {result}"
    # the agent's own secrets are closed to the step, not merely empty
    for where in ("environ", "fds", "mem", "ptrace", "forkserver_mem", "forkserver_ptrace"):
        assert str(result[where]).startswith("denied:"), result


def _usable_by_nobody() -> bool:
    if not Path(SYSTEM_PYTHON).exists() or NOBODY is None:
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import kici.agent.main"], user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
        env=_system_python_env(), capture_output=True, timeout=60, check=False, cwd="/",
    )
    return probe.returncode == 0


needs_system_python = pytest.mark.skipif(not _usable_by_nobody() if os.geteuid() == 0 else True,
                                         reason="no system Python that `nobody` can run with this tree")


@needs_system_python
async def test_a_step_of_an_unprivileged_agent_cannot_get_the_token(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, agent_env: Any, shared_dir: Path
) -> None:
    assert NOBODY is not None
    repo = workflow_repo(shared_dir / "repo", WORKFLOW, extra={"probe.py": PROBE})
    git(repo.path, "config", "core.sharedRepository", "all")
    work, home = shared_dir / "work", shared_dir / "home"
    work.mkdir()
    home.mkdir()
    _chown_tree(shared_dir, NOBODY.pw_uid, NOBODY.pw_gid)
    env = agent_env(orchestrator, KICI_WORK_DIR=str(work), HOME=str(home), **_system_python_env())
    env.pop("KICI_AGENT_STEP_USER", None)
    assert env["KICI_AGENT_TOKEN"] == TOKEN
    agent = start_agent(env=env, command=[
        "setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups", "--",
        SYSTEM_PYTHON, "-m", "kici.agent",
    ])
    await orchestrator.wait_registered()
    assert orchestrator.current.auth is not None and orchestrator.current.auth["token"] == TOKEN
    message = dispatch(repo, "probe", env={"AGENT_PID": str(agent.pid), "AGENT_WORK_DIR": str(work)})
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", (final, orchestrator.log_lines(message["job_id"]), agent.output)
    result = _probe_result(orchestrator, message["job_id"])
    assert result["uid"] == NOBODY.pw_uid
    _assert_nothing_leaked(result)
    assert result["cmdline"] == "no-token"  # readable, as for any process, but the token is not in it
    assert result["forkserver"] is True  # KICI_RUNNER_PRESTART is on by default
    [started] = agent.events("agent.started")
    assert started["non_dumpable"] is True and started.get("step_user") is None


@needs_system_python
async def test_a_root_agent_runs_steps_as_the_step_user_and_they_cannot_get_the_token(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, agent_env: Any, shared_dir: Path, tmp_path: Path
) -> None:
    assert NOBODY is not None
    repo = workflow_repo(shared_dir / "repo", WORKFLOW, extra={"probe.py": PROBE})
    work = shared_dir / "work"
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir(mode=0o700)
    token_file = secret_dir / "agent-token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    env = agent_env(orchestrator, KICI_WORK_DIR=str(work), KICI_AGENT_TOKEN="", KICI_AGENT_TOKEN_FILE=str(token_file),
                    KICI_AGENT_STEP_USER="nobody", **_system_python_env())
    env.pop("KICI_AGENT_TOKEN")
    agent = start_agent(env=env, command=[SYSTEM_PYTHON, "-m", "kici.agent"])
    registered = await orchestrator.wait_registered()
    assert registered.register is not None
    assert registered.register["running_as_uid"] == 0 and registered.register["step_uid"] == NOBODY.pw_uid
    message = dispatch(repo, "probe", env={"AGENT_PID": str(agent.pid), "AGENT_WORK_DIR": str(work),
                                           "TOKEN_FILE": str(token_file)})
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", (final, orchestrator.log_lines(message["job_id"]), agent.output)
    result = _probe_result(orchestrator, message["job_id"])
    assert result["uid"] == NOBODY.pw_uid
    _assert_nothing_leaked(result)
    assert result["token_file"].startswith("denied:")
    assert result["forkserver"] is True
    # the agent's work dir and jobs dir let the step user through, and list nothing
    assert stat.S_IMODE(work.stat().st_mode) == 0o711 and stat.S_IMODE((work / "jobs").stat().st_mode) == 0o711


async def test_token_file_and_step_user_settings_are_checked_at_start(
    start_agent: AgentFactory, orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    work = tmp_path / "agent-work"
    work.mkdir()
    inside = work / "token"
    inside.write_text(TOKEN)
    outside = tmp_path / "token"
    outside.write_text(TOKEN)
    cases = [
        ({"KICI_AGENT_TOKEN": "", "KICI_AGENT_TOKEN_FILE": str(inside)}, "is inside KICI_WORK_DIR"),
        ({"KICI_AGENT_TOKEN_FILE": str(outside)}, "set either KICI_AGENT_TOKEN or KICI_AGENT_TOKEN_FILE, not both"),
        ({"KICI_AGENT_TOKEN": "", "KICI_AGENT_TOKEN_FILE": str(tmp_path / "missing")}, "cannot read"),
        ({"KICI_AGENT_STEP_USER": "no-such-user-kici"}, "KICI_AGENT_STEP_USER: no user 'no-such-user-kici'"),
    ]
    for settings, expected in cases:
        agent = start_agent(orchestrator, KICI_WORK_DIR=str(work), **settings)
        assert await agent.wait_exit() == 2, agent.output
        assert expected in agent.output, agent.output
        assert TOKEN not in agent.output
    assert not orchestrator.connections


async def test_the_token_from_a_file_authenticates(
    start_agent: AgentFactory, orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    agent = start_agent(orchestrator, KICI_AGENT_TOKEN="", KICI_AGENT_TOKEN_FILE=str(token_file))
    registered = await orchestrator.wait_registered()
    assert registered.auth is not None and registered.auth["token"] == TOKEN
    environ = Path(f"/proc/{agent.pid}/environ").read_bytes()  # root may look: the token is not there
    assert TOKEN.encode() not in environ


async def test_a_token_in_the_environment_is_gone_from_the_agents_environ(
    start_agent: AgentFactory, orchestrator: FakeOrchestrator
) -> None:
    agent = start_agent(orchestrator)
    registered = await orchestrator.wait_registered()
    assert registered.auth is not None and registered.auth["token"] == TOKEN
    environ = Path(f"/proc/{agent.pid}/environ").read_bytes()  # root may look: the re-exec dropped it
    cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
    assert TOKEN.encode() not in environ and TOKEN.encode() not in cmdline
    assert b"--token-fd" in cmdline
    # the hand-over pipe was closed once read: no open fd of the agent still holds the token
    for fd in os.listdir(f"/proc/{agent.pid}/fd"):
        target = os.readlink(f"/proc/{agent.pid}/fd/{fd}")
        if target.startswith("pipe:"):
            handle = os.open(f"/proc/{agent.pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
            try:
                data = os.read(handle, 1 << 16)
            except BlockingIOError:
                data = b""
            finally:
                os.close(handle)
            assert TOKEN.encode() not in data


async def test_a_root_agent_without_a_step_user_setting_picks_one_or_says_why_not(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, agent_env: Any
) -> None:
    """Unset `KICI_AGENT_STEP_USER`: `kici-step`, else `nobody`, if it can run the agent's Python (the test
    venv's, here); if none can, a warning and steps as root, reported as such at registration."""
    env = agent_env(orchestrator)
    env.pop("KICI_AGENT_STEP_USER", None)
    agent = start_agent(env=env)
    registered = await orchestrator.wait_registered()
    assert registered.register is not None and registered.register["running_as_uid"] == 0
    candidates = [entry for entry in (_passwd("kici-step"), NOBODY) if entry is not None]
    usable = [entry for entry in candidates if _can_run(entry, sys.executable)]
    if usable:
        assert registered.register["step_uid"] == usable[0].pw_uid
    else:
        assert registered.register["step_uid"] == 0
        [warning] = [e for e in agent.events("config.warning") if "no usable step user" in e.get("message", "")]
        assert "KICI_AGENT_STEP_USER" in warning["message"]


def _passwd(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _can_run(entry: pwd.struct_passwd, python: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", "import kici.runner"], user=entry.pw_uid, group=entry.pw_gid,
                               extra_groups=[], capture_output=True, timeout=60, check=False, cwd="/")
    except PermissionError:  # the interpreter itself is out of the user's reach
        return False
    return probe.returncode == 0
