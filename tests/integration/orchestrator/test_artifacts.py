"""The agents' artifact upload route and the admin artifact routes, over real HTTP, on SQLite and PostgreSQL:
who may upload (the token of the agent holding the job, while it runs), what is refused (path traversal,
oversize, a foreign token, a finished job) and that nothing of a refused upload is kept.

The full path with a real agent and both storage backends is tests/e2e/test_artifacts.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from kici.orchestrator import artifacts
from kici.orchestrator.db.database import Database
from kici.orchestrator.storage.blobs_s3 import S3BlobStore
from kici.orchestrator.store import audit as audit_store
from tests.s3server import free_ports

from .dispatch_harness import Orchestrator, SimAgent, exact, serve_orchestrator, workflow

pytestmark = pytest.mark.timeout(60)


async def _put(orch: Orchestrator, token: str | None, job_id: str, path: str, body: bytes,
               headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    async with httpx.AsyncClient(base_url=orch.base_url, timeout=10) as client:
        return await client.put(f"/api/v1/agent/jobs/{job_id}/artifacts/{path}", content=body, headers=sent)


async def _running_job(orch: Orchestrator) -> tuple[SimAgent, dict[str, Any], str]:
    agent = SimAgent(orch, "builder-1", ["linux"])
    await agent.connect()
    created = await orch.create_run(workflow([{"name": "build", "runs_on": exact("linux")}]))
    [dispatch] = await agent.wait_for("job.dispatch")
    await agent.status(dispatch, "running")
    await orch.wait_job(created.run_id, "build", "running")
    return agent, dispatch, await orch.agent_token(["linux"])


async def _blob_count(orch: Orchestrator, run_id: str) -> int:
    return len(await orch.services.blobs.list(artifacts.run_prefix(run_id)))


async def test_upload_list_download_and_replace(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, dispatch, token = await _running_job(orch)
        run_id, job_id = dispatch["run_id"], dispatch["job_id"]
        wheel = os.urandom(300_000)
        response = await _put(orch, token, job_id, "dist/x-1.0.whl", wheel,
                              {"Content-Type": "application/zip"})
        assert response.status_code == 201, response.text
        uploaded = response.json()
        assert uploaded["size"] == len(wheel) and uploaded["sha256"] == hashlib.sha256(wheel).hexdigest()
        assert (await _put(orch, token, job_id, "reports/a%20b.xml", b"<x/>")).status_code == 201

        listed = (await orch.admin("GET", f"/runs/{run_id}/artifacts")).json()
        assert [(a["path"], a["size"], a["job"]) for a in listed] == [
            ("dist/x-1.0.whl", len(wheel), "build"), ("reports/a b.xml", 4, "build")]
        assert listed[0]["content_type"] == "application/zip"
        assert listed[1]["content_type"] == "application/octet-stream"
        got = await orch.admin("GET", f"/runs/{run_id}/artifacts/{uploaded['id']}")
        assert got.status_code == 200 and got.content == wheel
        assert got.headers["x-kici-sha256"] == uploaded["sha256"]
        assert "x-1.0.whl" in got.headers["content-disposition"]

        # the same path again replaces the artifact (and its blob)
        again = await _put(orch, token, job_id, "dist/x-1.0.whl", b"second")
        assert again.status_code == 201
        listed = (await orch.admin("GET", f"/runs/{run_id}/artifacts")).json()
        assert {a["path"]: a["size"] for a in listed} == {"dist/x-1.0.whl": 6, "reports/a b.xml": 4}
        assert await _blob_count(orch, run_id) == 2
        assert (await orch.admin("GET", f"/runs/{run_id}/artifacts/{uploaded['id']}")).status_code == 404

        async with database.read() as conn:
            rows = [r for r in await audit_store.list_audit(conn) if r.action == "artifact.upload"]
        assert len(rows) == 3 and all(r.outcome == "allowed" and r.actor == "agent:builder-1" for r in rows)

        # deleting the run's data (as whatever deletes a run must) removes its artifacts' rows and blobs
        await orch.services.delete_run_data(run_id)
        assert (await orch.admin("GET", f"/runs/{run_id}/artifacts")).json() == []
        assert await _blob_count(orch, run_id) == 0
        await agent.close()


@pytest.mark.parametrize("path", ["%2E%2E/%2E%2E/etc/passwd", "dist/%2E%2E/%2E%2E/x", "/etc/passwd", "a//b",
                                  "dist/%2E/x", "a%5Cb"])
async def test_path_traversal_refused(database: Database, tmp_path: Path, path: str) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, dispatch, token = await _running_job(orch)
        response = await _put(orch, token, dispatch["job_id"], path, b"evil")
        assert response.status_code == 400, response.text
        assert "artifact path" in response.json()["error"]
        assert (await orch.admin("GET", f"/runs/{dispatch['run_id']}/artifacts")).json() == []
        assert await _blob_count(orch, dispatch["run_id"]) == 0
        await agent.close()


async def test_tokens_and_job_state(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, dispatch, token = await _running_job(orch)
        run_id, job_id = dispatch["run_id"], dispatch["job_id"]
        other = SimAgent(orch, "other-1", ["gpu"])
        await other.connect()
        foreign = await orch.agent_token(["gpu"])

        assert (await _put(orch, None, job_id, "a.txt", b"x")).status_code == 401
        assert (await _put(orch, "kat_not-a-token", job_id, "a.txt", b"x")).status_code == 401
        refused = await _put(orch, foreign, job_id, "a.txt", b"x")
        assert refused.status_code == 403 and "not running on an agent of this agent token" in refused.json()["error"]
        async with database.read() as conn:
            denied = [r for r in await audit_store.list_audit(conn, outcome="denied") if r.action == "artifact.upload"]
        assert len(denied) == 1 and denied[0].target == f"job:{job_id}"
        assert (await _put(orch, token, "no-such-job", "a.txt", b"x")).status_code == 404

        await agent.status(dispatch, "success")
        await orch.wait_run(run_id, "success")
        late = await _put(orch, token, job_id, "a.txt", b"x")
        assert late.status_code == 409 and "success" in late.json()["error"]
        assert (await orch.admin("GET", f"/runs/{run_id}/artifacts")).json() == []
        assert await _blob_count(orch, run_id) == 0
        await agent.close()
        await other.close()


async def test_size_limits(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, artifact_max_bytes=1000, artifact_job_max_bytes=1500) as orch:
        agent, dispatch, token = await _running_job(orch)
        run_id, job_id = dispatch["run_id"], dispatch["job_id"]
        over = await _put(orch, token, job_id, "big.bin", os.urandom(1001))
        assert over.status_code == 413 and "KICI_ARTIFACT_MAX_BYTES" in over.json()["error"]

        async def chunked() -> Any:  # no Content-Length: the limit is enforced while streaming
            for _ in range(11):
                yield b"x" * 100

        async with httpx.AsyncClient(base_url=orch.base_url, timeout=10) as client:
            streamed = await client.put(f"/api/v1/agent/jobs/{job_id}/artifacts/streamed.bin", content=chunked(),
                                        headers={"Authorization": f"Bearer {token}"})
        assert streamed.status_code == 413, streamed.text
        assert (await _put(orch, token, job_id, "one.bin", b"1" * 1000)).status_code == 201
        total = await _put(orch, token, job_id, "two.bin", b"2" * 600)
        assert total.status_code == 413 and "1000 already uploaded" in total.json()["error"]
        assert (await _put(orch, token, job_id, "two.bin", b"2" * 500)).status_code == 201
        listed = (await orch.admin("GET", f"/runs/{run_id}/artifacts")).json()
        assert {a["path"]: a["size"] for a in listed} == {"one.bin": 1000, "two.bin": 500}
        assert await _blob_count(orch, run_id) == 2  # nothing of the refused uploads was kept

        # concurrent uploads cannot pass the job's limit together (nor leave two rows for one path)
        await orch.services.delete_run_data(run_id)
        answers = await asyncio.gather(*(_put(orch, token, job_id, f"c{n}.bin", b"c" * 900) for n in range(4)),
                                       *(_put(orch, token, job_id, "same.bin", b"s" * 10) for _ in range(3)))
        assert sorted(r.status_code for r in answers[:4]) == [201, 413, 413, 413], [r.text for r in answers]
        assert all(r.status_code in (201, 409) for r in answers[4:]), [r.text for r in answers[4:]]
        listed = (await orch.admin("GET", f"/runs/{run_id}/artifacts")).json()
        assert sorted(a["path"] for a in listed)[-1] == "same.bin" and len(listed) == 2
        assert sum(a["size"] for a in listed) == 910
        assert await _blob_count(orch, run_id) == 2
        await agent.close()


async def test_unknown_run_and_artifact(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        missing_run = await orch.admin("GET", "/runs/no-such-run/artifacts")
        assert missing_run.status_code == 404 and "no run" in missing_run.json()["error"]
        created = await orch.create_run(workflow([{"name": "build", "runs_on": exact("linux")}]))
        missing = await orch.admin("GET", f"/runs/{created.run_id}/artifacts/nope")
        assert missing.status_code == 404 and "no artifact" in missing.json()["error"]


async def test_storage_down_answers_503_and_keeps_nothing(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, dispatch, token = await _running_job(orch)
        run_id, job_id = dispatch["run_id"], dispatch["job_id"]
        assert (await _put(orch, token, job_id, "kept.txt", b"kept")).status_code == 201
        working = orch.services.blobs
        # the store goes away: an S3 endpoint nothing listens on
        orch.services.blobs = S3BlobStore(bucket="gone", endpoint=f"http://127.0.0.1:{free_ports(1)[0]}",
                                          force_path_style=True, region="us-east-1")
        try:
            down = await _put(orch, token, job_id, "lost.txt", b"x" * 1000)
            assert down.status_code == 503 and "artifact storage unavailable" in down.json()["error"]
            listed = await orch.admin("GET", f"/runs/{run_id}/artifacts")
            [kept] = listed.json()
            assert kept["path"] == "kept.txt"
            unavailable = await orch.admin("GET", f"/runs/{run_id}/artifacts/{kept['id']}")
            assert unavailable.status_code == 503 and "artifact storage unavailable" in unavailable.json()["error"]
        finally:
            await orch.services.blobs.close()
            orch.services.blobs = working
        assert await _blob_count(orch, run_id) == 1
        await agent.close()


async def test_a_handed_out_job_is_served_before_its_running_status_arrives(database: Database,
                                                                            tmp_path: Path) -> None:
    """A step's request over HTTP can overtake the agent's `running` on the WebSocket: a job handed out to
    the token's agent is served while still `queued`; a queued job nobody holds is not."""
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "builder-1", ["linux"])
        await agent.connect()
        token = await orch.agent_token(["linux"])
        later = {"name": "later", "runs_on": exact("linux"), "needs": [{"name": "build"}]}
        created = await orch.create_run(workflow([{"name": "build", "runs_on": exact("linux")}, later]))
        [dispatch] = await agent.wait_for("job.dispatch")
        assert (await orch.jobs(created.run_id))["build"].status == "queued"  # no `running` sent
        response = await _put(orch, token, dispatch["job_id"], "early.txt", b"early")
        assert response.status_code == 201, response.text
        waiting = (await orch.jobs(created.run_id))["later"]
        refused = await _put(orch, token, waiting.id, "a.txt", b"x")
        assert refused.status_code in (403, 409), refused.text  # not handed to any agent
        await agent.close()
