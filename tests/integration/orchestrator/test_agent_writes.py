"""Agent registrations, disconnects and last-seen times are written grouped (`kici.orchestrator.agents.writes`):
many agents, few transactions — with every row still right, one bad registration failing alone, and jobs
of agents that dropped together recovering and reclaimed."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa

from kici.orchestrator.agents.writes import AgentWrites
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store.agents import Registration
from kici.orchestrator.store.tokens import create_agent_token

from .dispatch_harness import FAST_TIMEOUTS, SimAgent, serve_orchestrator, until, workflow
from .test_agent_token_cache import statements


def registration(agent_id: str, token_id: str, *, org_id: str = "default") -> Registration:
    return Registration(agent_id=agent_id, org_id=org_id, agent_token_id=token_id, labels=["linux"],
                        max_concurrency=2, version="1.0", hostname="box", now=utcnow())


async def two_tokens(database: Database) -> tuple[str, str]:
    async with database.transaction() as conn:
        first = await create_agent_token(conn, name="first", labels=["linux"])
        second = await create_agent_token(conn, name="second", labels=["linux"])
    return first.token.id, second.token.id


async def test_registrations_arriving_together_share_one_transaction(database: Database) -> None:
    first, second = await two_tokens(database)
    writes = AgentWrites(database)
    assert not (await writes.register(registration("taken", second))).refused  # bound to the second token
    with statements(database) as seen:
        results = await asyncio.gather(*(writes.register(registration(f"a{i}", first)) for i in range(10)),
                                       writes.register(registration("taken", first)))
    assert [r.refused for r in results] == [False] * 10 + [True]
    assert not any(r.holds_jobs for r in results)
    inserts = [s for s in seen if s.lstrip().startswith("INSERT INTO agents")]
    assert len(inserts) == 1, seen  # the ten new rows in one statement, in one transaction
    async with database.read() as conn:
        rows = {r.id: r for r in await agent_store.list_agents(conn)}
    assert all(rows[f"a{i}"].connected and rows[f"a{i}"].agent_token_id == first for i in range(10))
    assert rows["taken"].agent_token_id == second  # never rebound

    # registering again updates the rows (one statement for all), connected and not draining
    async with database.transaction() as conn:
        await agent_store.mark_agents_disconnected(conn, {f"a{i}": utcnow() for i in range(10)})
        await agent_store.set_agent_draining(conn, "a0", True)
    with statements(database) as seen:
        await asyncio.gather(*(writes.register(registration(f"a{i}", first)) for i in range(10)))
    assert len([s for s in seen if s.lstrip().startswith("UPDATE agents")]) == 1, seen
    async with database.read() as conn:
        again = {r.id: r for r in await agent_store.list_agents(conn)}
    assert all(again[f"a{i}"].connected for i in range(10)) and not again["a0"].draining


async def test_a_failing_registration_fails_alone(database: Database) -> None:
    first, _ = await two_tokens(database)
    writes = AgentWrites(database)
    results = await asyncio.gather(
        writes.register(registration("good-1", first)),
        writes.register(registration("bad", first, org_id="no-such-org")),  # the foreign key refuses it
        writes.register(registration("good-2", first)),
        return_exceptions=True,
    )
    assert isinstance(results[1], sa.exc.IntegrityError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    async with database.read() as conn:
        ids = [r.id for r in await agent_store.list_agents(conn)]
    assert ids == ["good-1", "good-2"]


async def test_heartbeats_of_many_agents_are_written_in_one_statement(database: Database, tmp_path: Path) -> None:
    timeouts = dataclasses.replace(FAST_TIMEOUTS, last_seen_write_s=1.0)
    async with serve_orchestrator(database, tmp_path, timeouts=timeouts) as orch:
        agents = [SimAgent(orch, f"builder-{i}", ["linux"]) for i in range(5)]
        await asyncio.gather(*(agent.connect() for agent in agents))
        async with database.read() as conn:
            registered = {r.id: r.last_seen_at for r in await agent_store.list_agents(conn)}

        async def all_seen_later() -> bool:
            async with database.read() as conn:
                rows = await agent_store.list_agents(conn)
            return all(r.last_seen_at is not None and r.last_seen_at > registered[r.id] for r in rows)

        with statements(database) as seen:
            await asyncio.gather(*(agent.send({"type": "heartbeat", "timestamp": 1.0}) for agent in agents))
            await until(all_seen_later, within=10, what="every agent's last_seen_at to move")
        touches = [s for s in seen if s.lstrip().startswith("UPDATE agents SET last_seen_at")]
        assert len(touches) == 1, touches
        for agent in agents:
            await agent.close()


async def test_a_silent_agent_is_still_closed_while_the_others_heartbeat(database: Database, tmp_path: Path) -> None:
    timeouts = dataclasses.replace(FAST_TIMEOUTS, heartbeat_unhealthy_s=0.3, heartbeat_timeout_s=1.0,
                                   last_seen_write_s=0.2)
    async with serve_orchestrator(database, tmp_path, timeouts=timeouts) as orch:
        silent, talking = SimAgent(orch, "silent", ["linux"]), SimAgent(orch, "talking", ["linux"])
        await silent.connect()
        await talking.connect()

        async def heartbeat_until_closed() -> None:
            while silent.close_code is None:
                await talking.send({"type": "heartbeat", "timestamp": 1.0})
                await asyncio.sleep(0.1)

        beating = asyncio.create_task(heartbeat_until_closed())
        try:
            assert await silent.wait_closed(within=10) == 4004
        finally:
            beating.cancel()

        async def only_the_silent_one_disconnected() -> bool:
            async with database.read() as conn:
                rows = {r.id: r for r in await agent_store.list_agents(conn)}
            return not rows["silent"].connected and rows["talking"].connected

        await until(only_the_silent_one_disconnected, what="the silent agent's row to say disconnected")
        await talking.close()


@pytest.mark.parametrize("report_jobs", [True, False])
async def test_agents_dropped_together_recover_their_jobs(
    database: Database, tmp_path: Path, report_jobs: bool
) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agents = [SimAgent(orch, f"builder-{i}", ["linux"]) for i in range(3)]
        for agent in agents:
            await agent.connect()
        created = await orch.create_run(workflow([{"name": f"job{i}"} for i in range(3)]))
        held: dict[str, tuple[str, str]] = {}
        for agent in agents:
            [dispatch] = await agent.wait_for("job.dispatch")
            await agent.status(dispatch, "running")
            held[agent.agent_id] = (dispatch["run_id"], dispatch["job_id"])
        for name in ("job0", "job1", "job2"):
            await orch.wait_job(created.run_id, name, "running")
        for agent in agents:  # cut at once, as when the network or a proxy in front of the node fails
            assert agent.ws is not None
            agent.ws.transport.abort()
        for name in ("job0", "job1", "job2"):
            await orch.wait_job(created.run_id, name, "recovering")
        async with database.read() as conn:
            assert not any(r.connected for r in await agent_store.list_agents(conn))

        again = [SimAgent(orch, agent.agent_id, ["linux"]) for agent in agents]
        acks = await asyncio.gather(*(
            agent.connect(in_flight=[held[agent.agent_id]] if report_jobs else []) for agent in again
        ))
        jobs = await orch.jobs(created.run_id)
        if report_jobs:
            assert [ack["reclaimed_jobs"] for ack in acks] == [[held[a.agent_id][1]] for a in again]
            assert {j.status for j in jobs.values()} == {"running"}
        else:  # started and not reported: the agent lost them (settled at registration, not at the deadline)
            assert [ack["reclaimed_jobs"] for ack in acks] == [[], [], []]
            assert {j.status for j in jobs.values()} == {"failed"}
        async with database.read() as conn:
            assert all(r.connected for r in await agent_store.list_agents(conn))
        for agent in again:
            await agent.close()


async def test_a_disconnect_records_the_last_frame_time(database: Database, tmp_path: Path) -> None:
    timeouts = dataclasses.replace(FAST_TIMEOUTS, last_seen_write_s=3600)  # heartbeats alone write nothing
    async with serve_orchestrator(database, tmp_path, timeouts=timeouts) as orch:
        agent = SimAgent(orch, "builder-1", ["linux"])
        await agent.connect()
        async with database.read() as conn:
            before = (await agent_store.get_agent(conn, "builder-1")).last_seen_at  # type: ignore[union-attr]
        assert before is not None
        sent = utcnow()
        await agent.send({"type": "heartbeat", "timestamp": 1.0})
        connection = orch.app.state.agents.get("builder-1")

        async def heard() -> bool:
            return bool(connection.last_seen_at >= sent)

        await until(heard, what="the heartbeat to arrive")
        await agent.close()

        async def disconnected() -> bool:
            async with database.read() as conn:
                row = await agent_store.get_agent(conn, "builder-1")
            return row is not None and not row.connected

        await until(disconnected, what="the row to say disconnected")
        async with database.read() as conn:
            after = (await agent_store.get_agent(conn, "builder-1")).last_seen_at  # type: ignore[union-attr]
        assert after is not None and after >= sent - dt.timedelta(milliseconds=1) and after > before
