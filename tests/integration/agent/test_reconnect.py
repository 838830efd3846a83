"""Disconnects: reconnect with back-off, `in_flight_jobs` on re-registration, replay of what was buffered
while offline (behind one gap marker when something was dropped), and jobs the orchestrator does not
take back."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import AgentFactory, FakeOrchestrator, dispatch, marker_pids, wait_until, workflow_repo

pytestmark = pytest.mark.timeout(120)

GATED = """
import pathlib, time

GO = pathlib.Path({go!r})

def gated(ctx):
    print("waiting-for-go")
    deadline = time.monotonic() + 60
    while not GO.exists():
        assert time.monotonic() < deadline, "go file never appeared"
        time.sleep(0.02)
    for i in range({lines}):
        print(f"offline-line-{{i:05d}}")

def finish(ctx):
    ctx.sh("exec -a {marker}-finish sleep {finish_sleep}")

g = job("g", steps=[step("gated", gated), step("finish", finish)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[g])
"""


async def test_offline_output_is_buffered_and_replayed_behind_one_gap_marker(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str
) -> None:
    go = tmp_path / "go"
    repo = workflow_repo(tmp_path / "repo", GATED.format(go=str(go), lines=15000, marker=marker, finish_sleep=0))
    agent = start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "g")
    job_id = message["job_id"]
    await orchestrator.send(message)
    await wait_until(lambda: "waiting-for-go" in orchestrator.log_lines(job_id, 0), 30, "the step to start")

    await orchestrator.stop()  # the orchestrator goes away mid-job
    go.touch()
    await wait_until(lambda: agent.events("job.finished"), 60, "the job to finish while offline")
    assert agent.events("connection.retry"), "the agent should be retrying"
    await orchestrator.start(orchestrator.port)

    conn = await orchestrator.wait_registered(count=2)
    assert conn.register is not None
    assert conn.register["in_flight_jobs"] == [{"job_id": job_id, "run_id": message["run_id"]}]
    final = await orchestrator.wait_terminal(job_id)
    assert final["state"] == "success"
    assert orchestrator.terminal(job_id) in conn.messages  # delivered on the new connection

    replayed = [m for m in conn.messages if m["type"] == "log.chunk" and m["job_id"] == job_id]
    markers = [line for m in replayed for line in m["lines"] if line.startswith("--- orchestrator offline")]
    assert len(markers) == 1, markers
    assert "log lines were dropped" in markers[0]
    # the marker comes before the replayed output, and the newest lines survived
    first_output = next(i for i, m in enumerate(replayed) if any(x.startswith("offline-line-") for x in m["lines"]))
    marker_index = next(i for i, m in enumerate(replayed) if markers[0] in m["lines"])
    assert marker_index < first_output
    lines = [x for x in orchestrator.log_lines(job_id, 0) if x.startswith("offline-line-")]
    assert lines[-1] == "offline-line-14999"
    assert 9000 <= len(lines) < 15000
    assert lines == sorted(lines)  # in order, a contiguous tail
    by_seq: dict[int, list[str]] = {}
    for chunk in orchestrator.messages("log.chunk", job_id):  # a seq sent twice is the same chunk
        assert by_seq.setdefault(chunk["seq"], chunk["lines"]) == chunk["lines"]
    assert [m["seq"] for m in replayed] == sorted(m["seq"] for m in replayed)
    # the agent is live again: a heartbeat and a fresh status arrived on the new connection
    await orchestrator.wait_message(lambda m: m in conn.messages and m["type"] == "heartbeat", what="heartbeat")


@pytest.mark.parametrize("reclaimed", [True, False])
async def test_jobs_running_across_a_reconnect_are_kept_or_abandoned(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path, marker: str, reclaimed: bool
) -> None:
    go = tmp_path / "go"
    repo = workflow_repo(tmp_path / "repo", GATED.format(go=str(go), lines=3, marker=marker, finish_sleep=300))
    agent = start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "g")
    job_id = message["job_id"]
    await orchestrator.send(message)
    go.touch()
    await wait_until(lambda: marker_pids(marker), 30, "the second step to run")

    await orchestrator.stop()
    orchestrator.reclaim = (lambda ids: ids) if reclaimed else (lambda ids: [])
    await orchestrator.start(orchestrator.port)
    conn = await orchestrator.wait_registered(count=2)
    assert conn.register is not None
    assert conn.register["in_flight_jobs"] == [{"job_id": job_id, "run_id": message["run_id"]}]

    if reclaimed:
        # still ours: heartbeats continue on the new connection, and a cancel there reaches it
        await orchestrator.wait_message(lambda m: m in conn.messages and m["type"] == "job.heartbeat"
                                        and m["job_id"] == job_id, what="job heartbeat after reconnect")
        await orchestrator.send({"type": "job.cancel", "run_id": message["run_id"], "job_id": job_id,
                                 "reason": "stop it", "force": True})
        final = await orchestrator.wait_terminal(job_id)
        assert final["state"] == "cancelled" and final in conn.messages
        assert marker_pids(marker) == []
    else:
        # not taken back: the agent kills it and sends nothing more about it
        await wait_until(lambda: not marker_pids(marker), 20, "the abandoned job's processes to die")
        await wait_until(lambda: agent.events("job.finished"), 20, "the abandoned job to end")
        assert agent.events("job.abandoned")
        assert orchestrator.terminal(job_id) is None
        assert [m for m in conn.messages if m.get("job_id") == job_id] == []
        await wait_until(lambda: [m for m in conn.messages if m["type"] == "agent.status"][-1]["active_jobs"] == 0,
                         10, "idle status")
        await wait_until(lambda: not any((tmp_path / "agent-work" / "jobs").iterdir()), 10, "workspace removal")


async def test_reconnect_backoff_keeps_trying_until_the_orchestrator_is_back(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory
) -> None:
    await orchestrator.stop()
    agent = start_agent(orchestrator, KICI_MAX_RECONNECT_DELAY_MS="200")
    await wait_until(lambda: len(agent.events("connection.retry")) >= 3, 30, "three retries")
    delays = [e["delay_ms"] for e in agent.events("connection.retry")]
    assert all(d <= 200 for d in delays)
    await orchestrator.start(orchestrator.port)
    await orchestrator.wait_registered()
    assert agent.proc.poll() is None


QUICK = """
def hello(ctx):
    print("hello-from-the-step")

q = job("q", steps=[step("hello", hello)])
ci = workflow("ci", on=[push(branches=["main"])], jobs=[q])
"""


async def test_a_result_read_but_not_confirmed_is_sent_again_after_the_orchestrator_returns(
    orchestrator: FakeOrchestrator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    """An orchestrator killed after reading a job's terminal status but before storing it (modelled: it
    reads everything and never answers `delivery.sync`) must not lose the result: the agent keeps the
    finished job in `in_flight_jobs` and sends its messages again to the next orchestrator."""
    orchestrator.withhold_sync = True
    repo = workflow_repo(tmp_path / "repo", QUICK)
    agent = start_agent(orchestrator)
    await orchestrator.wait_registered()
    message = dispatch(repo, "q")
    job_id = message["job_id"]
    await orchestrator.send(message)
    first = await orchestrator.wait_terminal(job_id)
    assert first["state"] == "success"
    await wait_until(lambda: orchestrator.syncs > 0, 10, "the agent to ask for a delivery sync")
    assert agent.events("job.finished") and not agent.events("job.delivered")

    await orchestrator.stop()  # read, never confirmed: as if killed before its writes committed
    orchestrator.withhold_sync = False
    await orchestrator.start(orchestrator.port)
    conn = await orchestrator.wait_registered(count=2)
    assert conn.register is not None
    assert conn.register["in_flight_jobs"] == [{"job_id": job_id, "run_id": message["run_id"]}]
    final = await orchestrator.wait_message(
        lambda m: m in conn.messages and m["type"] == "job.status" and m["state"] != "running", what="terminal again")
    assert final["job_id"] == job_id and final["state"] == "success"
    assert "hello-from-the-step" in [line for m in conn.messages if m["type"] == "log.chunk" for line in m["lines"]]

    # confirmed this time: the agent forgets the job, and a later reconnect no longer lists it
    await wait_until(lambda: agent.events("job.delivered"), 10, "the result confirmed")
    await orchestrator.stop()
    await orchestrator.start(orchestrator.port)
    conn = await orchestrator.wait_registered(count=3)
    assert conn.register is not None and conn.register["in_flight_jobs"] == []
