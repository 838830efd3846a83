"""Test reports end to end with real processes: a real agent runs pytest with `--junitxml` in a job that fails
(a failing test run is when reports matter), sends the report through the orchestrator into the filesystem
blob store or a real S3 server (SeaweedFS), and the per-test results come back through the admin API and
`kici-admin runs tests`. Broken, oversize and missing reports are said, never fatal. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from dataclasses import dataclass

import pytest

from tests.s3server import S3Server

from .conftest import WORKFLOW_HEADER, System

SAMPLE_TESTS = '''\
import pytest


def test_ok():
    assert 1 + 1 == 2


def test_fails():
    assert 1 == 2, "one is not two"


@pytest.mark.skip(reason="not today")
def test_skipped():
    pass


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_errors(broken):
    pass


@pytest.mark.parametrize("n", [1, 2, 3])
def test_many(n):
    assert n > 0
'''

PYTEST = f"{sys.executable} -m pytest -q -p no:cacheprovider tests --junitxml=reports/junit.xml"

WORKFLOW = WORKFLOW_HEADER + f'''

test = job("test", steps=[step("pytest", {PYTEST!r})], test_reports=["reports/*.xml", "missing/*.xml"])

MAKE = (
    "mkdir -p out && printf '<testsuite><testcase name=\\"a\\">' > out/broken.xml"
    " && printf '<testsuite name=\\"s\\"><testcase name=\\"ok\\" classname=\\"c\\" time=\\"0.5\\"/></testsuite>'"
    " > out/good.xml && head -c 30000 /dev/zero | tr '\\\\0' ' ' > out/big.xml"
)
odd = job("odd", steps=[step("make", MAKE)], test_reports=["out/*.xml"])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[test, odd])
'''


@dataclass
class Storage:
    env: dict[str, str]
    s3: S3Server | None = None
    prefix: str = ""


@pytest.fixture(params=["fs", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    if request.param == "fs":
        return Storage({})
    server: S3Server = request.getfixturevalue("s3_server")
    prefix = f"e2e-{uuid.uuid4().hex[:10]}"
    return Storage(server.orchestrator_env(prefix=prefix), server, prefix)


def test_pytest_reports_round_trip_with_a_real_agent(system: System, storage: Storage) -> None:
    system.start_orchestrator(KICI_TEST_REPORT_MAX_BYTES="20000", **storage.env)
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="2")
    sha = system.commit({".kici/workflows/ci.py": WORKFLOW, "tests/test_sample.py": SAMPLE_TESTS}, "tests")
    run = system.wait_run(sha, "failed", "success", within=90)
    jobs = system.jobs(run["id"])
    # pytest failed the job; the report was still sent. A report problem never fails a job.
    assert (jobs["test"]["status"], jobs["odd"]["status"]) == ("failed", "success"), system.diagnostics()

    found = system.admin("GET", f"/runs/{run['id']}/tests").json()
    summary = found["summary"]
    assert {k: summary[k] for k in ("passed", "failed", "errors", "skipped", "total", "files", "unread_files")} == {
        "passed": 5, "failed": 1, "errors": 1, "skipped": 1, "total": 8, "files": 4, "unread_files": 2}
    by_job = {j["job"]: j for j in found["jobs"]}
    assert by_job["test"]["summary"]["total"] == 7 and [f["path"] for f in by_job["test"]["files"]] == [
        "reports/junit.xml"]
    odd_files = {f["path"]: f for f in by_job["odd"]["files"]}
    assert odd_files["out/good.xml"]["error"] is None and odd_files["out/good.xml"]["passed"] == 1
    assert odd_files["out/broken.xml"]["error"].startswith("not well-formed XML")
    assert "KICI_TEST_REPORT_MAX_BYTES" in odd_files["out/big.xml"]["error"]
    assert odd_files["out/big.xml"]["sha256"] is None
    tests = {t["name"]: t for t in found["tests"]}
    assert tests["test_fails"]["status"] == "failed" and "one is not two" in tests["test_fails"]["message"]
    assert tests["test_fails"]["classname"] == "tests.test_sample" and "assert 1 == 2" in tests["test_fails"]["details"]
    assert tests["test_errors"]["status"] == "error" and "fixture broke" in tests["test_errors"]["message"]
    assert tests["test_skipped"]["status"] == "skipped" and tests["test_skipped"]["message"] == "not today"
    assert tests["test_many[2]"]["status"] == "passed" and tests["ok"]["duration_ms"] == 500

    failing = system.admin("GET", f"/runs/{run['id']}/tests", params={"status": "failing"}).json()
    assert sorted(t["name"] for t in failing["tests"]) == ["test_errors", "test_fails"] and failing["total"] == 2
    only_odd = system.admin("GET", f"/runs/{run['id']}/tests", params={"job": "odd"}).json()
    assert [t["name"] for t in only_odd["tests"]] == ["ok"] and [j["job"] for j in only_odd["jobs"]] == ["odd"]
    bad = system.admin("GET", f"/runs/{run['id']}/tests", params={"status": "flaky"})
    assert bad.status_code == 422 and "unknown test status 'flaky'" in bad.json()["error"]
    assert system.admin("GET", f"/runs/{run['id']}/tests", params={"job": "nope"}).status_code == 404
    detail = system.admin("GET", f"/runs/{run['id']}").json()
    assert {j["name"]: (j["tests"] or {}).get("failed") for j in detail["jobs"]} == {"test": 1, "odd": 0}

    # the file as the job wrote it
    report_file = by_job["test"]["files"][0]
    raw = system.admin("GET", f"/runs/{run['id']}/tests/files/{report_file['id']}")
    assert raw.status_code == 200 and b"<testsuites" in raw.content
    assert hashlib.sha256(raw.content).hexdigest() == report_file["sha256"] == raw.headers["x-kici-sha256"]

    shown = system.kici_admin("runs", "tests", run["id"], "--failed")
    assert shown.returncode == 0, shown.stderr
    assert "test_sample::test_fails" in shown.stdout and "one is not two" in shown.stdout
    assert "test_ok" not in shown.stdout
    assert "odd: out/broken.xml not read: not well-formed XML" in shown.stdout
    assert "Tests: 5 passed, 1 failed, 1 error, 1 skipped (8 in 4 file(s)" in shown.stdout, shown.stdout
    as_json = system.kici_admin("runs", "tests", run["id"], "--json", "--job", "test")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["jobs"][0]["summary"]["total"] == 7
    show = system.kici_admin("runs", "show", run["id"])
    assert "tests: 4 passed, 1 failed, 1 error, 1 skipped" in show.stdout, show.stdout
    assert "tests: 1 passed, 2 file(s) not read" in show.stdout, show.stdout

    log = system.log_lines(run["id"], "test")
    assert any("[test reports] reports/junit.xml: 4 passed, 1 failed, 1 error, 1 skipped" in ln for ln in log), log
    assert any("[warning] test reports: 'missing/*.xml' matched no file (did the tests run?)" in ln for ln in log)
    odd_log = system.log_lines(run["id"], "odd")
    assert any("out/broken.xml was not read: not well-formed XML" in ln for ln in odd_log), odd_log
    assert any("sending 'out/big.xml' failed: HTTP 413" in ln for ln in odd_log), odd_log

    stored = 2  # junit.xml, good.xml, broken.xml are kept as sent; big.xml was refused
    if storage.s3 is not None:
        client = storage.s3.client()
        listing = client.list_objects_v2(Bucket=storage.s3.bucket,
                                         Prefix=f"{storage.prefix}/test-reports/{run['id']}/")
        assert len(listing.get("Contents", [])) == stored + 1
        client.close()
    else:
        blobs = (system.tmp / "data" / "blobs" / "objects" / "test-reports" / run["id"]).rglob("*")
        assert len([b for b in blobs if b.is_file()]) == stored + 1
