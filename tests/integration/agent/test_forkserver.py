"""KICI_RUNNER_PRESTART with a real agent: runners forked from the agent's forkserver, a killed forkserver
replaced without losing a job, and the setting turned off."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from kici.runner import proctree

from .conftest import AgentFactory, FakeOrchestrator, WorkflowRepo, dispatch, wait_until, workflow_repo

pytestmark = pytest.mark.timeout(120)

WORKFLOW = """
import os

def parent(ctx):
    ppid = os.getppid()
    with open(f"/proc/{ppid}/cmdline", "rb") as handle:
        command = handle.read().replace(b"\\0", b" ").decode()
    print(f"RUNNER {os.getpid()} PARENT {ppid} {command}")

ci = workflow("ci", on=[push(branches=["main"])], jobs=[job("report", steps=[step("parent", parent)])])
"""


def runner_parent(orchestrator: FakeOrchestrator, job_id: str) -> tuple[int, int, str]:
    """(runner pid, its parent's pid, the parent's command line) as the job's step printed them."""
    [line] = [line for line in orchestrator.log_lines(job_id) if line.startswith("RUNNER ")]
    _, runner, _, parent, command = line.split(" ", 4)
    return int(runner), int(parent), command


async def run_job(orchestrator: FakeOrchestrator, repo: WorkflowRepo) -> tuple[int, int, str]:
    message = dispatch(repo, "report")
    await orchestrator.send(message)
    final = await orchestrator.wait_terminal(message["job_id"])
    assert final["state"] == "success", (final, orchestrator.log_lines(message["job_id"]))
    return runner_parent(orchestrator, message["job_id"])


async def test_runners_are_forked_from_one_forkserver_which_is_replaced_when_killed(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", WORKFLOW)
    agent = start_agent(orchestrator)
    await orchestrator.wait_registered()
    first_runner, server, command = await run_job(orchestrator, repo)
    second_runner, same_server, _ = await run_job(orchestrator, repo)
    assert "kici.runner.forkserver" in command and server == same_server and first_runner != second_runner
    info = proctree.read_stat(server)
    assert info is not None and info.ppid == agent.pid
    [started] = agent.events("forkserver.started")
    assert started["pid"] == server

    os.kill(server, signal.SIGKILL)
    await wait_until(lambda: agent.events("forkserver.lost"), 10, "the agent noticing its forkserver died")
    _, new_server, command = await run_job(orchestrator, repo)
    assert "kici.runner.forkserver" in command and new_server != server
    assert [e["pid"] for e in agent.events("forkserver.started")] == [server, new_server]
    assert agent.events("runner.spawned_instead") == []


async def test_with_prestart_off_every_runner_is_a_new_interpreter_started_by_the_agent(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    repo = workflow_repo(tmp_path / "repo", WORKFLOW)
    agent = start_agent(orchestrator, KICI_RUNNER_PRESTART="false")
    await orchestrator.wait_registered()
    _, parent, command = await run_job(orchestrator, repo)
    assert parent == agent.pid and "kici.agent" in command
    assert agent.events("forkserver.started") == []
    [started] = agent.events("agent.started")
    assert started["runner_prestart"] is False
