"""The runner forkserver: real servers, real forked runners, driven as the agent drives them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kici.agent.sandbox import ProcessSandbox
from kici.agent.sandbox.base import ExecutionRequest
from kici.engine.runner_protocol import JobSpec
from kici.runner import proctree
from kici.runner.client import RunnerProcess
from kici.runner.forkclient import EXIT_UNKNOWN, ForkServer, ForkServerUnavailable, start_runner

from .test_runner import Run, make_spec, marker, marker_pids, wait_until, write_workflow

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forkserver needs Linux (pidfd, prctl)"),
]

__all__ = ["marker"]  # the fixture, imported for the tests below

REPORT = """
import json, os

@step
def report(ctx):
    print("REPORT " + json.dumps({"pid": os.getpid(), "ppid": os.getppid(), **EXTRA(ctx)}))

ci = workflow("ci", jobs=[job("j", steps=[report])])
"""


def reporting_workflow(workspace: Path, extra: str) -> None:
    """A job whose one step prints `REPORT {pid, ppid, **EXTRA(ctx)}`; `extra` defines `EXTRA(ctx)`."""
    write_workflow(workspace, extra + "\n" + REPORT)


def report(run: Run) -> dict[str, Any]:
    [line] = [line for line in run.logs() if line.startswith("REPORT ")]
    result: dict[str, Any] = json.loads(line.removeprefix("REPORT "))
    return result


async def run_forked(server: ForkServer, spec: JobSpec, run_as: tuple[int, int] | None = None) -> Run:
    run = Run()
    runner = await start_runner(server, spec, run_as=run_as)
    try:
        async for message in runner.messages():
            run.messages.append(message)
        run.returncode = await runner.wait()
    finally:
        if runner.returncode is None:
            await runner.kill(grace=0.5)
    return run


@pytest.fixture
async def server() -> AsyncIterator[ForkServer]:
    forkserver = ForkServer()
    try:
        await forkserver.start()
        yield forkserver
    finally:
        await forkserver.close()


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    return workspace


def alive(pid: int | None) -> bool:
    return pid is not None and proctree.alive(pid)


async def test_every_job_gets_a_fresh_process_and_nothing_of_an_earlier_job_survives(
    server: ForkServer, ws: Path
) -> None:
    reporting_workflow(ws, '''
import json as json_module, kici

def EXTRA(ctx):
    seen = {"json": getattr(json_module, "_left_by_a_job", None), "kici": getattr(kici, "_left_by_a_job", None),
            "env": os.environ.get("LEFT_BY_A_JOB")}
    json_module._left_by_a_job = kici._left_by_a_job = os.getpid()
    os.environ["LEFT_BY_A_JOB"] = "yes"
    return {"seen": seen}
''')
    first, second = await run_forked(server, make_spec(ws)), await run_forked(server, make_spec(ws))
    assert first.result.status == "success" and second.result.status == "success", first.log_text()
    a, b = report(first), report(second)
    assert a["pid"] != b["pid"] and server.pid not in (a["pid"], b["pid"])
    assert a["ppid"] == b["ppid"] == server.pid  # forked by the server, not started by us
    # modules the server had loaded, changed by the first job, are pristine for the second
    assert a["seen"] == b["seen"] == {"json": None, "kici": None, "env": None}
    assert first.returncode == second.returncode == 0


async def test_the_runner_gets_the_allow_listed_environment_and_none_of_the_parents(
    monkeypatch: pytest.MonkeyPatch, ws: Path
) -> None:
    token = "kat_" + "cd" * 32
    monkeypatch.setenv("KICI_AGENT_TOKEN", token)
    monkeypatch.setenv("KICI_ORCHESTRATOR_URL", "ws://agent-only.invalid")
    monkeypatch.setenv("SOME_AGENT_VARIABLE", "agent-only")
    reporting_workflow(ws, '''
def EXTRA(ctx):
    with open("/proc/self/environ", "rb") as handle:
        initial = handle.read().decode()
    return {"environ": dict(os.environ), "initial": initial, "shell": ctx.sh("env", quiet=True).stdout}
''')
    forkserver = ForkServer()
    try:
        run = await run_forked(forkserver, make_spec(ws))
        assert run.result.status == "success", run.log_text()
        seen = report(run)
        everything = json.dumps(seen)
        for leaked in (token, "agent-only", "KICI_AGENT_TOKEN", "KICI_ORCHESTRATOR_URL"):
            assert leaked not in everything
        for name in ("PYTHONPATH", "VIRTUAL_ENV"):  # only for the runner's own imports, never for steps
            assert name not in seen["environ"] and f"\n{name}=" not in seen["shell"]
        assert seen["environ"]["TMPDIR"].startswith(tempfile.gettempdir() + "/kici-runner-scratch-")
        assert seen["environ"]["PATH"] == make_spec(ws).env["PATH"]
    finally:
        await forkserver.close()


async def test_cancel_and_kill_end_the_whole_tree_of_a_forked_runner(server: ForkServer, ws: Path, marker: str) -> None:
    started = ws / "started"
    write_workflow(ws, f'''
@step
def detach(ctx):
    ctx.sh("setsid sh -c 'exec -a {marker}-detached sleep 300' & exec -a {marker}-main sleep 300 & "
           "touch {started}; wait")

ci = workflow("ci", jobs=[job("j", steps=[detach])])
''')
    runner = await start_runner(server, make_spec(ws))
    messages = []
    try:
        await wait_until(lambda: started.exists() and len(marker_pids(marker)) >= 2, 30)
        await runner.cancel(force=False, grace=5.0, reason="cancelled by test")
        async for message in runner.messages():
            messages.append(message)
        assert messages[-1].type == "job.result" and messages[-1].status == "cancelled"  # type: ignore[union-attr]
        assert await runner.wait() == 0
        assert marker_pids(marker) == []

        started.unlink()
        killed = await start_runner(server, make_spec(ws))
        await wait_until(lambda: started.exists() and len(marker_pids(marker)) >= 2, 30)
        await killed.kill(grace=0.5)
        assert await killed.wait() == -signal.SIGTERM  # the exit status comes from the server
        assert marker_pids(marker) == []
    finally:
        if runner.returncode is None:
            await runner.kill(grace=0)


async def test_a_killed_forkserver_is_replaced_and_its_running_job_still_reports(server: ForkServer, ws: Path) -> None:
    gate = ws / "gate"
    write_workflow(ws, f'''
import os, time

@step
def wait_for_gate(ctx):
    deadline = time.monotonic() + 30
    while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:
        time.sleep(0.02)
    print("gate open" if os.path.exists({str(gate)!r}) else "gate timeout")

ci = workflow("ci", jobs=[job("j", steps=[wait_for_gate])])
''')
    first_server = server.pid
    assert first_server is not None
    running = await start_runner(server, make_spec(ws))
    try:
        os.kill(first_server, signal.SIGKILL)
        await wait_until(lambda: not server.running, 10)
        gate.touch()
        run = Run()
        async for message in running.messages():
            run.messages.append(message)
        # the orphaned runner's result still arrives over its own pipe; its exit status is lost with the server
        assert run.result.status == "success" and "gate open" in run.logs()
        assert await running.wait() == EXIT_UNKNOWN
    finally:
        if running.returncode is None:
            await running.kill(grace=0)
    after = await run_forked(server, make_spec(ws))
    assert after.result.status == "success" and after.returncode == 0
    assert server.pid not in (None, first_server) and server.starts == 2
    assert not alive(first_server)


async def test_a_forkserver_that_cannot_start_says_why_and_the_process_sandbox_spawns_instead(ws: Path) -> None:
    reporting_workflow(ws, "def EXTRA(ctx):\n    return {}\n")
    broken = ForkServer(python="/bin/false", retry_after_s=60)
    with pytest.raises(ForkServerUnavailable, match="exited with code 1 before it was ready"):
        await broken.start()
    with pytest.raises(ForkServerUnavailable, match="exited with code 1 before it was ready"):  # not retried at once
        await broken.start()
    assert broken.starts == 0
    sandbox = ProcessSandbox()
    sandbox.forkserver = broken
    execution = sandbox.prepare(ExecutionRequest(spec=make_spec(ws), workspace=ws, scratch_dir=ws.parent))
    try:
        await execution.start()
        run = Run()
        async for message in execution.messages():
            run.messages.append(message)
        assert await execution.wait() == 0
    finally:
        await execution.cleanup()
    assert run.result.status == "success" and report(run)["ppid"] == os.getpid()  # spawned by us
    await broken.close()


async def test_a_bad_request_is_refused_and_the_server_goes_on(server: ForkServer, ws: Path) -> None:
    reporting_workflow(ws, "def EXTRA(ctx):\n    return {}\n")
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(ForkServerUnavailable, match="cwd '/nonexistent/dir' is not a directory"):
            await server.spawn(env={}, cwd="/nonexistent/dir", run_as=None, fds=(read_fd, write_fd, write_fd))
        with pytest.raises(ForkServerUnavailable, match="too large"):
            await server.spawn(env={"HUGE": "x" * 4_000_000}, cwd="/", run_as=None, fds=(read_fd, write_fd, write_fd))
    finally:
        os.close(read_fd)
        os.close(write_fd)
    run = await run_forked(server, make_spec(ws))
    assert run.result.status == "success" and report(run)["ppid"] == server.pid and server.starts == 1


@pytest.fixture
def shared_ws() -> Iterator[Path]:
    """A workspace another user can enter (pytest's tmp dirs are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="kici-forkserver-"))
    os.chmod(root, 0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to switch to another user)")
async def test_a_forked_runner_runs_as_the_step_user_without_groups_and_dumpable(
    server: ForkServer, shared_ws: Path
) -> None:
    nobody = pwd.getpwnam("nobody")
    reporting_workflow(shared_ws, '''
import ctypes

def EXTRA(ctx):
    libc = ctypes.CDLL(None)
    return {"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid()], "groups": os.getgroups(),
            "dumpable": libc.prctl(3, 0, 0, 0, 0), "tmp_owner": os.stat(os.environ["TMPDIR"]).st_uid,
            "shell_uid": ctx.sh("id -u", quiet=True).stdout.strip()}
''')
    for path in [shared_ws, *shared_ws.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    run = await run_forked(server, make_spec(shared_ws), run_as=(nobody.pw_uid, nobody.pw_gid))
    assert run.result.status == "success", run.log_text()
    seen = report(run)
    assert seen["ids"] == [nobody.pw_uid, nobody.pw_uid, nobody.pw_gid, nobody.pw_gid]
    assert seen["groups"] == [] and seen["shell_uid"] == str(nobody.pw_uid)
    assert seen["tmp_owner"] == nobody.pw_uid
    assert seen["dumpable"] == 1  # as after exec: the runner's own user may inspect its own processes
    mine = await run_forked(server, make_spec(shared_ws))  # the next job is root again: nothing carried over
    assert report(mine)["ids"] == [0, 0, 0, 0]


async def test_spawned_and_forked_runners_report_the_same_job_alike(server: ForkServer, ws: Path) -> None:
    write_workflow(ws, '''
@step
def fails(ctx):
    ctx.sh("echo out; echo err >&2; exit 3")

ci = workflow("ci", jobs=[job("j", steps=[fails])])
''')
    forked = await run_forked(server, make_spec(ws))
    spawned_runner = await RunnerProcess.start(make_spec(ws))
    spawned = Run()
    async for message in spawned_runner.messages():
        spawned.messages.append(message)
    spawned.returncode = await spawned_runner.wait()
    assert forked.result == spawned.result and forked.result.status == "failed"
    assert forked.logs() == spawned.logs() and forked.returncode == spawned.returncode


async def test_no_descriptor_or_process_is_left_behind_even_when_a_start_is_cancelled(
    server: ForkServer, ws: Path
) -> None:
    reporting_workflow(ws, "def EXTRA(ctx):\n    return {}\n")
    await run_forked(server, make_spec(ws))  # the loop's own descriptors (pipes' transports) exist from here
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(2):
        assert (await run_forked(server, make_spec(ws))).result.status == "success"
    for delay in (0, 0.01):
        starting = asyncio.create_task(start_runner(server, make_spec(ws)))
        await asyncio.sleep(delay)
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with await starting:  # it had started already: then it is ours to end
                pass
    assert server.pid is not None
    await wait_until(lambda: proctree.children(server.pid) == [], 10)  # a child forked for it saw EOF
    assert sorted(os.listdir("/proc/self/fd")) == before
