"""The agents' cache routes and the admin cache routes, over real HTTP, on SQLite and PostgreSQL, with the
filesystem blob store and a real S3 server (SeaweedFS): restore (exact, by prefix, miss), save, concurrent
savers of one key (one wins, none corrupts), the untrusted namespace, quota and age eviction, purge, and
storage down. The full path with a real agent is tests/e2e/test_caches_e2e.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest

from kici.orchestrator import caches
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import runs as runs_table
from kici.orchestrator.storage.blobs_s3 import S3BlobStore
from kici.orchestrator.store import audit as audit_store
from tests.s3server import S3Server

from .dispatch_harness import Orchestrator, SimAgent, exact, serve_orchestrator, workflow

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def aws_env(s3_server: S3Server) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in s3_server.aws_env}
    os.environ.update(s3_server.aws_env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(params=["fs", "s3"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "fs":
        return {}
    server: S3Server = request.getfixturevalue("s3_server")
    request.getfixturevalue("aws_env")
    return {"storage_backend": "s3", "storage_bucket": server.bucket, "storage_endpoint": server.endpoint,
            "storage_region": "us-east-1", "storage_force_path_style": True,
            "storage_prefix": f"c-{uuid.uuid4().hex[:10]}"}


def _url(job_id: str, key: str) -> str:
    return f"/api/v1/agent/jobs/{job_id}/caches/{quote(key, safe='')}"


async def _body(data: bytes, pieces: int = 1, pause: float = 0.0) -> AsyncIterator[bytes]:
    size = -(-len(data) // pieces)
    for at in range(0, len(data), size):
        yield data[at:at + size]
        if pause:
            await asyncio.sleep(pause)


async def _save(orch: Orchestrator, token: str | None, job_id: str, key: str, data: bytes, *, pieces: int = 1,
                pause: float = 0.0) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=orch.base_url, timeout=30) as client:
        return await client.put(_url(job_id, key), content=_body(data, pieces, pause), headers=headers)


async def _restore(orch: Orchestrator, token: str, job_id: str, key: str, *prefixes: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=orch.base_url, timeout=30) as client:
        return await client.get(_url(job_id, key), params={"restore_key": list(prefixes)},
                                headers={"Authorization": f"Bearer {token}"})


@asynccontextmanager
async def _running(orch: Orchestrator, *, sha: str = "a" * 40, branch: str = "main",
                   trust: str = "trusted") -> AsyncIterator[tuple[str, str]]:
    """A job running on a simulated agent: (its id, the agent's token)."""
    agent = SimAgent(orch, f"builder-{uuid.uuid4().hex[:6]}", ["linux"])
    await agent.connect()
    try:
        created = await orch.create_run(workflow([{"name": "build", "runs_on": exact("linux")}]), sha=sha,
                                        branch=branch)
        if trust != "trusted":
            async with orch.database.transaction() as conn:
                await conn.execute(runs_table.update().where(runs_table.c.id == created.run_id).values(trust=trust))
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await orch.wait_job(created.run_id, "build", "running")
        yield dispatch["job_id"], await orch.agent_token(["linux"])
    finally:
        await agent.close()


async def test_save_restore_exact_prefix_and_miss(database: Database, tmp_path: Path, storage: dict[str, Any]) -> None:
    async with serve_orchestrator(database, tmp_path, **storage) as orch, _running(orch) as (job_id, token):
        assert (await _restore(orch, token, job_id, "pip-abc")).status_code == 204
        first = os.urandom(300_000)
        saved = await _save(orch, token, job_id, "pip-abc", first, pieces=5)
        assert saved.status_code == 201, saved.text
        assert saved.json()["namespace"] == "trusted" and saved.json()["size"] == len(first)
        second = os.urandom(1000)
        assert (await _save(orch, token, job_id, "pip-abd", second)).status_code == 201

        hit = await _restore(orch, token, job_id, "pip-abc")
        assert hit.status_code == 200 and hit.content == first
        assert unquote(hit.headers["x-kici-cache-key"]) == "pip-abc"
        assert hit.headers["x-kici-sha256"] == hashlib.sha256(first).hexdigest()
        # a miss on the key, then the restore keys in order: the newest entry with the first matching prefix
        by_prefix = await _restore(orch, token, job_id, "pip-zzz", "none-", "pip-")
        assert by_prefix.status_code == 200 and by_prefix.content == second
        assert unquote(by_prefix.headers["x-kici-cache-key"]) == "pip-abd"
        assert (await _restore(orch, token, job_id, "npm-1", "npm-")).status_code == 204

        # keys are immutable: a second save is told, and the first content stays
        again = await _save(orch, token, job_id, "pip-abc", b"other")
        assert again.status_code == 409 and again.json()["exists"] is True
        assert (await _restore(orch, token, job_id, "pip-abc")).content == first

        listed = (await orch.admin("GET", "/caches", params={"repo": "acme/app"})).json()
        assert [(c["key"], c["size"], c["namespace"]) for c in listed] == [
            ("pip-abc", len(first), "trusted"), ("pip-abd", len(second), "trusted")]
        assert (await orch.admin("GET", "/caches", params={"key_prefix": "pip-abd"})).json()[0]["key"] == "pip-abd"
        async with database.read() as conn:
            rows = [r for r in await audit_store.list_audit(conn) if r.action == "cache.save"]
        assert len(rows) == 2 and all(r.outcome == "allowed" for r in rows)


async def test_concurrent_savers_of_one_key(database: Database, tmp_path: Path, storage: dict[str, Any]) -> None:
    async with serve_orchestrator(database, tmp_path, **storage) as orch, _running(orch) as (job_id, token):
        contents = [os.urandom(200_000) for _ in range(3)]
        answers = await asyncio.gather(
            *(_save(orch, token, job_id, "venv-1", c, pieces=4, pause=0.02) for c in contents))
        codes = sorted(a.status_code for a in answers)
        assert codes == [201, 409, 409], [a.text for a in answers]
        winner = contents[[a.status_code for a in answers].index(201)]
        restored = await _restore(orch, token, job_id, "venv-1")
        assert restored.content == winner
        assert len((await orch.admin("GET", "/caches")).json()) == 1


async def test_untrusted_runs_never_feed_trusted_runs(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        async with _running(orch) as (job_id, token):
            assert (await _save(orch, token, job_id, "base-1", b"trusted")).status_code == 201
        async with _running(orch, sha="b" * 40, branch="fork-pr", trust="approved") as (job_id, token):
            # the untrusted run reads the trusted cache …
            assert (await _restore(orch, token, job_id, "base-1")).content == b"trusted"
            # … and writes its own namespace, even for a key the trusted namespace holds
            saved = await _save(orch, token, job_id, "base-1", b"poisoned")
            assert saved.status_code == 201 and saved.json()["namespace"] == "untrusted:refs/heads/fork-pr"
            assert (await _save(orch, token, job_id, "pr-only", b"pr")).status_code == 201
            assert (await _restore(orch, token, job_id, "base-1")).content == b"poisoned"  # its own first
        async with _running(orch, sha="c" * 40) as (job_id, token):
            assert (await _restore(orch, token, job_id, "base-1")).content == b"trusted"
            assert (await _restore(orch, token, job_id, "pr-only")).status_code == 204
            assert (await _restore(orch, token, job_id, "x", "pr-", "base-1")).content == b"trusted"


async def test_agent_token_and_key_checks(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, _running(orch) as (job_id, token):
        other = SimAgent(orch, "other-1", ["gpu"])
        await other.connect()
        foreign = await orch.agent_token(["gpu"])
        assert (await _save(orch, None, job_id, "k", b"x")).status_code == 401
        assert (await _save(orch, "kat_nope", job_id, "k", b"x")).status_code == 401
        refused = await _save(orch, foreign, job_id, "k", b"x")
        assert refused.status_code == 403, refused.text
        assert (await _restore(orch, foreign, job_id, "k")).status_code == 403
        assert (await _save(orch, token, "no-such-job", "k", b"x")).status_code == 404
        assert (await _save(orch, token, job_id, "a" * 513, b"x")).status_code == 400
        assert (await _save(orch, token, job_id, " padded", b"x")).status_code == 400
        assert (await orch.admin("GET", "/caches")).json() == []
        await other.close()


async def test_quota_and_age_eviction(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, cache_repo_max_bytes=2500) as orch, \
            _running(orch) as (job_id, token):
        for key in ("a", "b"):
            assert (await _save(orch, token, job_id, key, os.urandom(1000))).status_code == 201
        assert (await _restore(orch, token, job_id, "a")).status_code == 200  # `a` is now the most recent
        saved = await _save(orch, token, job_id, "c", os.urandom(1000))
        assert saved.status_code == 201 and saved.json()["evicted"] == ["b"]
        assert sorted(c["key"] for c in (await orch.admin("GET", "/caches")).json()) == ["a", "c"]
        blobs = orch.services.blobs
        assert len(await blobs.list(caches.BLOB_PREFIX)) == 2

        services = orch.services
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=8)
        assert await caches.evict_unused(database, services.blobs, dt.timedelta(days=7)) == 0
        assert await caches.evict_unused(database, services.blobs, dt.timedelta(days=7), now=later) == 2
        assert (await orch.admin("GET", "/caches")).json() == []
        assert await blobs.list(caches.BLOB_PREFIX) == []
        assert await caches.evict_unused(database, services.blobs, None, now=later) == 0


async def test_over_the_size_limit_nothing_is_kept(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, cache_max_bytes=1000) as orch, \
            _running(orch) as (job_id, token):
        refused = await _save(orch, token, job_id, "big", os.urandom(5000), pieces=5)
        assert refused.status_code == 413 and "KICI_CACHE_MAX_BYTES" in refused.json()["error"]
        assert (await orch.admin("GET", "/caches")).json() == []
        assert await orch.services.blobs.list(caches.BLOB_PREFIX) == []


async def test_purge_by_repo_and_prefix(database: Database, tmp_path: Path, storage: dict[str, Any]) -> None:
    async with serve_orchestrator(database, tmp_path, **storage) as orch, _running(orch) as (job_id, token):
        for key in ("pip-1", "pip-2", "npm-1"):
            assert (await _save(orch, token, job_id, key, key.encode())).status_code == 201
        purged = await orch.admin("DELETE", "/caches", params={"repo": "acme/app", "key_prefix": "pip-"})
        assert purged.status_code == 200 and purged.json()["deleted"] == 2
        assert [c["key"] for c in (await orch.admin("GET", "/caches")).json()] == ["npm-1"]
        assert len(await orch.services.blobs.list(caches.BLOB_PREFIX)) == 1
        assert (await orch.admin("DELETE", "/caches", params={"repo": "other/repo"})).json()["deleted"] == 0
        assert (await orch.admin("DELETE", "/caches")).status_code == 422  # repo is required
        assert (await orch.admin("DELETE", "/caches", params={"repo": "acme/app"})).json()["deleted"] == 1
        assert await orch.services.blobs.list(caches.BLOB_PREFIX) == []
        async with database.read() as conn:
            rows = [r for r in await audit_store.list_audit(conn) if r.action == "cache.purge"]
        assert len(rows) == 3 and rows[0].target.startswith("caches:repo:")


async def test_storage_down_during_save_keeps_nothing(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, _running(orch) as (job_id, token):
        # an S3 store nobody listens for: every request fails to connect
        dead = S3BlobStore(bucket="b", endpoint="http://127.0.0.1:9", region="us-east-1", force_path_style=True)
        orch.services.blobs = dead
        try:
            refused = await _save(orch, token, job_id, "k", b"content")
            assert refused.status_code == 503 and "cache storage unavailable" in refused.json()["error"]
            assert (await _restore(orch, token, job_id, "k")).status_code == 204  # no row: a miss, not a 503
        finally:
            await dead.close()
        assert (await orch.admin("GET", "/caches")).json() == []


async def test_the_retention_sweep_evicts_unused_caches(database: Database, tmp_path: Path) -> None:
    from kici.orchestrator.db.schema import caches as caches_table

    async with serve_orchestrator(database, tmp_path, cache_max_age="2d") as orch, _running(orch) as (job_id, token):
        for key in ("old", "fresh"):
            assert (await _save(orch, token, job_id, key, key.encode())).status_code == 201
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        async with database.transaction() as conn:
            await conn.execute(caches_table.update().where(caches_table.c.key == "old").values(last_used_at=long_ago))
        sweeper = orch.services.sweeper
        await sweeper.retention()  # the first pass after start-up only arms the sweep
        await sweeper.retention()
        assert [c["key"] for c in (await orch.admin("GET", "/caches")).json()] == ["fresh"]
        assert len(await orch.services.blobs.list(caches.BLOB_PREFIX)) == 1
