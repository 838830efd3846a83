"""Jobs through the real agent: dispatch → ack → running → steps → logs → terminal status, rejects,
cancel, drift, masking, log chunking and the step environment."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from kici.agent.build_info import kici_build_hash

from .conftest import TOKEN, AgentFactory, FakeOrchestrator, dispatch, marker_pids, wait_until, workflow_repo

pytestmark = pytest.mark.timeout(120)


PIPELINE = """
@step
def build(ctx):
    ctx.sh("echo building; echo to-stderr >&2")
    return {"version": "1.2.3"}

ok = job("ok", steps=[build, step("after", "echo after-build")])
bad = job("bad", steps=[step("first", "echo first"), step("boom", "echo about-to-fail; exit 3"),
                        step("never", "echo never-runs")])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[ok, bad])
"""


async def test_dispatch_ack_running_steps_logs_success_with_outputs(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", PIPELINE)
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "ok")
    job_id = message["job_id"]
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(job_id)
    assert final["state"] == "success", final
    assert final["outputs"] == {"build": {"version": "1.2.3"}}
    conn = orchestrator.current
    types = [m["type"] for m in conn.messages if m.get("job_id") == job_id and m["type"] != "job.heartbeat"]
    assert types[0] == "job.ack"
    assert types[1] == "job.status"
    running = next(m for m in conn.messages if m["type"] == "job.status" and m["job_id"] == job_id)
    assert running["state"] == "running"
    assert types[-1] == "job.status"
    steps = [(m["step_index"], m["step_name"], m["state"]) for m in orchestrator.messages("step.status", job_id)]
    assert steps == [(0, "build", "running"), (0, "build", "success"), (1, "after", "running"),
                     (1, "after", "success")]
    assert {"building", "to-stderr"} <= set(orchestrator.log_lines(job_id, 0))
    assert "after-build" in orchestrator.log_lines(job_id, 1)
    setup = orchestrator.log_lines(job_id, -1)
    assert any(line.startswith("cloning ") for line in setup) and f"checked out {repo.sha}" in setup
    seqs = [m["seq"] for m in orchestrator.messages("log.chunk", job_id)]
    assert seqs == list(range(len(seqs)))
    # a step's lines arrive before its terminal status
    index = {id(m): i for i, m in enumerate(conn.messages)}
    last_log_0 = max(index[id(m)] for m in orchestrator.messages("log.chunk", job_id) if m["step_index"] == 0)
    done_0 = next(index[id(m)] for m in orchestrator.messages("step.status", job_id)
                  if m["step_index"] == 0 and m["state"] == "success")
    assert last_log_0 < done_0
    # agent.status went to 1 and back to 0; the job heartbeat flowed meanwhile or the job was quick
    await wait_until(lambda: orchestrator.messages("agent.status")[-1]["active_jobs"] == 0, 10, "idle status")
    assert 1 in [m["active_jobs"] for m in orchestrator.messages("agent.status")]
    assert not any((tmp_path / "agent-work" / "jobs").iterdir())  # workspace removed


async def test_failing_step_fails_the_job_and_skips_the_rest(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", PIPELINE)
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "bad")
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "step"
    terminal = {m["step_name"]: m["state"] for m in orchestrator.messages("step.status", message["job_id"])
                if m["state"] != "running"}
    assert terminal == {"first": "success", "boom": "failed", "never": "skipped"}
    assert "never-runs" not in orchestrator.log_lines(message["job_id"])
    assert not any((tmp_path / "agent-work" / "jobs").iterdir())


SLOW = """
slow = job("slow", steps=[step("wait", "sleep 1.5; echo done-waiting")])
quick = job("quick", steps=[step("hi", "echo hi")])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[slow, quick])
"""


async def test_busy_reject_at_max_concurrency(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", SLOW)
    start_agent(orchestrator, KICI_MAX_CONCURRENCY="1")
    await orchestrator.wait_registered()
    first, second = dispatch(repo, "slow"), dispatch(repo, "quick")
    await orchestrator.send(first)
    await orchestrator.wait_message(lambda m: m["type"] == "job.ack" and m["job_id"] == first["job_id"])
    await orchestrator.send(second)
    reject = await orchestrator.wait_message(lambda m: m["type"] == "job.reject")
    assert reject == {"type": "job.reject", "job_id": second["job_id"], "run_id": second["run_id"], "reason": "busy"}
    messages = orchestrator.current.messages
    await wait_until(lambda: len(messages) > messages.index(reject) + 1, 10, "the status after the reject")
    assert messages[messages.index(reject) + 1] == {"type": "agent.status", "active_jobs": 1, "draining": False}
    assert (await orchestrator.wait_terminal(first["job_id"]))["state"] == "success"
    assert orchestrator.terminal(second["job_id"]) is None


async def test_two_jobs_run_concurrently_with_max_concurrency_2(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", SLOW)
    start_agent(orchestrator, KICI_MAX_CONCURRENCY="2")
    await orchestrator.wait_registered()
    first, second = dispatch(repo, "slow"), dispatch(repo, "slow")
    await orchestrator.send(first)
    await orchestrator.send(second)
    for message in (first, second):
        assert (await orchestrator.wait_terminal(message["job_id"]))["state"] == "success"
    assert orchestrator.messages("job.reject") == []
    assert 2 in [m["active_jobs"] for m in orchestrator.messages("agent.status")]


async def test_drain_rejects_new_jobs_finishes_the_current_one_and_exits_0(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", SLOW)
    agent = start_agent(orchestrator, KICI_MAX_CONCURRENCY="2")
    await orchestrator.wait_registered()
    first = dispatch(repo, "slow")
    await orchestrator.send(first)
    await orchestrator.wait_message(lambda m: m["type"] == "step.status" and m["state"] == "running")
    agent.signal(10)  # SIGUSR1
    await orchestrator.wait_message(lambda m: m["type"] == "agent.status" and m["draining"], what="draining status")
    second = dispatch(repo, "quick")
    await orchestrator.send(second)
    reject = await orchestrator.wait_message(lambda m: m["type"] == "job.reject")
    assert reject["reason"] == "draining" and reject["job_id"] == second["job_id"]
    assert await agent.wait_exit() == 0
    final = orchestrator.terminal(first["job_id"])
    assert final is not None and final["state"] == "success"
    assert "done-waiting" in orchestrator.log_lines(first["job_id"])


CANCELLABLE = """
import pathlib

RECORD = pathlib.Path({record!r})

def note(name):
    def hook(ctx):
        with RECORD.open("a") as f:
            f.write(name + "\\n")
    return hook

def detach(ctx):
    ctx.sh(
        "setsid bash -c 'exec -a {marker}-setsid sleep 300' & "
        "(setsid bash -c 'exec -a {marker}-both sleep 300' &) ; "
        "exec -a {marker}-main sleep 300"
    )

long = job("long", steps=[step("detach", detach), "echo never"], on_cancel=note("on_cancel"),
           cleanup=note("cleanup"))
ci = workflow("ci", on=[push(branches=["main"])], jobs=[long])
"""


@pytest.mark.parametrize("force", [False, True])
async def test_cancel_kills_the_whole_tree(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str, force: bool
) -> None:
    record = tmp_path / "record"
    repo = workflow_repo(tmp_path / "repo", CANCELLABLE.format(record=str(record), marker=marker))
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "long")
    await orchestrator.send(message)
    await wait_until(lambda: len(marker_pids(marker)) >= 3, 30, "the step's processes")
    await orchestrator.send({"type": "job.cancel", "run_id": message["run_id"], "job_id": message["job_id"],
                             "reason": "cancelled by user", "force": force})
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "cancelled" and final["error"] == "cancelled by user"
    assert marker_pids(marker) == []  # nothing survives, including the setsid grandchildren
    hooks = record.read_text().split() if record.exists() else []
    assert hooks == ([] if force else ["on_cancel", "cleanup"])
    steps = {m["step_name"]: m["state"] for m in orchestrator.messages("step.status", message["job_id"])
             if m["state"] != "running"}
    assert steps["detach"] == "cancelled"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_cancels_running_jobs_reports_them_and_exits_0_in_time(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str, sig: int
) -> None:
    record = tmp_path / "record"
    repo = workflow_repo(tmp_path / "repo", CANCELLABLE.format(record=str(record), marker=marker))
    agent = start_agent(orchestrator, KICI_SHUTDOWN_TIMEOUT_MS="8000")
    await orchestrator.wait_registered()
    message = dispatch(repo, "long")
    await orchestrator.send(message)
    await wait_until(lambda: len(marker_pids(marker)) >= 3, 30, "the step's processes")
    started = time.monotonic()
    agent.signal(sig)
    assert await agent.wait_exit(timeout=20) == 0
    assert time.monotonic() - started < 8.0
    final = orchestrator.terminal(message["job_id"])
    assert final is not None and final["state"] == "cancelled", final
    assert record.read_text().split() == ["on_cancel", "cleanup"]  # a graceful stop runs the cancel hooks
    assert marker_pids(marker) == []
    assert any(m["type"] == "agent.status" and m["draining"] for m in orchestrator.current.messages)


STUCK_HOOK = """
import time

def hang(ctx):
    ctx.sh("exec -a {marker}-step sleep 300")

def stuck(ctx):
    ctx.sh("exec -a {marker}-hook sleep 300")

s = job("s", steps=[step("hang", hang)], on_cancel=stuck)
ci = workflow("ci", on=[push(branches=["main"])], jobs=[s])
"""


async def test_shutdown_is_bounded_even_when_a_cancel_hook_hangs_and_a_second_signal_kills_at_once(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str
) -> None:
    repo = workflow_repo(tmp_path / "repo", STUCK_HOOK.format(marker=marker))
    agent = start_agent(orchestrator, KICI_SHUTDOWN_TIMEOUT_MS="3000", KICI_CANCEL_GRACE_MS="60000")
    await orchestrator.wait_registered()
    message = dispatch(repo, "s")
    await orchestrator.send(message)
    await wait_until(lambda: marker_pids(marker), 30, "the step")
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    await wait_until(lambda: marker_pids(f"{marker}-hook"), 20, "the stuck cancel hook")
    assert await agent.wait_exit(timeout=20) == 0
    assert time.monotonic() - started < 8.0  # bounded by KICI_SHUTDOWN_TIMEOUT_MS, not the hook
    assert marker_pids(marker) == []
    final = orchestrator.terminal(message["job_id"])
    assert final is not None and final["state"] == "cancelled", final

    # a second signal does not wait for anything
    again = dispatch(repo, "s")
    agent = start_agent(orchestrator, KICI_SHUTDOWN_TIMEOUT_MS="30000", KICI_CANCEL_GRACE_MS="60000")
    await orchestrator.wait_registered(count=2)
    await orchestrator.send(again)
    await wait_until(lambda: marker_pids(marker), 30, "the step")
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    await wait_until(lambda: marker_pids(f"{marker}-hook"), 20, "the stuck cancel hook")
    agent.signal(signal.SIGTERM)
    assert await agent.wait_exit(timeout=20) == 0
    assert time.monotonic() - started < 10.0
    assert marker_pids(marker) == []


async def test_a_redelivered_dispatch_of_a_running_job_is_acked_again_not_run_twice(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", SLOW)
    start_agent(orchestrator, KICI_MAX_CONCURRENCY="2")
    await orchestrator.wait_registered()
    message = dispatch(repo, "slow")
    await orchestrator.send(message)
    await orchestrator.wait_message(lambda m: m["type"] == "step.status")
    await orchestrator.send(message)
    await wait_until(lambda: len(orchestrator.messages("job.ack", message["job_id"])) == 2, 10, "the second ack")
    assert (await orchestrator.wait_terminal(message["job_id"]))["state"] == "success"
    assert len([m for m in orchestrator.messages("job.status", message["job_id"]) if m["state"] == "running"]) == 1


DRIFT = """
def make(ctx):
    ctx.sh("echo step-ran")

d = job("d", steps=[step("make", make)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[d])
"""


async def test_drift_gate_fails_before_any_step(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    from tests.conftest import git

    repo = workflow_repo(tmp_path / "repo", DRIFT)
    locked = repo.workflow()["contentHash"]
    wf = repo.path / ".kici/workflows/ci.py"
    wf.write_text(wf.read_text() + "\n# edited without recompiling\n")
    git(repo.path, "commit", "-q", "-am", "edit without compile")
    edited_sha = git(repo.path, "rev-parse", "HEAD").strip()
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "d", sha=edited_sha)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "drift"
    error = final["error"]
    assert error.startswith("lock file is out of date: .kici/workflows/ci.py has contentHash ")
    assert f"but the lock file says {locked} (kici " in error
    actual = error.split("contentHash ")[1].split()[0]
    assert len(actual) == 64 and actual != locked
    assert f", build {kici_build_hash()})" in error  # which KiCI code checked it, for comparing agents
    assert orchestrator.messages("step.status", message["job_id"]) == []
    assert "step-ran" not in orchestrator.log_lines(message["job_id"])
    assert any("lock file is out of date" in line for line in orchestrator.log_lines(message["job_id"], -1))


SECRETS = """
def leak(ctx):
    value = ctx.secrets.get("API_KEY")
    key = ctx.secrets.get("PEM")
    print("plain:", value)
    print("b64:", __import__("base64").b64encode(value.encode()).decode())
    print("pem follows")
    print(key)

s = job("s", steps=[step("leak", leak), step("shell", "echo shell-sees-$KICI_JOB_ID")])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[s])
"""


async def test_secrets_their_base64_and_each_line_of_a_multiline_secret_are_masked(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", SECRETS)
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    api_key = "s3cr3t-api-key-value"
    pem = "-----BEGIN KEY-----\nline-one-of-the-key\nline-two-of-the-key\n-----END KEY-----"
    message = dispatch(repo, "s", secrets={"API_KEY": api_key, "PEM": pem})
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    everything = json.dumps(orchestrator.job_messages(message["job_id"]))
    lines = orchestrator.log_lines(message["job_id"])
    assert "plain: ***" in lines and "b64: ***" in lines
    assert api_key not in everything
    assert base64.b64encode(api_key.encode()).decode() not in everything
    for line in pem.splitlines():
        assert line not in everything
    assert lines.count("***") >= 4
    assert f"shell-sees-{message['job_id']}" in lines


ENV = """
import os

def show(ctx):
    for key in sorted(os.environ):
        print(f"{key}={os.environ[key]}")
    ctx.sh("env | sort | sed 's/^/sh:/'")

e = job("e", steps=[step("show", show)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[e])
"""


async def test_the_step_environment_has_no_agent_settings_or_token(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", ENV)
    start_agent(orchestrator, KICI_LABELS="envtest")
    await orchestrator.wait_registered()
    message = dispatch(repo, "e", env={"FROM_DISPATCH": "yes"}, token="clone-token-value-123")
    message["repo_url"] = str(repo.path)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    lines = orchestrator.log_lines(message["job_id"], 0)
    names = {line.removeprefix("sh:").split("=", 1)[0] for line in lines if "=" in line}
    assert {"CI", "KICI", "KICI_RUN_ID", "KICI_JOB_ID", "FROM_DISPATCH", "PATH"} <= names
    leaked = {n for n in names if n.startswith("KICI_") and n not in {"KICI_RUN_ID", "KICI_JOB_ID", "KICI_ENV",
                                                                      "KICI_PATH"}}
    assert leaked == set(), leaked
    text = "\n".join(lines)
    assert TOKEN not in text and orchestrator.url not in text and "clone-token-value-123" not in text
    # the shell's environment is the step's; the Python lines show the runner process's own
    assert "sh:FROM_DISPATCH=yes" in lines and f"sh:KICI_JOB_ID={message['job_id']}" in lines
    assert "sh:CI=true" in lines and "sh:FORCE_COLOR=1" in lines



LEAK = """
import os
import subprocess

def show(ctx):
    ctx.sh('echo "python=$(command -v python || echo none)"; echo "PATH=$PATH"; env | sed "s/^/sh:/"')
    child = subprocess.run(["sh", "-c", "env"], capture_output=True, text=True, check=True).stdout
    for line in child.splitlines():
        print("child:" + line)

e = job("e", steps=[step("show", show)])
j = job("j", env={"PYTHONPATH": "/from/the/job"}, steps=[step("sh", 'echo "job-pythonpath=$PYTHONPATH"')])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[e, j])
"""


def kici_venv_leaks(lines: list[str]) -> list[str]:
    """Lines showing KiCI's own virtualenv or the interpreter's variables in a step's environment."""
    venv = str(Path(sys.prefix))
    return [line for line in lines if venv in line
            or line.split(":", 1)[-1].startswith(("VIRTUAL_ENV=", "PYTHONHOME=", "PYTHONPATH="))]


async def test_the_agent_environment_and_virtualenv_do_not_leak_into_steps(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    """An agent started from KiCI's virtualenv (its bin first on PATH, VIRTUAL_ENV and PYTHONPATH set):
    `python` in a step must not be KiCI's interpreter, and none of it reaches the step's environment."""
    assert sys.prefix != sys.base_prefix, "the tests run from KiCI's virtualenv"
    repo = workflow_repo(tmp_path / "repo", LEAK)
    venv_bin = str(Path(sys.prefix) / "bin")
    extra_path = tmp_path / "on-pythonpath"
    extra_path.mkdir()
    start_agent(orchestrator, KICI_LABELS="leaktest", PATH=f"{venv_bin}:{os.environ['PATH']}",
                VIRTUAL_ENV=sys.prefix, PYTHONPATH=str(extra_path))
    await orchestrator.wait_registered()
    message = dispatch(repo, "e")
    message["repo_url"] = str(repo.path)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    lines = orchestrator.log_lines(message["job_id"], 0)
    assert any(line.startswith("python=") for line in lines) and any(line.startswith("sh:PATH=") for line in lines)
    assert any(line.startswith("child:PATH=") for line in lines)
    assert kici_venv_leaks(lines) == [], lines
    assert not [line for line in lines if str(extra_path) in line]
    # a workflow or job may still set them explicitly
    message = dispatch(repo, "j")
    message["repo_url"] = str(repo.path)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    assert "job-pythonpath=/from/the/job" in orchestrator.log_lines(message["job_id"], 0)


LOUD = """
def loud(ctx):
    for i in range(120):
        print(f"line-{i:03d}")

def huge(ctx):
    chunk = "x" * 99
    for i in range(3000):
        print(chunk)

def after(ctx):
    print("after-ran")

l = job("l", steps=[step("loud", loud), step("huge", huge), step("after", after)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[l])
"""


async def test_log_chunks_are_at_most_50_lines_in_order_and_the_cap_truncates_once(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", LOUD)
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "l", max_log_size_bytes=100_000)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", final
    chunks = orchestrator.messages("log.chunk", message["job_id"])
    assert all(1 <= len(c["lines"]) <= 50 for c in chunks)
    assert orchestrator.log_lines(message["job_id"], 0) == [f"line-{i:03d}" for i in range(120)]
    huge = orchestrator.log_lines(message["job_id"], 1)
    truncation = "[TRUNCATED: log output exceeded 100000 bytes]"
    assert huge.count(truncation) == 1 and huge[-1] == truncation
    assert len(huge) == 1000 + 1  # 1000 lines of 100 bytes fit exactly
    assert orchestrator.log_lines(message["job_id"], 2) == ["after-ran"]  # the cap is per step


CRASH = """
import os, signal

def die(ctx):
    print("about to die")
    os.kill(os.getpid(), signal.SIGKILL)  # Python steps run in the runner process itself

def sleepy(ctx):
    ctx.sh("exec -a {marker}-sleep sleep 300")

c = job("c", steps=[step("die", die), "echo never"])
t = job("t", steps=[step("sleepy", sleepy)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[c, t])
"""


async def test_a_runner_that_dies_fails_the_job_as_crashed(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str
) -> None:
    repo = workflow_repo(tmp_path / "repo", CRASH.format(marker=marker))
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "c")
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "internal"
    assert final["error"].startswith("workflow runner crashed: runner exited with code -9")
    assert not any((tmp_path / "agent-work" / "jobs").iterdir())


async def test_job_timeout_from_the_dispatch_fails_the_job_and_kills_its_processes(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str
) -> None:
    repo = workflow_repo(tmp_path / "repo", CRASH.format(marker=marker))
    start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "t", job_timeout_ms=1500)
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "failed" and final["failure_category"] == "timeout", final
    assert final["error"].startswith("job_timeout:")
    assert marker_pids(marker) == []
