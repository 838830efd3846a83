"""Two and three real orchestrator processes on one PostgreSQL database, with simulated agents over real
WebSockets: cancels crossing nodes, restarts that leave siblings' agents alone, `kill -9` of a node with
every job completing exactly once, and a SIGSTOPped leader whose late writes are refused."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx

from kici.orchestrator.db import schema

from .conftest import LEASE_S, Cluster, SimAgent, until


async def test_cluster_status_and_a_cancel_crossing_nodes(cluster: Cluster) -> None:
    n1, n2 = cluster.start("n1"), cluster.start("n2")
    await cluster.ready(n1, n2)
    agent = SimAgent(cluster, "a1", hold=True)
    try:
        await agent.connect(n1)

        async def two_nodes_one_leader() -> bool:
            status = await n2.cluster()
            return len(status["nodes"]) == 2 and status["leader"] in ("n1", "n2") and status["term"] >= 1
        await until(two_nodes_one_leader, what="both nodes and a leader")
        status = await n2.cluster()
        assert status["node"] == "n2"
        assert {n["id"]: n["agents"] for n in status["nodes"]} == {"n1": 1, "n2": 0}
        assert [n["id"] for n in status["nodes"] if n["leader"]] == [status["leader"]]
        assert all(n["alive"] for n in status["nodes"]) and status["bus_listening"] is True

        created = await cluster.create_run(1)
        [dispatch] = await agent.wait_for("job.dispatch")  # queued by neither node: found by n1's poll
        job_id = dispatch["job_id"]

        async def running() -> bool:
            return (await cluster.jobs(created.run_id))[job_id].status == "running"
        await until(running, what="the job running")
        # the cancel is handled by n2, which does not hold the agent's connection
        response = await n2.admin("POST", f"/runs/{created.run_id}/cancel")
        assert response.status_code == 200, response.text
        [cancel] = await agent.wait_for("job.cancel")
        assert cancel["job_id"] == job_id
        assert n2.events("job.cancel_relayed") and not n2.events("job.cancel_sent")
        await agent.finish(job_id, "cancelled")
        await cluster.wait_run(created.run_id, "cancelled")

        # revoking the agent's token on n2 cuts its connection to n1 off at once (not at n1's re-check)
        response = await n2.admin("DELETE", f"/agent-tokens/{cluster.agent_token_id}")
        assert response.status_code == 200, response.text
        [failure] = await agent.wait_for("auth.failure", within=10)
        assert failure["reason"] == "agent token revoked"
    finally:
        await agent.close()


async def test_a_node_restart_leaves_the_siblings_agents_alone(cluster: Cluster) -> None:
    n1, n2 = cluster.start("n1"), cluster.start("n2")
    await cluster.ready(n1, n2)
    started: dict[str, int] = {}
    on_n1 = SimAgent(cluster, "on-n1", hold=True, started=started)
    on_n2 = SimAgent(cluster, "on-n2", hold=True, started=started)
    try:
        await on_n1.connect(n1)
        await on_n2.connect(n2)
        created = await cluster.create_run(2)
        await on_n1.wait_for("job.dispatch")
        await on_n2.wait_for("job.dispatch")
        [job1] = list(on_n1.running)
        [job2] = list(on_n2.running)

        async def both_running() -> bool:
            jobs = await cluster.jobs(created.run_id)
            return jobs[job1].status == jobs[job2].status == "running"
        await until(both_running, what="both jobs running")

        # n2 dies without a word and comes back under its name; a new node n3 joins too
        n2.process.kill()
        n2 = cluster.start("n2")
        n3 = cluster.start("n3")
        await cluster.ready(n2, n3)
        await on_n2.close()
        jobs = await cluster.jobs(created.run_id)
        # n2's previous incarnation held on-n2: released by the restarted n2; on-n1's job is untouched
        assert jobs[job2].status == "recovering", jobs[job2]
        assert jobs[job1].status == "running", jobs[job1]
        assert on_n1.connected
        status = await n3.cluster()
        assert {n["id"]: n["agents"] for n in status["nodes"]} == {"n1": 1, "n2": 0, "n3": 0}

        # the released agent reconnects to n3 and reclaims its job; both finish
        back = SimAgent(cluster, "on-n2", hold=True, started=started)
        back.running = dict(on_n2.running)
        back.finished = dict(on_n2.finished)
        ack = await back.connect(n3)
        assert ack["reclaimed_jobs"] == [job2]
        await back.finish(job2)
        await on_n1.finish(job1)
        await cluster.wait_run(created.run_id, "success")
        assert started == {job1: 1, job2: 1}
        await back.close()
    finally:
        await on_n1.close()
        await on_n2.close()


async def test_kill_9_of_a_node_every_job_completes_exactly_once(cluster: Cluster) -> None:
    nodes = [cluster.start(f"n{i}") for i in (1, 2, 3)]
    await cluster.ready(*nodes)
    started: dict[str, int] = {}
    agents = [SimAgent(cluster, f"a{i}", work_s=0.3, started=started) for i in range(4)]
    victim, survivors = nodes[0], nodes[1:]
    replaced: list[SimAgent] = []
    try:
        for i, agent in enumerate(agents):  # a0, a1 on the victim; a2 on n2; a3 on n3
            await agent.connect(nodes[0] if i < 2 else nodes[i - 1])
        created = await cluster.create_run(16)
        job_ids = set((await cluster.jobs(created.run_id)).keys())

        async def some_on_victim() -> bool:
            return any(agents[i].running for i in (0, 1))
        try:
            await until(some_on_victim, what="a job running on the doomed node")
        except AssertionError as exc:
            cluster_events = [e for e in victim.process.events()
                              if str(e.get("event", "")).startswith(("cluster", "agent"))]
            raise AssertionError(f"{exc}: {[a.connected for a in agents]} {cluster_events}") from None
        victim.process.kill()
        # until the agents accept several orchestrator URLs, each lost agent is pointed at a survivor
        for i in (0, 1):
            agent = agents[i]

            async def closed(agent: SimAgent = agent) -> bool:
                return not agent.connected
            await until(closed, within=10, what=f"{agent.agent_id} to notice")
            replacement = SimAgent(cluster, agent.agent_id, work_s=0.3, started=started)
            replacement.running = dict(agent.running)
            replacement.finished = dict(agent.finished)
            await agent.close()
            replaced.append(agent)
            agents[i] = replacement
            await replacement.connect(survivors[i])
        try:
            run = await cluster.wait_run(created.run_id, "success", "failed", within=60)
        except AssertionError as exc:
            async with cluster.database.read() as conn:
                rows = [dict(r._mapping) for r in await conn.execute(
                    schema.dispatch_queue.select().where(schema.dispatch_queue.c.status != "done"))]
            held = [(a.agent_id, a.connected, list(a.running), a.finished) for a in agents]
            logged = [e for n in nodes for e in n.process.events() if "reclaim" in str(e.get("event"))
                      or "recover" in str(e.get("event")) or "taken_over" in str(e.get("event"))]
            raise AssertionError(f"{exc}: {rows} {held} {logged}") from None
        jobs = await cluster.jobs(created.run_id)
        assert run.status == "success", {j.name: (j.status, j.error) for j in jobs.values()}
        assert set(started) == job_ids
        twice = [job for job, times in started.items() if times != 1]
        everyone = agents + replaced
        seen = {job: [(a.agent_id, d.get("attempt")) for a in everyone for d in a.received("job.dispatch")
                      if d["job_id"] == job] for job in twice}
        logged = [e for n in nodes for e in n.process.events() if e.get("job_id") in twice or
                  any(j in str(e.get("jobs", "")) for j in twice)]
        assert twice == [], (seen, logged)

        async def victim_gone() -> bool:
            return [n["id"] for n in (await survivors[0].cluster())["nodes"]] == ["n2", "n3"]
        await until(victim_gone, within=LEASE_S * 4 + 5, what="the dead node to be removed")
    finally:
        for agent in agents:
            await agent.close()


async def test_a_leader_stopped_past_its_lease_is_fenced_when_it_resumes(cluster: Cluster) -> None:
    n1 = cluster.start("n1")
    await cluster.ready(n1)
    n2 = cluster.start("n2")
    await cluster.ready(n2)
    leader, term = await cluster.leader(n2)
    assert leader == "n1" and term >= 1  # the first node started leads
    n1.process.proc.send_signal(signal.SIGSTOP)
    try:
        async def taken_over() -> bool:
            found = await cluster.leader(n2)
            return found[0] == "n2"
        await until(taken_over, within=LEASE_S * 4 + 5, what="n2 to take the leader lease over")
        _, new_term = await cluster.leader(n2)
        assert new_term == term + 1
        assert n2.events("cluster.leader_elected")[-1]["term"] == new_term
    finally:
        n1.process.proc.send_signal(signal.SIGCONT)

    async def refused() -> bool:
        return bool(n1.events("cluster.leader_write_refused"))
    await until(refused, within=10, what="n1's late leader write to be refused")
    [first] = n1.events("cluster.leader_write_refused")[:1]
    assert first["term"] == term
    lost = n1.events("cluster.leadership_lost")
    assert lost and lost[0]["term"] == term

    async def settled() -> bool:
        status = await n1.cluster()
        return status["leader"] == "n2" and sorted(n["id"] for n in status["nodes"]) == ["n1", "n2"]
    await until(settled, within=10, what="n1 back as a follower")
    # n1 does not take the lease back: n2 keeps it under the same term
    await asyncio.sleep(LEASE_S)
    assert await cluster.leader(n1) == ("n2", new_term)
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = (await client.get(n1.url + "/metrics")).text
    fenced = [line for line in metrics.splitlines() if line.startswith("kici_cluster_fenced_writes_total")]
    assert fenced and float(fenced[0].split()[-1]) >= 1
    assert "kici_cluster_is_leader 0.0" in metrics and "kici_cluster_nodes 2.0" in metrics


async def test_a_dead_nodes_jobs_are_not_declared_stale_before_it_is_taken_over(cluster: Cluster) -> None:
    """The stale threshold (2 s here) shorter than the lease (3 s): the agent's node dies with a job running
    and the leader, which could not have received a heartbeat through it, must not call the job stale
    before the node is declared dead, when the job goes `recovering` and the agent gets its window."""
    fast_stale = {"KICI_JOB_HEARTBEAT_INTERVAL_MS": "1000", "KICI_STALE_DETECTOR_THRESHOLD_MULTIPLIER": "2.0"}
    leader = cluster.start("n1", **fast_stale)
    await cluster.ready(leader)
    doomed = cluster.start("n2", **fast_stale)
    await cluster.ready(doomed)
    assert (await cluster.leader(leader))[0] == "n1"
    agent = SimAgent(cluster, "a1", hold=True)
    try:
        await agent.connect(doomed)
        created = await cluster.create_run(1)
        [dispatch] = await agent.wait_for("job.dispatch")
        job_id = dispatch["job_id"]

        async def running() -> bool:
            return (await cluster.jobs(created.run_id))[job_id].status == "running"
        await until(running, what="the job running")
        await agent.send({"type": "job.heartbeat", "run_id": created.run_id, "job_id": job_id,
                          "timestamp": time.time()})

        async def heard() -> bool:
            return (await cluster.jobs(created.run_id))[job_id].last_heartbeat_at is not None
        await until(heard, what="the heartbeat stored")
        doomed.process.kill()

        async def settled() -> bool:
            return (await cluster.jobs(created.run_id))[job_id].status != "running"
        await until(settled, within=LEASE_S * 4 + 5, what="the job to leave `running`")
        job = (await cluster.jobs(created.run_id))[job_id]
        assert job.status == "recovering", (job.status, job.error)

        back = SimAgent(cluster, "a1", hold=True)
        back.running = dict(agent.running)
        await agent.close()
        agent = back
        ack = await agent.connect(leader)
        assert ack["reclaimed_jobs"] == [job_id]
        await agent.finish(job_id)
        assert (await cluster.wait_run(created.run_id, "success", "failed")).status == "success"
    finally:
        await agent.close()
