"""Dispatch and tracking over real WebSockets with simulated agents, on SQLite and PostgreSQL
(reference/orchestrator.md §6, behaviours 15-17, 20, 21, 25-27, 29, 31, 32)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from kici.orchestrator.agents import AgentTimeouts
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.dispatch.payload import DispatchRetry
from kici.orchestrator.services import services_of
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store import queue as queue_store
from kici.orchestrator.store.sources import delete_source

from .dispatch_harness import Orchestrator, SimAgent, exact, serve_orchestrator, until, workflow


async def test_dispatch_payload_and_success(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", ["linux"]) as agent:
        agent.auto = "success"
        agent.outputs = {"build": {"version": "1.2"}}
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build", "runsOn": exact("linux"), "timeout": 60000}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        assert dispatch["run_id"] == created.run_id and dispatch["job_id"] == created.job_ids["build"]
        assert dispatch["repo_url"] == str(tmp_path / "repo") and dispatch["sha"] == "a" * 40
        assert dispatch["workflow_file"] == ".kici/workflows/ci.py" and dispatch["export"] == "#ci"
        assert dispatch["content_hash"] == "c" * 64 and dispatch["job"] == dispatch["display_name"] == "build"
        assert dispatch["event"]["branch"] == "main" and dispatch["attempt"] == 1
        assert dispatch["job_timeout_ms"] == 60000 and "token" not in dispatch
        assert dispatch["env"]["KICI_RUN_ID"] == created.run_id
        run = await orch.wait_run(created.run_id, "success")
        assert run.started_at is not None and run.finished_at is not None
        job = (await orch.jobs(created.run_id))["build"]
        assert job.agent_id == "a1" and job.outputs == {"build": {"version": "1.2"}}
        page = (await orch.admin("GET", f"/runs/{created.run_id}/jobs/build/logs")).json()
        assert [line["line"] for line in page["lines"]] == ["hello from a1"] and page["complete"] is True
        metrics = (await orch.get("/metrics")).text
        assert "kici_jobs_dispatched_total 1.0" in metrics
        assert 'kici_runs_finished_total{status="success"} 1.0' in metrics
        assert "kici_dispatch_latency_seconds_count 1.0" in metrics


async def test_job_waits_for_an_agent_with_all_its_labels(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        small = SimAgent(orch, "small", ["linux"])
        big = SimAgent(orch, "big", ["linux", "docker", "x64"])
        try:
            await small.connect()
            created = await orch.create_run(workflow([{"name": "build", "runsOn": exact("linux", "docker")}]))
            await asyncio.sleep(0.5)  # several drain passes and polls: still nobody may take it
            assert small.received("job.dispatch") == []
            assert (await orch.jobs(created.run_id))["build"].status == "queued"
            big.auto = "success"
            await big.connect()
            await orch.wait_run(created.run_id, "success")
            assert len(big.received("job.dispatch")) == 1 and small.received("job.dispatch") == []
        finally:
            await small.close()
            await big.close()


async def test_busy_agent_gets_the_next_job_oldest_first(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        first = await orch.create_run(workflow([{"name": "one"}], name="first"))
        second = await orch.create_run(workflow([{"name": "two"}], name="second"))
        [dispatch] = await agent.wait_for("job.dispatch")
        assert dispatch["run_id"] == first.run_id
        await agent.send({"type": "job.ack", "run_id": first.run_id, "job_id": dispatch["job_id"]})
        await agent.status(dispatch, "running")
        await asyncio.sleep(0.4)
        assert len(agent.received("job.dispatch")) == 1  # max_concurrency 1: the second waits
        await agent.status(dispatch, "success")
        [_, nxt] = await agent.wait_for("job.dispatch", 2)
        assert nxt["run_id"] == second.run_id


async def test_two_agents_one_job_dispatched_once(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agents = [SimAgent(orch, f"a{i}", ["linux"]) for i in range(2)]
        try:
            for agent in agents:
                await agent.connect()
            created = await orch.create_run(workflow([{"name": "build"}]))
            await until(lambda: _count(agents, "job.dispatch", 1), what="a dispatch")
            await asyncio.sleep(0.5)
            assert sum(len(a.received("job.dispatch")) for a in agents) == 1
            async with database.read() as conn:
                [row] = await queue_store.list_queue(conn)
            assert row.job_id == created.job_ids["build"] and row.dispatch_attempts == 1
        finally:
            for agent in agents:
                await agent.close()


async def _count(agents: list[SimAgent], kind: str, n: int) -> bool:
    return sum(len(a.received(kind)) for a in agents) >= n


async def test_reject_busy_goes_to_another_agent(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        first = SimAgent(orch, "first", ["linux"])
        other = SimAgent(orch, "other", ["linux"])
        try:
            await first.connect()
            created = await orch.create_run(workflow([{"name": "build"}]))
            [dispatch] = await first.wait_for("job.dispatch")
            other.auto = "success"
            await other.connect()
            await first.send({"type": "job.reject", "run_id": created.run_id, "job_id": dispatch["job_id"],
                              "reason": "busy"})
            await orch.wait_run(created.run_id, "success")
            assert len(other.received("job.dispatch")) == 1 and len(first.received("job.dispatch")) == 1
            assert (await orch.jobs(created.run_id))["build"].agent_id == "other"
        finally:
            await first.close()
            await other.close()


async def test_unacknowledged_dispatch_is_requeued_then_fails(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, dispatch_ack_timeout_ms=300, dispatch_max_attempts=2) as orch:
        created = await orch.create_run(workflow([{"name": "build"}]))
        silent = SimAgent(orch, "silent", [])
        await silent.connect()
        await silent.wait_for("job.dispatch")
        assert await silent.wait_closed() == 4031  # closed for not acknowledging
        async with database.read() as conn:
            [row] = await queue_store.list_queue(conn)
        assert row.status == "pending" and row.dispatch_attempts == 1  # requeued
        again = SimAgent(orch, "silent", [])
        await again.connect()
        await again.wait_for("job.dispatch")
        job = await orch.wait_job(created.run_id, "build", "failed")
        assert job.error == "dispatch not acknowledged after 2 attempts"
        assert (await orch.run(created.run_id)).status == "failed"
        await again.close()


async def test_messages_from_a_non_owner_are_ignored(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        owner = SimAgent(orch, "owner", [])
        intruder = SimAgent(orch, "intruder", [])
        try:
            await owner.connect()
            created = await orch.create_run(workflow([{"name": "build"}]))
            [dispatch] = await owner.wait_for("job.dispatch")
            await intruder.connect()
            ids = {"run_id": created.run_id, "job_id": dispatch["job_id"]}
            await intruder.status(dispatch, "running")
            await intruder.send({"type": "log.chunk", **ids, "step_index": 0, "lines": ["forged"], "timestamp": 1.0,
                                 "seq": 0})
            await intruder.send({"type": "step.status", **ids, "step_index": 0, "step_name": "s",
                                 "state": "running", "timestamp": 1.0})
            await intruder.status(dispatch, "success")
            await asyncio.sleep(0.3)
            assert (await orch.jobs(created.run_id))["build"].status == "queued"
            await owner.status(dispatch, "running")
            await owner.send({"type": "log.chunk", **ids, "step_index": 0, "lines": ["real"], "timestamp": 1.0,
                              "seq": 0})
            await owner.status(dispatch, "success")
            await orch.wait_run(created.run_id, "success")
            page = (await orch.admin("GET", f"/runs/{created.run_id}/jobs/build/logs")).json()
            assert [line["line"] for line in page["lines"]] == ["real"]
        finally:
            await owner.close()
            await intruder.close()


async def _running_build(orch: Orchestrator) -> tuple[SimAgent, Any, dict[str, Any], dict[str, str]]:
    """Agent a1 connected and running the one job `build` of a new run: (agent, created run, its dispatch,
    the ids a log chunk carries)."""
    agent = SimAgent(orch, "a1", [])
    await agent.connect()
    created = await orch.create_run(workflow([{"name": "build"}]))
    [dispatch] = await agent.wait_for("job.dispatch")
    await agent.status(dispatch, "running")
    return agent, created, dispatch, {"run_id": created.run_id, "job_id": dispatch["job_id"]}


async def test_log_chunks_replayed_after_reconnect_are_stored_once(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, created, dispatch, ids = await _running_build(orch)
        for seq in range(3):
            await agent.send({"type": "log.chunk", **ids, "step_index": 0, "lines": [f"l{seq}a", f"l{seq}b"],
                              "timestamp": 1.0, "seq": seq})
        await agent.close()
        again = SimAgent(orch, "a1", [])
        ack = await again.connect(in_flight=[(created.run_id, dispatch["job_id"])])
        assert ack["reclaimed_jobs"] == [dispatch["job_id"]]
        for seq in range(2, 5):  # seq 2 was stored before the disconnect
            await again.send({"type": "log.chunk", **ids, "step_index": 1, "lines": [f"l{seq}"], "timestamp": 1.0,
                              "seq": seq})
        await again.status(dispatch, "success")
        await orch.wait_run(created.run_id, "success")
        lines = []
        after = 0
        while True:
            page = (await orch.admin("GET", f"/runs/{created.run_id}/jobs/build/logs",
                                     params={"after": after, "limit": 2})).json()
            lines += [(line["n"], line["step"], line["line"]) for line in page["lines"]]
            after = page["next"]
            if page["complete"]:
                break
        assert lines == [(1, 0, "l0a"), (2, 0, "l0b"), (3, 0, "l1a"), (4, 0, "l1b"), (5, 0, "l2a"), (6, 0, "l2b"),
                         (7, 1, "l3"), (8, 1, "l4")]
        await again.close()


async def test_a_log_read_with_wait_answers_when_lines_come_or_the_job_ends(database: Database, tmp_path: Path) -> None:
    # a long follow poll: only the wake-up of the write can answer early
    async with serve_orchestrator(database, tmp_path, log_follow_poll_ms=30_000) as orch:
        agent, created, dispatch, ids = await _running_build(orch)
        path = f"/runs/{created.run_id}/jobs/build/logs"

        started = time.monotonic()
        empty = (await orch.admin("GET", path, params={"after": 0, "wait": 0.3})).json()
        assert empty["lines"] == [] and not empty["complete"] and time.monotonic() - started >= 0.3

        logs = services_of(orch.app).logs
        waiting = asyncio.ensure_future(orch.admin("GET", path, params={"after": 0, "wait": 20}))
        await until(lambda: _at_least(logs.waiting, 1), what="the read to wait")
        sent = time.monotonic()
        await agent.send({"type": "log.chunk", **ids, "step_index": 0, "lines": ["hello"], "timestamp": 1.0, "seq": 1})
        page = (await asyncio.wait_for(waiting, 25)).json()
        assert [x["line"] for x in page["lines"]] == ["hello"] and time.monotonic() - sent < 5

        waiting = asyncio.ensure_future(orch.admin("GET", path, params={"after": page["next"], "wait": 20}))
        await until(lambda: _at_least(logs.waiting, 1), what="the read to wait")
        sent = time.monotonic()
        await agent.status(dispatch, "success")  # no more lines: the job's end wakes the read
        last = (await asyncio.wait_for(waiting, 25)).json()
        assert last["lines"] == [] and last["complete"] and time.monotonic() - sent < 5
        await agent.close()


async def _at_least(value: int, minimum: int) -> bool:
    return value >= minimum


async def test_reconnect_reclaims_and_completes(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(created.run_id, "build", "running")
        await agent.close()
        await orch.wait_job(created.run_id, "build", "recovering")
        again = SimAgent(orch, "a1", [])
        ack = await again.connect(in_flight=[(created.run_id, dispatch["job_id"])])
        assert ack["reclaimed_jobs"] == [dispatch["job_id"]]
        assert (await orch.jobs(created.run_id))["build"].status == "running"
        await again.status(dispatch, "success")
        await orch.wait_run(created.run_id, "success")
        assert again.received("job.dispatch") == []  # nothing handed out twice
        await again.close()


async def test_no_reconnect_fails_after_the_recovery_window(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, agent_max_reconnect_delay_ms=1000) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}, {"name": "after", "needs": [{"name": "build"}]}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(created.run_id, "build", "running")
        await agent.close()
        run = await orch.wait_run(created.run_id, "failed", within=10)
        jobs = await orch.jobs(created.run_id)
        assert jobs["build"].status == "failed" and jobs["build"].error == "recovery timeout exceeded"
        assert jobs["after"].status == "skipped" and run.failure_reason is not None


async def test_reconnect_without_the_job_releases_it(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.close()  # never started it
        again = SimAgent(orch, "a1", [])
        again.auto = "success"
        ack = await again.connect(in_flight=[])
        assert ack["reclaimed_jobs"] == []
        await orch.wait_run(created.run_id, "success")  # requeued and handed out again
        [redispatch] = again.received("job.dispatch")
        assert redispatch["job_id"] == dispatch["job_id"] and redispatch["attempt"] == 2
        await again.close()


async def test_heartbeat_silence_closes_4004_and_jobs_recover(database: Database, tmp_path: Path) -> None:
    timeouts = AgentTimeouts(auth_s=2, register_s=2, heartbeat_unhealthy_s=0.3, heartbeat_timeout_s=0.6,
                             last_seen_write_s=0)
    async with serve_orchestrator(database, tmp_path, timeouts=timeouts) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        assert await agent.wait_closed() == 4004
        await orch.wait_job(created.run_id, "build", "recovering")
        async with database.read() as conn:
            record = await agent_store.get_agent(conn, "a1")
        assert record is not None and not record.connected


async def test_stale_job_times_out_and_a_late_success_is_ignored(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, job_heartbeat_interval_ms=1000,
                                  stale_detector_threshold_multiplier=1.0) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}, {"name": "after", "needs": [{"name": "build"}]}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        started = time.monotonic()
        job = await orch.wait_job(created.run_id, "build", "timed_out_stale", within=10)
        assert time.monotonic() - started >= 0.9
        assert job.error is not None and "no heartbeat from agent a1" in job.error
        run = await orch.wait_run(created.run_id, "failed")
        assert (await orch.jobs(created.run_id))["after"].status == "skipped" and run.status == "failed"
        [cancel] = await agent.wait_for("job.cancel")
        assert cancel["job_id"] == dispatch["job_id"] and cancel["force"] is True
        await agent.status(dispatch, "success")  # too late
        await asyncio.sleep(0.3)
        assert (await orch.jobs(created.run_id))["build"].status == "timed_out_stale"
        await agent.close()


async def test_heartbeats_keep_a_job_alive(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, job_heartbeat_interval_ms=1000,
                                  stale_detector_threshold_multiplier=1.0) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        for _ in range(8):  # 2 s, twice the threshold
            await agent.send({"type": "job.heartbeat", "run_id": created.run_id, "job_id": dispatch["job_id"],
                              "timestamp": time.time()})
            await asyncio.sleep(0.25)
        assert (await orch.jobs(created.run_id))["build"].status == "running"
        await agent.status(dispatch, "success")
        await orch.wait_run(created.run_id, "success")
        await agent.close()


async def test_needs_dispatch_in_order_with_upstream_outputs(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        created = await orch.create_run(workflow([
            {"name": "a", "steps": [{"name": "make", "hasOutputs": True}]},
            {"name": "b", "needs": [{"name": "a"}]},
            {"name": "c", "needs": [{"name": "b"}]},
        ]))
        [first] = await agent.wait_for("job.dispatch")
        assert first["job"] == "a"
        await agent.status(first, "running")
        await agent.status(first, "success", outputs={"make": {"version": "7"}})
        [_, second] = await agent.wait_for("job.dispatch", 2)
        assert second["job"] == "b" and second["upstream_outputs"] == {"a": {"make": {"version": "7"}}}
        await agent.status(second, "running")
        await agent.status(second, "failed", error="exit 1")
        run = await orch.wait_run(created.run_id, "failed")
        jobs = await orch.jobs(created.run_id)
        assert jobs["c"].status == "skipped" and len(agent.received("job.dispatch")) == 2
        assert run.failure_reason == "job b: exit 1"


async def test_when_always_job_runs_after_a_failure(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        created = await orch.create_run(workflow([
            {"name": "a"},
            {"name": "report", "needs": [{"name": "a", "runOn": ["success", "failed", "cancelled", "skipped",
                                                               "timed_out_stale"]}]},
        ]))
        [first] = await agent.wait_for("job.dispatch")
        await agent.status(first, "running")
        await agent.status(first, "failed", error="boom")
        [_, second] = await agent.wait_for("job.dispatch", 2)
        assert second["job"] == "report"
        await agent.status(second, "running")
        await agent.status(second, "success")
        assert (await orch.wait_run(created.run_id, "failed")).status == "failed"


async def test_cancel_a_running_run(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}, {"name": "after", "needs": [{"name": "build"}]}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(created.run_id, "build", "running")
        reply = await orch.admin("POST", f"/runs/{created.run_id}/cancel", json={"force": True})
        assert reply.status_code == 200 and reply.json()["status"] == "cancelling"
        [cancel] = await agent.wait_for("job.cancel")
        assert cancel["job_id"] == dispatch["job_id"] and cancel["force"] is True
        assert "owner" in cancel["reason"]
        await agent.status(dispatch, "cancelled")
        run = await orch.wait_run(created.run_id, "cancelled")
        assert run.cancelled_by == "admin token 'owner'"
        assert (await orch.jobs(created.run_id))["after"].status == "cancelled"


async def test_cancel_reaches_an_agent_that_reconnects(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(created.run_id, "build", "running")
        await agent.close()
        await orch.wait_job(created.run_id, "build", "recovering")
        reply = await orch.admin("POST", f"/runs/{created.run_id}/cancel", json={})
        assert reply.json()["status"] == "cancelling"
        again = SimAgent(orch, "a1", [])
        await again.connect(in_flight=[(created.run_id, dispatch["job_id"])])
        [cancel] = await again.wait_for("job.cancel")
        assert cancel["job_id"] == dispatch["job_id"]
        await again.status(dispatch, "cancelled")
        await orch.wait_run(created.run_id, "cancelled")
        await again.close()


async def test_workflow_timeout_cancels_the_run(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}], timeout=500))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        [cancel] = await agent.wait_for("job.cancel", within=10)
        assert cancel["reason"] == "workflow_timeout"
        await agent.status(dispatch, "cancelled")
        run = await orch.wait_run(created.run_id, "cancelled")
        assert run.cancelled_by == "workflow_timeout" and "workflow timeout" in (run.failure_reason or "")


async def test_orchestrator_restart_recovers_jobs_for_the_reconnecting_agent(database: Database,
                                                                              tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(created.run_id, "build", "running")
        await agent.close()
        await orch.wait_job(created.run_id, "build", "recovering")
        tokens = dict(orch.agent_tokens)  # the agent id is bound to its token: it comes back with the same one
    # What a crashed orchestrator leaves behind: the agent still "connected", its job running, its row
    # dispatched (a clean shutdown would have released them as above).
    async with database.transaction() as conn:
        await conn.execute(schema.agents.update().where(schema.agents.c.id == "a1").values(connected=True))
        await conn.execute(schema.jobs.update().where(schema.jobs.c.id == dispatch["job_id"]).values(status="running"))
        await conn.execute(schema.dispatch_queue.update().where(schema.dispatch_queue.c.job_id == dispatch["job_id"])
                           .values(status="dispatched", recovery_deadline=None))
    async with serve_orchestrator(database, tmp_path / "second") as orch:
        orch.agent_tokens.update(tokens)
        await orch.wait_job(created.run_id, "build", "recovering")
        again = SimAgent(orch, "a1", [])
        ack = await again.connect(in_flight=[(created.run_id, dispatch["job_id"])])
        assert ack["reclaimed_jobs"] == [dispatch["job_id"]]
        await again.status(dispatch, "success")
        await orch.wait_run(created.run_id, "success")
        await again.close()


async def test_rerun_creates_a_linked_run_that_is_dispatched(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        agent.auto = "failed"
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        await orch.wait_run(created.run_id, "failed")
        agent.auto = "success"
        reply = await orch.admin("POST", f"/runs/{created.run_id}/rerun")
        assert reply.status_code == 201, reply.text
        rerun = reply.json()["run"]
        assert rerun["original_run_id"] == created.run_id and rerun["id"] != created.run_id
        await orch.wait_run(rerun["id"], "success")
        again = (await orch.admin("POST", f"/runs/{rerun['id']}/rerun")).json()["run"]
        assert again["original_run_id"] == created.run_id  # always the first run of the chain


async def test_a_passing_clone_access_failure_defers_the_job(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        dispatcher = orch.services.dispatcher
        real = dispatcher._clone_access
        failures = [DispatchRetry("source 'gh': GitHub answered 502")]

        async def flaky(run: Any) -> Any:
            if failures:
                raise failures.pop()
            return await real(run)

        dispatcher._clone_access = flaky  # type: ignore[method-assign]
        agent.auto = "success"
        await agent.connect()
        started = time.monotonic()
        created = await orch.create_run(workflow([{"name": "build"}]))
        await orch.wait_run(created.run_id, "success")
        [dispatch] = agent.received("job.dispatch")
        assert dispatch["attempt"] == 2  # the first hand-out was put back ...
        assert time.monotonic() - started >= 0.9  # ... and not offered again at once


async def test_a_job_whose_source_is_gone_fails_clearly(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        async with database.transaction() as conn:
            await delete_source(conn, orch.source_id)
        created = await orch.create_run(workflow([{"name": "build"}]))
        job = await orch.wait_job(created.run_id, "build", "failed")
        assert job.error == f"cannot dispatch: source {orch.source_id} no longer exists"
        assert agent.received("job.dispatch") == []


async def test_dispatch_carries_the_grace_period(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=2) as agent:
        await agent.connect()
        await orch.create_run(workflow([{"name": "graceful", "gracePeriod": 1500}, {"name": "plain"}]))
        dispatches = {d["display_name"]: d for d in await agent.wait_for("job.dispatch", 2)}
        assert dispatches["graceful"]["grace_period_ms"] == 1500
        assert dispatches["plain"].get("grace_period_ms") is None


async def test_delivery_sync_is_answered_once_what_came_before_is_durable(database: Database, tmp_path: Path) -> None:
    """`delivery.synced` is the agent's licence to forget a job's messages: by the time it arrives, the
    job's status is committed and its log chunk is in the file (read raw here, with no flush of its own)."""
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "a1", [])
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        [dispatch] = await agent.wait_for("job.dispatch")
        ids = {"run_id": created.run_id, "job_id": dispatch["job_id"]}
        await agent.send({"type": "job.ack", **ids})
        await agent.status(dispatch, "running")
        await agent.send({"type": "log.chunk", **ids, "step_index": 0, "lines": ["built"], "timestamp": 1.0, "seq": 0})
        await agent.status(dispatch, "success")
        await agent.send({"type": "delivery.sync", "id": 7})
        [synced] = await agent.wait_for("delivery.synced")
        assert synced["id"] == 7
        async with database.read() as conn:
            jobs = schema.jobs
            status = (await conn.execute(
                jobs.select().with_only_columns(jobs.c.status).where(jobs.c.id == dispatch["job_id"])
            )).scalar_one()
        assert status == "success"
        async with database.read() as conn:  # durable in the database before `delivery.synced`
            stored = (await conn.execute(sa.select(schema.log_chunks.c.lines).where(
                schema.log_chunks.c.job_id == dispatch["job_id"]))).scalars().all()
            stored += [key for key in (await conn.execute(sa.select(schema.log_segments.c.blob_key).where(
                schema.log_segments.c.job_id == dispatch["job_id"]))).scalars()]
        assert stored, "the chunk is in the database (as a chunk, or sealed into a segment)"
        # a malformed sync is refused like any invalid frame
        await agent.send({"type": "delivery.sync", "id": -1})
        assert await agent.wait_closed() == 4003
