"""Per-process caches and log followers across the nodes of a cluster (real orchestrator processes, one
PostgreSQL database): a change made through one node takes effect on another at once, through the
cluster bus, not when the other node's cache entry expires; a log follower on one node wakes the moment
another node stores lines."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.cluster.conftest import ADMIN_TOKEN, Cluster, Node, SimAgent, until
from tests.integration.orchestrator.test_providers_git import compile_into
from tests.integration.orchestrator.test_providers_github import APP_ID, FakeGitHub
from tests.paths import GITHUB_FIXTURES

pytestmark = pytest.mark.timeout(120)

WEBHOOK_SECRET = "cluster-webhook-secret"
REPO = "Codertocat/Hello-World"
SHA = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"  # the `after` of push.branch-created.json
LONG_POLL_MS = "60000"
"""The fallback polls of the node under test: a change seen well within it came through NOTIFY."""


async def _deliver_push(node: Node) -> httpx.Response:
    body = (GITHUB_FIXTURES / "push.branch-created.json").read_bytes()
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-GitHub-Hook-Installation-Target-ID": str(APP_ID),
        "X-Hub-Signature-256": "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest(),
    }
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(node.url + "/webhook/default/github", content=body, headers=headers)


async def _metric(node: Node, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(node.url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def _metric_at_least(node: Node, name: str, value: float) -> bool:
    return await _metric(node, name) >= value


def _dropped(node: Node, source_id: str) -> bool:
    return any(e.get("source_id") == source_id for e in node.events("sources.cache_dropped"))


async def test_a_github_source_changed_on_one_node_is_used_changed_by_another_at_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    # the repository moved to another GitHub host (one App on both): the old one answers 404, which KiCI
    # takes for "no lock file at this commit" and caches, keyed by source, repository and commit
    old, new = FakeGitHub(), FakeGitHub()
    try:
        new.private_key, new.private_key_pem = old.private_key, old.private_key_pem
        new.files[(REPO, SHA)] = compile_into(tmp_path / "lock")
        a = cluster.start("a")
        b = cluster.start("b", KICI_CLUSTER_POLL_MS=LONG_POLL_MS)
        await cluster.ready(a, b)
        created = await a.admin("POST", "/sources", json={
            "name": "gh", "kind": "github", "config": {"app_id": APP_ID, "api_url": old.url},
            "secrets": {"webhook_secret": WEBHOOK_SECRET, "private_key": old.private_key_pem},
        })
        assert created.status_code == 201, created.text
        source_id = created.json()["id"]

        first = await _deliver_push(b)
        assert first.status_code in (200, 202), first.text
        assert not first.json().get("run_ids"), first.text
        assert old.lock_fetches(REPO) == 1
        again = await _deliver_push(b)  # node b cached the answer: the host is not asked again
        assert not again.json().get("run_ids") and old.lock_fetches(REPO) == 1

        moved = await a.admin("PATCH", f"/sources/{source_id}", json={"config": {"api_url": new.url}})
        assert moved.status_code == 200, moved.text
        # node b drops its cached answer (kept up to KICI_LOCKFILE_CACHE_TTL_MS, an hour) on the NOTIFY; its
        # own bus poll is a minute away
        await until(lambda: _true(_dropped(b, source_id)), within=5, what="node b to drop the source's caches")
        accepted = await _deliver_push(b)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json().get("run_ids"), accepted.text
        assert new.lock_fetches(REPO) == 1 and old.lock_fetches(REPO) == 1

        disabled = await a.admin("POST", f"/sources/{source_id}/disable")
        assert disabled.status_code == 200, disabled.text
        refused = await _deliver_push(b)  # webhooks read the source's row: no delay at all
        assert refused.status_code == 404, refused.text
    finally:
        old.close()
        new.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_git_source_changed_on_one_node_is_dispatched_changed_by_another_at_once(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b", KICI_CLUSTER_POLL_MS=LONG_POLL_MS)
    await cluster.ready(a, b)
    agent = SimAgent(cluster, "agent-1", work_s=0.05)
    try:
        await agent.connect(b)
        first = await cluster.create_run(1)
        (dispatch,) = await agent.wait_for("job.dispatch", 1)
        assert dispatch["run_id"] == first.run_id and dispatch["repo_url"] == str(cluster.tmp_path / "repo")
        await cluster.wait_run(first.run_id, "success")

        moved = str(cluster.tmp_path / "moved")
        changed = await a.admin("PATCH", f"/sources/{cluster.source_id}", json={"config": {"url": moved}})
        assert changed.status_code == 200, changed.text
        await until(lambda: _true(_dropped(b, cluster.source_id)), within=5,
                    what="node b to drop the source's caches")
        second = await cluster.create_run(1, name="second")
        dispatches = await agent.wait_for("job.dispatch", 2, within=5)  # node b's source cache keeps 10 s
        assert dispatches[1]["run_id"] == second.run_id and dispatches[1]["repo_url"] == moved
    finally:
        await agent.close()


async def test_a_log_follower_on_another_node_wakes_through_the_bus(cluster: Cluster) -> None:
    a = cluster.start("a")
    b = cluster.start("b", KICI_LOG_FOLLOW_POLL_MS="30000")
    await cluster.ready(a, b)
    # node a's bus sends non-durable messages only once it counts a live peer
    await until(lambda: _metric_at_least(a, "kici_cluster_nodes", 2), within=15, what="node a to see node b")
    agent = SimAgent(cluster, "agent-1", hold=True)
    try:
        await agent.connect(a)
        created = await cluster.create_run(1)
        (dispatch,) = await agent.wait_for("job.dispatch", 1)
        job_id = dispatch["job_id"]

        async def send(seq: int, line: str) -> None:
            await agent.send({"type": "log.chunk", "run_id": created.run_id, "job_id": job_id, "step_index": 0,
                              "lines": [line], "timestamp": time.time(), "seq": seq})

        path = f"/api/v1/admin/runs/{created.run_id}/jobs/{job_id}/logs"
        async with httpx.AsyncClient(base_url=b.url, timeout=30,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            cursor = 0
            for seq in range(1, 4):
                pending = asyncio.ensure_future(client.get(path, params={"after": cursor, "wait": 20}))
                # node b has read the log (nothing yet) and waits: only a wake-up can answer it early
                await until(lambda: _metric_at_least(b, "kici_log_followers_waiting", 1), within=10,
                            what="the follower on node b to wait")
                sent_at = time.monotonic()
                await send(seq, f"line {seq}")
                response = await asyncio.wait_for(pending, 25)
                elapsed = time.monotonic() - sent_at
                assert response.status_code == 200, response.text
                page: dict[str, Any] = response.json()
                assert [x["line"] for x in page["lines"]] == [f"line {seq}"], page
                # node b's own poll is 30 s away: only node a's wake-up through the bus explains this
                assert elapsed < 1.0, f"line {seq} reached the follower on node b after {elapsed:.2f} s"
                cursor = page["next"]

            # a burst: node a's wake-ups are coalesced (at most one per 50 ms), and still nothing is missed
            published = await _metric(a, "kici_log_wakeups_published_total")
            assert published >= 3
            burst = 300
            started = time.monotonic()
            for seq in range(4, 4 + burst):
                await send(seq, f"line {seq}")
            seen: list[str] = []
            while len(seen) < burst:
                response = await client.get(path, params={"after": cursor, "wait": 20})
                page = response.json()
                seen += [x["line"] for x in page["lines"]]
                cursor = page["next"]
                assert time.monotonic() - started < 20, f"{len(seen)} of {burst} lines after 20 s"
            elapsed = time.monotonic() - started
            assert seen == [f"line {seq}" for seq in range(4, 4 + burst)]
            sent = await _metric(a, "kici_log_wakeups_published_total") - published
            assert 1 <= sent <= elapsed / 0.05 + 2 and sent < burst / 3, (sent, elapsed)
    finally:
        await agent.close()

