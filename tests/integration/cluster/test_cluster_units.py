"""The cluster's parts in one process, on SQLite and PostgreSQL: the leader lease and its fence, the bus,
node-name uniqueness, what a joining node releases, and a single node's status."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from kici.orchestrator.agents.registry import AgentRegistry
from kici.orchestrator.app import create_app
from kici.orchestrator.cluster.bus import ClusterBus
from kici.orchestrator.cluster.leadership import FencedOut, Leadership
from kici.orchestrator.cluster.node import Node, NodeNameInUse
from kici.orchestrator.config import Settings
from kici.orchestrator.container import Readiness, services_of
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.store import cluster as cluster_store
from tests.integration.orchestrator.conftest import insert_job, insert_run
from tests.integration.orchestrator.dispatch_harness import serve_orchestrator

from .conftest import until

LEASE = dt.timedelta(seconds=5)


async def _acquire(database: Database, holder: str, lease: dt.timedelta = LEASE) -> int | None:
    async with database.transaction() as conn:
        return await cluster_store.acquire_lease(conn, holder, now=await cluster_store.db_now(conn), lease=lease)


async def _expire_lease(database: Database) -> None:
    async with database.transaction() as conn:
        await conn.execute(schema.leader_lease.update().values(expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)))


async def test_the_lease_moves_on_with_a_new_term_and_the_old_leaders_writes_are_refused(database: Database) -> None:
    assert await _acquire(database, "a") == 1
    assert await _acquire(database, "b") is None  # held: b waits
    old = Leadership()
    old.enable("a", 5000)
    old.gained(1)
    async with database.transaction() as conn:
        await old.fence(conn, "test")  # a leads: its write goes through
        await cluster_store.insert_event(conn, topic="t", payload={"n": 1}, origin="a")

    await _expire_lease(database)  # a was paused past its lease
    assert await _acquire(database, "b") == 2
    lost: list[int] = []
    old.on_lost = lost.append
    with pytest.raises(FencedOut):
        async with database.transaction() as conn:
            await old.fence(conn, "late write")
            await cluster_store.insert_event(conn, topic="t", payload={"n": 2}, origin="a")
    async with database.read() as conn:
        payloads = [e.payload for e in await cluster_store.events_after(conn, 0)]
        lease = await cluster_store.get_lease(conn)
        now = await cluster_store.db_now(conn)
        assert not await cluster_store.renew_lease(conn, "a", 1, now=now, lease=LEASE)
    assert payloads == [{"n": 1}]  # the late write left nothing
    assert lost == [1] and not old.is_leader and not old.may_act()
    assert lease is not None and (lease.holder, lease.term) == ("b", 2)
    disabled = Leadership()  # a component outside a node (tests driving ticks): the fence lets it through
    async with database.transaction() as conn:
        await disabled.fence(conn, "anything")
    assert disabled.may_act()


async def test_a_takeover_waits_for_the_fenced_transaction_to_commit(database: Database) -> None:
    if not database.is_postgresql:
        pytest.skip("SQLite has one writer at a time: no transaction runs beside another")
    assert await _acquire(database, "a", dt.timedelta(milliseconds=300)) == 1
    leader = Leadership()
    leader.enable("a", 5000)
    leader.gained(1)
    order: list[str] = []
    async with database.transaction() as conn:
        await leader.fence(conn, "slow duty")
        await asyncio.sleep(0.5)  # the lease runs out while the duty's transaction is open
        takeover = asyncio.create_task(_acquire(database, "b"))
        await asyncio.sleep(0.3)
        assert not takeover.done()  # b's UPDATE waits for the lease row a locked FOR SHARE
        order.append("a commits")
    assert await takeover == 2
    order.append("b leads")
    assert order == ["a commits", "b leads"]


async def test_the_bus_delivers_each_durable_message_once_per_node(database: Database) -> None:
    a = ClusterBus(database, origin="a:1", poll_ms=50)
    b = ClusterBus(database, origin="b:1", poll_ms=50)
    got_a: list[tuple[str, dict[str, object]]] = []
    got_b: list[tuple[str, dict[str, object]]] = []
    a.subscribe("agent.cancel", lambda t, p: got_a.append((t, p)))
    b.subscribe("job-log:*", lambda t, p: got_b.append((t, p)))
    b.subscribe("agent.cancel", lambda t, p: got_b.append((t, p)))
    await a.start()
    await b.start()
    a.peers = b.peers = 1
    try:
        if database.is_postgresql:
            await until(lambda: _true(b.listening), within=10, what="b listening")
        await a.publish("agent.cancel", {"agent_id": "x"})
        await a.publish("job-log:j1", {"n": 3}, durable=database.is_sqlite)  # NOTIFY only on PostgreSQL
        await a.publish("unheard", {})

        async def both() -> bool:
            return len(got_b) == 2
        await until(both, within=10, what="b to receive both messages")
        assert got_a == [("agent.cancel", {"agent_id": "x"})]  # delivered here at once, not again from the table
        assert sorted(got_b, key=str) == [("agent.cancel", {"agent_id": "x"}), ("job-log:j1", {"n": 3})]
        await asyncio.sleep(0.3)  # polls (and NOTIFYs) later: nothing is delivered twice
        assert len(got_b) == 2 and len(got_a) == 1
    finally:
        await a.stop()
        await b.stop()


async def test_a_message_whose_notify_was_lost_arrives_by_the_poll_once(database: Database) -> None:
    a = ClusterBus(database, origin="a:1", poll_ms=50)
    b = ClusterBus(database, origin="b:1", poll_ms=10_000)  # not started: it hears no NOTIFY
    got: list[str] = []
    b.subscribe("agent.close", lambda _t, p: got.append(str(p["agent_id"])))
    async with database.read() as conn:
        b._last_id = await cluster_store.last_event_id(conn)
    await a.publish("agent.close", {"agent_id": "x"}, local=False)
    await a.publish("agent.close", {"agent_id": "y"}, local=False)
    assert await b.poll() == 2 and got == ["x", "y"]
    assert await b.poll() == 0 and got == ["x", "y"]


async def _true(value: bool) -> bool:
    return value


def _settings(database: Database, tmp_path: Path, name: str | None, **extra: object) -> Settings:
    values: dict[str, object] = {"node_lease_seconds": 1.0, **extra}
    return Settings(data_dir=tmp_path / f"data-{name}", database_url=database.url, node_name=name,
                    **values)  # type: ignore[arg-type]


async def test_a_node_name_held_by_a_live_node_is_refused(database: Database, tmp_path: Path) -> None:
    if not database.is_postgresql:
        # two live nodes on one SQLite file is not a supported cluster; this variant also hung once in a
        # combined run on a loaded machine (not understood yet: see the branch's report)
        pytest.skip("clusters of several nodes need PostgreSQL")
    first = create_app(_settings(database, tmp_path, "same", node_lease_seconds=3.0), database)
    second = create_app(_settings(database, tmp_path / "other", "same"), database)
    node = services_of(first).node
    await node.start(Readiness())
    try:
        with pytest.raises(NodeNameInUse, match="in use by a live orchestrator"):
            await services_of(second).node.join()  # waits for the lease, sees it renewed
    finally:
        await node.stop()
    # once the first one left, the name is free at once
    again = services_of(create_app(_settings(database, tmp_path / "third", "same"), database)).node
    await again.join()
    assert again.joined
    await again.stop()


async def test_a_joining_node_releases_its_previous_incarnations_and_dead_nodes_agents_only(
    database: Database, tmp_path: Path
) -> None:
    async with database.transaction() as conn:
        now = await cluster_store.db_now(conn)
        for node_id, expires in (("live", now + dt.timedelta(minutes=5)), ("dead", now - dt.timedelta(seconds=1))):
            await cluster_store.put_node(conn, node_id=node_id, incarnation="old", address=None, version=None,
                                         now=now, lease=expires - now)
        run_id = await insert_run(conn, status="running")
        jobs: dict[str, str] = {}
        for agent_id, node_id in (("on-live", "live"), ("on-dead", "dead"), ("on-me", "me"), ("on-none", None)):
            await conn.execute(schema.agents.insert().values(id=agent_id, labels=[], connected=True, node_id=node_id,
                                                             registered_at=now))
            jobs[agent_id] = await insert_job(conn, run_id, agent_id, status="running", agent_id=agent_id)
            await conn.execute(schema.dispatch_queue.insert().values(
                job_id=jobs[agent_id], run_id=run_id, status="dispatched", agent_id=agent_id,
                expires_at=now + dt.timedelta(hours=1)))
    app = create_app(_settings(database, tmp_path, "me"), database)
    node: Node = services_of(app).node
    assert isinstance(node.registry, AgentRegistry)
    await node.join()
    try:
        async with database.read() as conn:
            statuses = {agent: (await conn.execute(sa.select(schema.jobs.c.status)
                                                   .where(schema.jobs.c.id == job))).scalar_one()
                        for agent, job in jobs.items()}
            connected = dict((await conn.execute(sa.select(schema.agents.c.id, schema.agents.c.connected))).all())
            nodes = [n.id for n in await cluster_store.list_nodes(conn)]
        assert statuses == {"on-live": "running", "on-dead": "recovering", "on-me": "recovering",
                            "on-none": "recovering"}
        assert connected == {"on-live": True, "on-dead": False, "on-me": False, "on-none": False}
        assert nodes == ["live", "me"]  # the dead node's row went with its agents
        assert node.leadership.is_leader  # the lease was free
    finally:
        await node.stop()


async def test_a_single_node_is_its_own_leader(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        response = await orch.admin("GET", "/cluster")
        assert response.status_code == 200, response.text
        status = response.json()
        node_id = orch.app.state.kici.node_id
        assert status["node"] == status["leader"] == node_id and status["term"] >= 1
        assert [(n["id"], n["alive"], n["leader"], n["agents"]) for n in status["nodes"]] == [(node_id, True, True, 0)]
        metrics = (await orch.get("/metrics")).text
        assert "kici_cluster_is_leader 1.0" in metrics and "kici_cluster_nodes 1.0" in metrics
    async with database.read() as conn:
        assert await cluster_store.list_nodes(conn) == []  # left the cluster on shutdown


async def test_kici_admin_cluster_status(database: Database, tmp_path: Path) -> None:
    from tests.integration.orchestrator.test_kici_admin_live import finish, start_admin

    async with serve_orchestrator(database, tmp_path) as orch:
        node_id = orch.app.state.kici.node_id
        code, out, err = await finish(await start_admin(orch, "cluster", "status"))
        assert code == 0, err
        assert f"Leader:      {node_id}" in out and "Term:" in out
        [row] = [line for line in out.splitlines() if line.startswith(node_id)]
        assert row.split()[1:3] == ["leader", "alive"]
        code, out, err = await finish(await start_admin(orch, "cluster", "status", "--json"))
        assert code == 0, err
        found = json.loads(out)
        assert found["leader"] == node_id and [n["id"] for n in found["nodes"]] == [node_id]


async def test_a_missing_lease_row_is_created_again(database: Database, tmp_path: Path) -> None:
    async with database.transaction() as conn:
        await conn.execute(schema.leader_lease.delete())
    node = services_of(create_app(_settings(database, tmp_path, "solo"), database)).node
    await node.join()
    try:
        async with database.read() as conn:
            lease = await cluster_store.get_lease(conn)
        assert lease is not None and (lease.holder, lease.term) == ("solo", 1) and node.leadership.is_leader
    finally:
        await node.stop()


async def test_a_message_committed_after_a_later_one_is_not_skipped(database: Database) -> None:
    if not database.is_postgresql:
        pytest.skip("SQLite has one writer at a time: ids commit in order")
    b = ClusterBus(database, origin="b:1", poll_ms=10_000)
    got: list[str] = []
    b.subscribe("agent.close", lambda _t, p: got.append(str(p["agent_id"])))
    async with database.read() as conn:
        b._last_id = await cluster_store.last_event_id(conn)
    async with database.transaction() as slow:
        await cluster_store.insert_event(slow, topic="agent.close", payload={"agent_id": "first"}, origin="a:1")
        async with database.transaction() as fast:
            await cluster_store.insert_event(fast, topic="agent.close", payload={"agent_id": "second"}, origin="a:1")
        assert await b.poll() == 1 and got == ["second"]
    assert await b.poll() == 1 and got == ["second", "first"]
    assert await b.poll() == 0
