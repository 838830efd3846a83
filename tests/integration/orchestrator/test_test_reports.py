"""The agents' test report route and the admin test routes, over real HTTP, on SQLite and PostgreSQL: who
may send (the token of the agent holding the job, while it runs), what is refused or not read (traversal,
oversize, too many files, hostile XML) and that a file sent again replaces its results.

The full path with a real agent running pytest and both storage backends is tests/e2e/test_test_reports.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from kici.orchestrator import test_reports
from kici.orchestrator.db.database import Database
from kici.orchestrator.store import audit as audit_store

from .dispatch_harness import Orchestrator, SimAgent, exact, serve_orchestrator, workflow

pytestmark = pytest.mark.timeout(60)

REPORT = b"""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="t" name="test_a" time="0.25"/>
<testcase classname="t" name="test_b" time="0.5"><failure message="nope">trace</failure></testcase>
</testsuite></testsuites>"""

LAUGHS = b"""<?xml version="1.0"?><!DOCTYPE t [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>
<testsuite><testcase name="&b;"/></testsuite>"""


async def _put(orch: Orchestrator, token: str | None, job_id: str, path: str, body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=orch.base_url, timeout=10) as client:
        return await client.put(f"/api/v1/agent/jobs/{job_id}/test-reports/{path}", content=body, headers=headers)


async def _running_job(orch: Orchestrator) -> tuple[SimAgent, dict[str, Any], str]:
    agent = SimAgent(orch, "tester-1", ["linux"])
    await agent.connect()
    created = await orch.create_run(workflow([{"name": "test", "runs_on": exact("linux")}]))
    [dispatch] = await agent.wait_for("job.dispatch")
    await agent.status(dispatch, "running")
    await orch.wait_job(created.run_id, "test", "running")
    return agent, dispatch, await orch.agent_token(["linux"])


async def _blobs(orch: Orchestrator, run_id: str) -> int:
    return len(await orch.services.blobs.list(test_reports.run_prefix(run_id)))


async def test_send_read_replace_and_delete(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, dispatch, token = await _running_job(orch)
        run_id, job_id = dispatch["run_id"], dispatch["job_id"]
        sent = await _put(orch, token, job_id, "reports/junit.xml", REPORT)
        assert sent.status_code == 201, sent.text
        assert {k: sent.json()[k] for k in ("passed", "failed", "total", "error")} == {
            "passed": 1, "failed": 1, "total": 2, "error": None}
        hostile = await _put(orch, token, job_id, "reports/laughs.xml", LAUGHS)
        assert hostile.status_code == 201 and hostile.json()["error"].startswith("refused: the document has a DTD")
        broken = await _put(orch, token, job_id, "reports/broken.xml", b"<testsuite><testcase>")
        assert broken.status_code == 201 and broken.json()["error"].startswith("not well-formed XML")

        found = (await orch.admin("GET", f"/runs/{run_id}/tests")).json()
        assert {k: found["summary"][k] for k in ("passed", "failed", "total", "duration_ms", "files", "unread_files")} \
            == {"passed": 1, "failed": 1, "total": 2, "duration_ms": 750, "files": 3, "unread_files": 2}
        assert [(t["name"], t["status"], t["message"]) for t in found["tests"]] == [
            ("test_a", "passed", None), ("test_b", "failed", "nope")]
        assert await _blobs(orch, run_id) == 3  # each file is kept as sent, read or not

        # sent again (an agent's retry): the file's results are replaced, not added
        again = await _put(orch, token, job_id, "reports/junit.xml",
                           b'<testsuite><testcase name="only"/></testsuite>')
        assert again.status_code == 201
        found = (await orch.admin("GET", f"/runs/{run_id}/tests")).json()
        assert [t["name"] for t in found["tests"]] == ["only"] and found["summary"]["files"] == 3
        assert await _blobs(orch, run_id) == 3
        [report_file] = [f for f in found["jobs"][0]["files"] if f["path"] == "reports/junit.xml"]
        raw = await orch.admin("GET", f"/runs/{run_id}/tests/files/{report_file['id']}")
        assert raw.status_code == 200 and raw.content == b'<testsuite><testcase name="only"/></testsuite>'

        async with database.read() as conn:
            rows = [r for r in await audit_store.list_audit(conn) if r.action == "test_report.upload"]
        assert len(rows) == 4 and all(r.outcome == "allowed" and r.actor == "agent:tester-1" for r in rows)

        await orch.services.delete_run_data(run_id)
        found = (await orch.admin("GET", f"/runs/{run_id}/tests")).json()
        assert found["tests"] == [] and found["jobs"] == [] and found["summary"]["files"] == 0
        assert await _blobs(orch, run_id) == 0
        await agent.close()


@pytest.mark.parametrize("path", ["%2E%2E/%2E%2E/etc/passwd", "/etc/passwd", "a//b", "a%5Cb"])
async def test_path_traversal_refused(database: Database, tmp_path: Path, path: str) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, dispatch, token = await _running_job(orch)
        response = await _put(orch, token, dispatch["job_id"], path, REPORT)
        assert response.status_code == 400 and "test report path" in response.json()["error"], response.text
        assert await _blobs(orch, dispatch["run_id"]) == 0
        await agent.close()


async def test_tokens_and_job_state(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent, dispatch, token = await _running_job(orch)
        run_id, job_id = dispatch["run_id"], dispatch["job_id"]
        other = SimAgent(orch, "other-1", ["gpu"])
        await other.connect()
        foreign = await orch.agent_token(["gpu"])
        assert (await _put(orch, None, job_id, "r.xml", REPORT)).status_code == 401
        refused = await _put(orch, foreign, job_id, "r.xml", REPORT)
        assert refused.status_code == 403 and "not running on an agent of this agent token" in refused.json()["error"]
        assert (await _put(orch, token, "no-such-job", "r.xml", REPORT)).status_code == 404
        await agent.status(dispatch, "failed")
        await orch.wait_run(run_id, "failed")
        late = await _put(orch, token, job_id, "r.xml", REPORT)
        assert late.status_code == 409 and "failed" in late.json()["error"]
        assert (await orch.admin("GET", f"/runs/{run_id}/tests")).json()["jobs"] == []
        assert await _blobs(orch, run_id) == 0
        await agent.close()
        await other.close()


async def test_size_and_count_limits(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, test_report_max_bytes=1000, test_report_max_files=3) as orch:
        agent, dispatch, token = await _running_job(orch)
        run_id, job_id = dispatch["run_id"], dispatch["job_id"]
        over = await _put(orch, token, job_id, "big.xml", b" " * 1001)
        assert over.status_code == 413 and "KICI_TEST_REPORT_MAX_BYTES" in over.json()["error"], over.text

        async def chunked() -> Any:  # no Content-Length: the limit holds while the body streams
            for _ in range(11):
                yield b" " * 100

        streamed = await _put(orch, token, job_id, "streamed.xml", chunked())
        assert streamed.status_code == 413, streamed.text
        files = {f["path"]: f for f in (await orch.admin("GET", f"/runs/{run_id}/tests")).json()["jobs"][0]["files"]}
        assert "the file is 1001 bytes" in files["big.xml"]["error"] and files["big.xml"]["sha256"] is None
        assert "over the 1000-byte limit" in files["streamed.xml"]["error"]
        assert await _blobs(orch, run_id) == 0  # nothing of a refused file is kept

        assert (await _put(orch, token, job_id, "ok.xml", REPORT[:1000])).status_code == 201
        fourth = await _put(orch, token, job_id, "fourth.xml", REPORT[:900])
        assert fourth.status_code == 409 and "KICI_TEST_REPORT_MAX_FILES" in fourth.json()["error"]
        assert (await _put(orch, token, job_id, "ok.xml", REPORT[:900])).status_code == 201  # a replacement is fine
        await agent.close()


async def test_unknown_run_job_and_file(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        missing_run = await orch.admin("GET", "/runs/no-such-run/tests")
        assert missing_run.status_code == 404 and "no run" in missing_run.json()["error"]
        created = await orch.create_run(workflow([{"name": "build", "runs_on": exact("linux")}]))
        empty = (await orch.admin("GET", f"/runs/{created.run_id}/tests")).json()
        assert empty["jobs"] == [] and empty["tests"] == [] and empty["summary"]["total"] == 0
        missing_job = await orch.admin("GET", f"/runs/{created.run_id}/tests", params={"job": "nope"})
        assert missing_job.status_code == 404 and "has no job 'nope'" in missing_job.json()["error"]
        missing = await orch.admin("GET", f"/runs/{created.run_id}/tests/files/nope")
        assert missing.status_code == 404 and "no test report file" in missing.json()["error"]
