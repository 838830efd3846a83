"""Job artifacts end to end with real processes: a real agent uploads what the job's globs match (and what a
step asked for) through the orchestrator, into the filesystem blob store or a real S3 server (SeaweedFS);
`kici-admin runs artifacts` lists them and downloads them byte-identical. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3server import S3Server

from .conftest import WORKFLOW_HEADER, System

WHEEL = bytes(range(256)) * 5000 + b"end-of-wheel"  # ~1.2 MiB, binary

BUILD = WORKFLOW_HEADER + '''

@step
def build_it(ctx: Context) -> None:
    ws = ctx.workspace
    (ws / "dist").mkdir()
    (ws / "dist" / "x-1.0-py3-none-any.whl").write_bytes(bytes(range(256)) * 5000 + b"end-of-wheel")
    (ws / "dist" / "notes.txt").write_text("not an artifact")
    (ws / "reports" / "sub").mkdir(parents=True)
    (ws / "reports" / "a.xml").write_text("<testsuite name='a'/>")
    (ws / "reports" / "sub" / "b.xml").write_text("<testsuite name='b'/>")
    (ws / "extra.log").write_text("kept on request")
    ctx.log.info("kept " + ctx.upload_artifact("extra.log"))


build = job("build", steps=[build_it], artifacts=["dist/*.whl", "reports/**"])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[build])
'''

EXPECTED = {
    "dist/x-1.0-py3-none-any.whl": WHEEL,
    "reports/a.xml": b"<testsuite name='a'/>",
    "reports/sub/b.xml": b"<testsuite name='b'/>",
    "extra.log": b"kept on request",
}


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


def test_artifacts_round_trip_with_a_real_agent(system: System, storage: Storage, tmp_path: Path) -> None:
    system.start_orchestrator(**storage.env)
    system.register_source()
    system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": BUILD}, "build with artifacts")
    run = system.wait_run(sha, "success", "failed")
    assert run["status"] == "success", system.log_lines(run["id"], "build")

    listed = system.admin("GET", f"/runs/{run['id']}/artifacts").json()
    assert {a["path"]: a["size"] for a in listed} == {p: len(c) for p, c in EXPECTED.items()}
    assert all(a["job"] == "build" for a in listed)
    assert {a["path"]: a["sha256"] for a in listed} == {p: hashlib.sha256(c).hexdigest() for p, c in EXPECTED.items()}
    assert {a["path"]: a["content_type"] for a in listed}["reports/a.xml"] in ("application/xml", "text/xml")

    shown = system.kici_admin("runs", "artifacts", run["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    assert sorted(a["path"] for a in json.loads(shown.stdout)) == sorted(EXPECTED)

    target = tmp_path / "downloaded"
    fetched = system.kici_admin("runs", "artifacts", run["id"], "--download", str(target))
    assert fetched.returncode == 0, fetched.stderr
    for path, content in EXPECTED.items():
        assert (target / "build" / path).read_bytes() == content, path
    assert not (target / "build" / "dist" / "notes.txt").exists()
    unknown = system.kici_admin("runs", "artifacts", "no-such-run")
    assert unknown.returncode == 1 and "no run with id 'no-such-run'" in unknown.stderr
    log = system.log_lines(run["id"], "build")
    assert any("[artifacts] uploaded dist/x-1.0-py3-none-any.whl" in line for line in log), log

    if storage.s3 is not None:  # the bytes are in the bucket, under the prefix
        client = storage.s3.client()
        listing = client.list_objects_v2(Bucket=storage.s3.bucket, Prefix=f"{storage.prefix}/artifacts/{run['id']}/")
        assert len(listing.get("Contents", [])) == len(EXPECTED)
        client.close()
    else:
        blobs = (system.tmp / "data" / "blobs" / "objects" / "artifacts" / run["id"]).rglob("*")
        assert len([b for b in blobs if b.is_file()]) == len(EXPECTED)


WHEN = WORKFLOW_HEADER + '''

MAKE = "mkdir -p out && echo {name} > out/{name}.txt"

keep = job("keep", steps=[step("s", MAKE.format(name="keep") + " && exit 1")],
           artifacts=["out/*"], artifacts_when="on_failure")
drop = job("drop", steps=[step("s", MAKE.format(name="drop") + " && exit 1")], artifacts=["out/*"])
ok_only_on_failure = job("ok", steps=[step("s", MAKE.format(name="ok"))], artifacts=["out/*"],
                         artifacts_when="on_failure")
always = job("always", steps=[step("s", MAKE.format(name="always"))], artifacts=["out/*"], artifacts_when="always")
missing = job("missing", steps=[step("s", "true")], artifacts=["nothing/*.whl"])
escape = job("escape", steps=[step("s", "mkdir -p out && ln -s /etc/hostname out/host")], artifacts=["out/*"])


@step
def ask_outside(ctx: Context) -> None:
    ctx.upload_artifact("/etc/hostname")


outside = job("outside", steps=[ask_outside])
oversize = job("oversize", steps=[step("s", "mkdir -p out && head -c 200000 /dev/zero > out/big.bin")],
               artifacts=["out/*"])

ci = workflow("ci", on=[push(branches=["main"])],
              jobs=[keep, drop, ok_only_on_failure, always, missing, escape, outside, oversize])
'''


def test_artifacts_on_failure_only_when_asked(system: System) -> None:
    system.start_orchestrator(KICI_ARTIFACT_MAX_BYTES="100000")
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="3")
    sha = system.commit({".kici/workflows/ci.py": WHEN}, "artifacts when")
    run = system.wait_run(sha, "failed", "success", within=90)
    jobs = system.jobs(run["id"])
    assert {n: j["status"] for n, j in jobs.items()} == {
        "keep": "failed", "drop": "failed", "ok": "success", "always": "success", "missing": "failed",
        "escape": "failed", "outside": "failed", "oversize": "failed"}
    listed = system.admin("GET", f"/runs/{run['id']}/artifacts").json()
    assert sorted((a["job"], a["path"]) for a in listed) == [("always", "out/always.txt"), ("keep", "out/keep.txt")]
    # a glob matching nothing and a symlink leaving the workspace fail the job, clearly
    assert "'nothing/*.whl' matched no file" in (jobs["missing"]["error"] or "")
    assert "symlink leaving the workspace" in (jobs["escape"]["error"] or "")
    assert any("matched no file" in line for line in system.log_lines(run["id"], "missing"))
    assert "upload_artifact: '/etc/hostname' is outside the workspace" in (jobs["outside"]["error"] or "")
    assert "HTTP 413" in (jobs["oversize"]["error"] or "") and "KICI_ARTIFACT_MAX_BYTES" in jobs["oversize"]["error"]
    assert all(j["failure_category"] == "artifacts" for n, j in jobs.items() if n in ("missing", "escape", "oversize"))


def test_storage_gone_fails_the_job_clearly(system: System, s3_server: S3Server) -> None:
    """The bucket disappears after start-up: the upload is refused (503, retried), the job fails with the
    reason and category `artifacts`, and the agent carries on (the next job runs)."""
    bucket = f"doomed-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    system.start_orchestrator(**{**s3_server.orchestrator_env(), "KICI_STORAGE_BUCKET": bucket})
    system.register_source()
    system.start_agent("a1")
    client.delete_bucket(Bucket=bucket)
    client.close()
    sha = system.commit({".kici/workflows/ci.py": BUILD}, "build with artifacts")
    run = system.wait_run(sha, "failed", "success", within=90)
    build = system.jobs(run["id"])["build"]
    assert build["status"] == "failed" and build["failure_category"] == "artifacts", build
    assert "HTTP 503" in build["error"] and "artifact storage unavailable" in build["error"], build["error"]
    assert system.admin("GET", f"/runs/{run['id']}/artifacts").json() == []
    again = system.commit({"README.md": "next\n"}, "next")
    assert system.wait_run(again, "failed", "success", within=90)["status"] == "failed"  # ran, same reason
