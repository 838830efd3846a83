"""Workflow `concurrency` and job `concurrency_group` enforced by the orchestrator, over real WebSockets
with simulated agents, on SQLite and PostgreSQL: FIFO per group, `cancel_in_progress`, `max`, job groups,
and what the admin API shows while a run or job waits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kici.engine.events import Event
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.store import runs as run_store

from .dispatch_harness import Orchestrator, SimAgent, serve_orchestrator, until, workflow

BRANCH_GROUP = {"group": {"_type": "inline", "expression": 'lambda event: "deploy-" + event.branch'}}


async def dispatched_runs(agent: SimAgent) -> list[str]:
    return [m["run_id"] for m in agent.received("job.dispatch")]


async def finish(agent: SimAgent, dispatch: dict[str, Any], state: str = "success") -> None:
    await agent.status(dispatch, "running")
    await agent.status(dispatch, state)


async def show(orch: Orchestrator, run_id: str) -> dict[str, Any]:
    reply = await orch.admin("GET", f"/runs/{run_id}")
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


async def test_workflow_concurrency_fifo(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        wf = workflow([{"name": "deploy"}, {"name": "notify", "needs": [{"name": "deploy"}]}],
                      concurrency=BRANCH_GROUP)
        first = await orch.create_run(wf)
        second = await orch.create_run(wf)
        third = await orch.create_run(wf)
        other_branch = await orch.create_run(wf, branch="dev")  # another group: not held up
        assert first.waiting is None and other_branch.waiting is None
        assert second.waiting == third.waiting == "concurrency: deploy-main"
        await agent.wait_for("job.dispatch", 2)
        assert sorted(await dispatched_runs(agent)) == sorted([first.run_id, other_branch.run_id])

        # the waiting runs: pending, their root job waiting with the reason, the dependent pending
        detail = await show(orch, second.run_id)
        assert detail["status"] == "pending" and detail["wait_reason"] == "concurrency: deploy-main"
        jobs = {j["name"]: j for j in detail["jobs"]}
        assert jobs["deploy"]["status"] == "waiting" and jobs["deploy"]["wait_reason"] == "concurrency: deploy-main"
        assert jobs["notify"]["status"] == "pending"

        # the whole first run (both jobs) holds the group; then the second, then the third — in order
        first_deploy = agent.received("job.dispatch")[0]
        if first_deploy["run_id"] != first.run_id:
            first_deploy = agent.received("job.dispatch")[1]
        await finish(agent, first_deploy)
        [*_, notify] = await agent.wait_for("job.dispatch", 3)
        assert notify["run_id"] == first.run_id
        assert (await orch.jobs(second.run_id))["deploy"].status == "waiting"
        await finish(agent, notify)
        await orch.wait_run(first.run_id, "success")
        [*_, second_deploy] = await agent.wait_for("job.dispatch", 4)
        assert second_deploy["run_id"] == second.run_id
        assert (await show(orch, second.run_id))["wait_reason"] is None
        assert (await orch.jobs(third.run_id))["deploy"].status == "waiting"

        # a failing run releases the group too
        await finish(agent, second_deploy, "failed")
        await orch.wait_run(second.run_id, "failed")
        [*_, third_deploy] = await agent.wait_for("job.dispatch", 5)
        assert third_deploy["run_id"] == third.run_id

        # cancelling a waiting run releases its place: the run behind it starts when the group frees up
        fourth = await orch.create_run(wf)
        fifth = await orch.create_run(wf)
        reply = await orch.admin("POST", f"/runs/{fourth.run_id}/cancel", json={})
        assert reply.status_code == 200 and reply.json()["status"] == "cancelled"
        await finish(agent, third_deploy)
        [*_, third_notify] = await agent.wait_for("job.dispatch", 6)
        await finish(agent, third_notify)
        [*_, fifth_deploy] = await agent.wait_for("job.dispatch", 7)
        assert fifth_deploy["run_id"] == fifth.run_id
        assert (await orch.run(fourth.run_id)).status == "cancelled"


async def test_workflow_cancel_in_progress(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=4) as agent:
        await agent.connect()
        wf = workflow([{"name": "build"}], concurrency={**BRANCH_GROUP, "cancelInProgress": True})
        first = await orch.create_run(wf)
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(first.run_id, "build", "running")

        second = await orch.create_run(wf)
        reason = f"superseded by run {second.run_id} (concurrency: deploy-main)"
        assert [s.run_id for s in second.superseded] == [first.run_id]
        [cancel] = await agent.wait_for("job.cancel")
        assert cancel["job_id"] == dispatch["job_id"] and cancel["reason"] == reason and cancel["force"] is False
        old = await orch.run(first.run_id)
        assert old.status == "cancelling" and old.failure_reason == reason
        # the cancelled run keeps its place until its job has stopped: never two at once
        assert second.waiting == "concurrency: deploy-main"

        # a third run supersedes the waiting second at once, and the cancelling first again
        third = await orch.create_run(wf)
        assert {s.run_id for s in third.superseded} == {first.run_id, second.run_id}
        waiting = await orch.run(second.run_id)
        assert waiting.status == "cancelled"
        assert waiting.failure_reason == f"superseded by run {third.run_id} (concurrency: deploy-main)"
        assert len(await dispatched_runs(agent)) == 1

        await agent.status(dispatch, "cancelled")
        await orch.wait_run(first.run_id, "cancelled")
        [_, next_dispatch] = await agent.wait_for("job.dispatch", 2)
        assert next_dispatch["run_id"] == third.run_id
        await finish(agent, next_dispatch)
        await orch.wait_run(third.run_id, "success")

        # nothing running: a new run cancels nothing and starts at once
        fourth = await orch.create_run(wf)
        assert fourth.superseded == [] and fourth.waiting is None


async def test_job_concurrency_group(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=6) as agent:
        await agent.connect()
        wf = workflow([{"name": "build"}, {"name": "deploy", "needs": [{"name": "build"}], "concurrencyGroup": "prod"}])
        first = await orch.create_run(wf)
        second = await orch.create_run(wf)
        builds = await agent.wait_for("job.dispatch", 2)
        for dispatch in builds:
            await finish(agent, dispatch)
        # both deploys are ready; one at a time, the older run's first
        await agent.wait_for("job.dispatch", 3)

        async def second_waits() -> bool:
            return (await orch.jobs(second.run_id))["deploy"].status == "waiting"
        await until(second_waits, what="the second deploy to wait")
        deploy = agent.received("job.dispatch")[2]
        assert deploy["run_id"] == first.run_id
        jobs = {j["name"]: j for j in (await show(orch, second.run_id))["jobs"]}
        assert jobs["deploy"]["wait_reason"] == "concurrency: prod"
        assert (await orch.run(second.run_id)).status == "running"  # its build ran: only the job waits

        # a cancelled run's job gives its place up too: the second deploy goes when the first ends
        await agent.status(deploy, "running")
        reply = await orch.admin("POST", f"/runs/{first.run_id}/cancel", json={})
        assert reply.json()["status"] == "cancelling"
        assert len(agent.received("job.dispatch")) == 3
        await agent.status(deploy, "cancelled")
        [*_, second_deploy] = await agent.wait_for("job.dispatch", 4)
        assert second_deploy["run_id"] == second.run_id
        await finish(agent, second_deploy)
        await orch.wait_run(second.run_id, "success")

        # a group is per repository and separate from workflow groups of the same name
        third = await orch.create_run(wf)
        [*_, third_build] = await agent.wait_for("job.dispatch", 5)
        await finish(agent, third_build)
        [*_, third_deploy] = await agent.wait_for("job.dispatch", 6)
        assert third_deploy["run_id"] == third.run_id


async def test_concurrency_max(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=5) as agent:
        await agent.connect()
        wf = workflow([{"name": "build"}], concurrency={"group": "nightly", "max": 2})
        created = [await orch.create_run(wf) for _ in range(4)]
        assert [c.waiting for c in created] == [None, None, "concurrency: nightly", "concurrency: nightly"]
        first_two = await agent.wait_for("job.dispatch", 2)
        assert sorted(d["run_id"] for d in first_two) == sorted(c.run_id for c in created[:2])
        await finish(agent, first_two[1])
        [*_, third] = await agent.wait_for("job.dispatch", 3)
        assert third["run_id"] == created[2].run_id
        assert (await orch.jobs(created[3].run_id))["build"].status == "waiting"
        await finish(agent, first_two[0])
        [*_, fourth] = await agent.wait_for("job.dispatch", 4)
        assert fourth["run_id"] == created[3].run_id


async def test_reconcile_sweep_admits_a_waiter_left_behind(database: Database, tmp_path: Path) -> None:
    """A release that found the next waiting run's row locked by another transaction leaves it waiting with
    a free place; the sweep admits it on its next tick."""
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", [], max_concurrency=2) as agent:
        await agent.connect()
        wf = workflow([{"name": "build"}], concurrency={"group": "left-behind"})
        first = await orch.create_run(wf)
        second = await orch.create_run(wf)
        assert second.waiting == "concurrency: left-behind"
        await agent.wait_for("job.dispatch")
        # what such a release leaves: the holder's place released, nobody admitted
        async with database.transaction() as conn:
            await conn.execute(
                sa.update(schema.runs).where(schema.runs.c.id == first.run_id).values(concurrency_state="released")
            )
        [_, dispatch] = await agent.wait_for("job.dispatch", 2)
        assert dispatch["run_id"] == second.run_id


async def test_group_stays_exact_with_two_orchestrators(database: Database, database_url: str) -> None:
    """Two orchestrators' engines on one database create runs of one group at the same time, finish the
    holders and cancel waiting runs concurrently: never more than one run holds the group, and runs are
    admitted in creation order (the cancelled ones skipped)."""
    other = Database.connect(database_url)
    engines = [database, other]
    wf = workflow([{"name": "build"}, {"name": "deploy", "needs": [{"name": "build"}], "concurrencyGroup": "env"}],
                  concurrency={"group": "race"})

    async def create(db: Database) -> str:
        async with db.transaction() as conn:
            created = await run_store.create_run(conn, run_store.NewRun(
                org_id="default", workflow=wf, event=Event(type="push", branch="main", sha="f" * 40, repo="acme/x"),
                repo="acme/x", ref="refs/heads/main", sha="f" * 40, lock_content_hash=None, delivery_id=None,
                source_id=None), queue_max_depth=1000, queue_timeout_ms=0)
        return created.run_id

    async def holders() -> list[str]:
        async with database.read() as conn:
            rows = await conn.execute(sa.select(schema.runs.c.id).where(
                schema.runs.c.concurrency_state == "holding"))
            return [str(r) for r in rows.scalars()]

    async def finish_run(db: Database, run_id: str) -> None:
        for name in ("build", "deploy"):
            async with db.read() as conn:
                job = next(j for j in await run_store.list_jobs(conn, run_id) if j.name == name)
            for state in ("running", "success"):
                async with db.transaction() as conn:
                    assert await run_store.record_job_state(conn, job.id, state=state, agent_id=None) is not None

    async def cancel(db: Database, run_id: str) -> None:
        async with db.transaction() as conn:
            await run_store.cancel_run(conn, run_id, by="test", force=False)

    try:
        run_ids = await asyncio.gather(*(create(engines[i % 2]) for i in range(10)))
        async with database.read() as conn:
            created_at = {r: (await run_store.get_run(conn, r)).created_at for r in run_ids}  # type: ignore[union-attr]
        by_age = sorted(run_ids, key=lambda r: (created_at[r], r))
        cancelled = {by_age[3], by_age[6]}
        admitted: list[str] = []
        round_ = 0
        while True:
            found = await holders()
            assert len(found) <= 1, found
            if not found:
                break
            admitted.append(found[0])
            work = [finish_run(engines[round_ % 2], found[0])]
            # a waiting run is cancelled by the other orchestrator while the holder finishes
            doomed = [r for r in by_age if r in cancelled and created_at[r] > created_at[found[0]]]
            if doomed:
                work.append(cancel(engines[(round_ + 1) % 2], doomed[0]))
                cancelled.discard(doomed[0])
                cancelled.add(f"done:{doomed[0]}")
            await asyncio.gather(*work)
            round_ += 1
        done = {c.removeprefix("done:") for c in cancelled}
        assert admitted == [r for r in by_age if r not in done]
        async with database.read() as conn:
            statuses = {r: (await run_store.get_run(conn, r)).status for r in run_ids}  # type: ignore[union-attr]
        assert {r for r, s in statuses.items() if s == "cancelled"} == done
        assert all(s == "success" for r, s in statuses.items() if r not in done)
    finally:
        await other.close()


async def test_group_expression_that_fails_writes_nothing(database: Database) -> None:
    wf = workflow([{"name": "build"}],
                  concurrency={"group": {"_type": "inline", "expression": 'lambda event: event.inputs["env"]'}})
    new = run_store.NewRun(
        org_id="default", workflow=wf, event=Event(type="push", branch="main", sha="e" * 40, repo="acme/y"),
        repo="acme/y", ref="refs/heads/main", sha="e" * 40, lock_content_hash=None, delivery_id=None, source_id=None)
    with pytest.raises(ValueError, match=r"workflow 'ci': concurrency group: .*env"):
        async with database.transaction() as conn:
            await run_store.create_run(conn, new, queue_max_depth=10, queue_timeout_ms=0)
    async with database.read() as conn:
        assert await run_store.list_runs(conn, repo="acme/y") == []
