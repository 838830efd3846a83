"""Reporting on SQLite and PostgreSQL: outbox rows written with the state changes, the worker sending
them to a local fake of GitHub's API (check runs, scoped installation tokens) and to a local notification
receiver, with outages, rate limits, give-up and retry; GitHub deliveries end to end through the webhook
route (push, pull request, check_run / check_suite rerequested)."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import hashlib
import hmac
import io
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.engine.events import Event
from kici.engine.junit import parse_junit
from kici.engine.lockfile import Workflow
from kici.engine.webhook_auth import verify_hmac_sha256
from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.container import AppState, Readiness, ingest_for, services_of
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.ingest.service import Ingest
from kici.orchestrator.metrics import Metrics
from kici.orchestrator.reporting.github_checks import (
    FAILING_TESTS_SHOWN,
    MAX_OUTPUT_CHARS,
    TestsDigest,
    check_output,
    check_status,
)
from kici.orchestrator.reporting.targets import reporting_targets
from kici.orchestrator.reporting.worker import ReportWorker, backoff
from kici.orchestrator.storage.blobs_fs import FilesystemBlobStore
from kici.orchestrator.storage.logs import LogStore
from kici.orchestrator.store import audit, outbox
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store import test_reports as report_store
from kici.orchestrator.store.runs import JobRecord, NewRun, StepRecord
from kici.orchestrator.store.sources import Source, create_source
from kici.orchestrator.store.test_reports import TestResultRecord, TestSummary
from tests.integration.orchestrator.test_providers_git import compile_into
from tests.integration.orchestrator.test_providers_github import APP_ID, FakeGitHub, fake_github  # noqa: F401
from tests.paths import GITHUB_FIXTURES

REPO = "acme/app"
SHA = "a" * 40
INSTALLATION = 42
HELLO = "Codertocat/Hello-World"
WEBHOOK_SECRET = "It's a Secret to Everybody"
NOTIFY_SECRET = "notify-secret-global"
PUBLIC_URL = "https://ci.example.com"

ORDER = {"queued": 0, "in_progress": 1, "completed": 2}


def workflow(*jobs: dict[str, Any]) -> Workflow:
    return Workflow.model_validate({
        "name": "ci",
        "source": {"file": ".kici/workflows/ci.py", "export": "#ci"},
        "contentHash": "0" * 64,
        "compileSchemaVersion": 1,
        "triggers": [],
        "jobs": list(jobs) or [{"name": "build", "steps": [{"name": "s"}]}],
    })


# -- a notification receiver ------------------------------------------------------------------------


class Receiver:
    """A local HTTP server recording notifications; answers `fail_first` 500s first."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[int, dict[str, str], bytes]] = []  # (status answered, headers, body)
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.changed:
                    status = 500 if receiver.fail_first > 0 else 204
                    receiver.fail_first -= 1
                    receiver.received.append((status, {k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        with self.changed:
            return [(h, json.loads(b)) for s, h, b in self.received if s == 204]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(fail_first=2)
    try:
        yield server
    finally:
        server.close()


# -- harness ------------------------------------------------------------------------------------------


@dataclass
class Harness:
    database: Database
    settings: Settings
    state: AppState
    worker: ReportWorker
    logs: LogStore
    fake: FakeGitHub
    source: Source
    key: bytes
    workers: list[ReportWorker] = field(default_factory=list)

    async def new_run(
        self, wf: Workflow, *, source: Source | None = None, installation: int | None = INSTALLATION
    ) -> str:
        source = source or self.source
        event = Event(type="push", name="push", repo=REPO, sha=SHA, ref="refs/heads/main", branch="main",
                      payload={"installation": {"id": installation}} if installation else {})
        async with self.database.transaction() as conn:
            created = await run_store.create_run(
                conn,
                NewRun(org_id="default", workflow=wf, event=event, repo=REPO, ref="refs/heads/main", sha=SHA,
                       lock_content_hash=None, delivery_id=None, source_id=source.id,
                       reporting=reporting_targets(self.settings, source, event)),
                queue_max_depth=100, queue_timeout_ms=60_000,
            )
        return created.run_id

    async def jobs(self, run_id: str) -> dict[str, JobRecord]:
        async with self.database.read() as conn:
            return {j.name: j for j in await run_store.list_jobs(conn, run_id)}

    async def report(self, job_id: str, state: Any, **kwargs: Any) -> None:
        async with self.database.transaction() as conn:
            assert await run_store.record_job_state(conn, job_id, state=state, agent_id=None, **kwargs) is not None

    async def rows(self, **where: Any) -> list[outbox.ReportRecord]:
        async with self.database.read() as conn:
            found = await outbox.list_reports(conn, org_id="default", limit=1000)
        return sorted((r for r in found if all(getattr(r, k) == v for k, v in where.items())), key=lambda r: r.id)

    async def drain(self, timeout: float = 15.0) -> None:
        """Run the worker until nothing is pending (bounded: waits for retries that are due soon)."""
        deadline = time.monotonic() + timeout
        while True:
            await self.worker.run_once()
            if not await self.rows(status="pending"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"reports still pending after {timeout}s: {await self.rows(status='pending')}")
            await asyncio.sleep(0.02)

    def statuses(self, name: str) -> list[str]:
        """The check-run statuses GitHub was sent for `name`, in order."""
        check = self.fake.check_run_named(name)
        return [body["status"] for _m, cid, body in self.fake.check_calls if cid == check["id"]]


def _settings(tmp_path: Path, database: Database, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data", "database_url": database.url, "public_url": PUBLIC_URL,
        "report_retry_base_ms": 20, "report_retry_max_ms": 100, **extra,
    }
    return Settings(**values)


@pytest.fixture
async def harness(
    database: Database, tmp_path: Path, fake_github: FakeGitHub, request: pytest.FixtureRequest  # noqa: F811
) -> AsyncIterator[Harness]:
    extra = getattr(request, "param", {})
    key = os.urandom(32)
    settings = _settings(tmp_path, database, **extra)
    async with database.transaction() as conn:
        source = await create_source(
            conn, key=key, name="github", kind="github", config={"app_id": APP_ID, "api_url": fake_github.url},
            secrets={"webhook_secret": WEBHOOK_SECRET, "private_key": fake_github.private_key_pem},
        )
    state = AppState(settings=settings, database=database, metrics=Metrics("test"), readiness=Readiness(),
                     version="test", secret_key=key)
    logs = LogStore(database, FilesystemBlobStore(tmp_path / "blobs"))
    ingest = Ingest.from_settings(settings)
    worker = ReportWorker(state, ingest, logs)
    h = Harness(database, settings, state, worker, logs, fake_github, source, key)
    try:
        yield h
    finally:
        for w in [worker, *h.workers]:
            await w.close()
        await logs.close()


# -- pure parts ---------------------------------------------------------------------------------------


def _job(status: str, **values: Any) -> JobRecord:
    now = dt.datetime.now(dt.UTC)
    base: dict[str, Any] = {
        "id": "j", "run_id": "r", "org_id": "default", "name": "build", "job": "build", "matrix": None,
        "status": status, "agent_id": None, "attempt": 1, "needs_satisfied": True, "outputs": None, "error": None,
        "failure_category": None, "runs_on": [], "exclude_labels": [], "last_heartbeat_at": None,
        "created_at": now, "queued_at": None, "started_at": None, "finished_at": None,
    }
    return JobRecord.model_validate(base | values)


@pytest.mark.parametrize(
    ("status", "values", "expected"),
    [
        ("pending", {}, ("queued", None)),
        ("queued", {}, ("queued", None)),
        ("running", {}, ("in_progress", None)),
        ("recovering", {}, ("in_progress", None)),
        ("success", {}, ("completed", "success")),
        ("failed", {}, ("completed", "failure")),
        ("failed", {"failure_category": "timeout"}, ("completed", "timed_out")),
        ("timed_out_stale", {}, ("completed", "timed_out")),
        ("cancelled", {}, ("completed", "cancelled")),
        ("cancelled", {"error": "workflow_timeout"}, ("completed", "timed_out")),
        ("skipped", {}, ("completed", "skipped")),
        ("drift_dropped", {}, ("completed", "failure")),
        ("held", {}, ("completed", "action_required")),
    ],
)
def test_check_status_of_every_job_state(status: str, values: dict[str, Any], expected: tuple[str, str | None]) -> None:
    assert check_status(_job(status, **values)) == expected


def test_check_output_stays_within_githubs_limits() -> None:
    now = dt.datetime.now(dt.UTC)
    steps = [StepRecord(job_id="j", step_index=i, name=f"s{i}|x", status="success", started_at=now, finished_at=now,
                        duration_ms=1500, error=None, log_bytes=0) for i in range(3)]
    steps.append(StepRecord(job_id="j", step_index=3, name="test", status="failed", started_at=now, finished_at=now,
                            duration_ms=10, error="E" * 20_000, log_bytes=0))
    tail = ["x" * 5000 for _ in range(50)]
    output = check_output(_job("failed"), steps, "failure", tail)
    assert len(output["summary"]) <= MAX_OUTPUT_CHARS and len(output["text"]) <= MAX_OUTPUT_CHARS
    assert output["title"] == "Failed at step 'test'"
    assert "| 1 | s0\\|x | success | 1.5 s |" in output["summary"]
    assert "**Error in step 4 (test):**" in output["text"] and output["text"].rstrip().endswith("```")


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    assert backoff(0, 1000, 60_000, rng=lambda: 1.0) == dt.timedelta(seconds=1)
    assert backoff(3, 1000, 60_000, rng=lambda: 0.0) == dt.timedelta(seconds=4)
    assert backoff(30, 1000, 60_000, rng=lambda: 1.0) == dt.timedelta(seconds=60)


# -- outbox rows ----------------------------------------------------------------------------------------


async def test_unreported_runs_write_no_outbox_row(harness: Harness, database: Database) -> None:
    async with database.transaction() as conn:
        git = await create_source(conn, key=harness.key, name="g", kind="git", config={"url": "/nowhere"},
                                  secrets={"webhook_secret": "s"})
    run_id = await harness.new_run(workflow(), source=git)
    job = (await harness.jobs(run_id))["build"]
    await harness.report(job.id, "running")
    await harness.report(job.id, "success")
    async with database.read() as conn:
        run = await run_store.get_run(conn, run_id)
    assert run is not None and run.reporting is None and run.status == "success"
    assert await harness.rows() == []


async def test_rows_are_written_with_the_state_changes(harness: Harness) -> None:
    run_id = await harness.new_run(workflow({"name": "build", "steps": [{"name": "s"}]}))
    job = (await harness.jobs(run_id))["build"]
    assert [(r.event, r.kind, r.job_id) for r in await harness.rows()] == [("queued", "check_run", job.id)]
    await harness.report(job.id, "running")
    await harness.report(job.id, "success")
    rows = await harness.rows()
    assert [r.event for r in rows] == ["queued", "in_progress", "completed"]
    assert {r.ordering_key for r in rows} == {outbox.check_run_key(job.id)} and {r.status for r in rows} == {"pending"}
    # a late duplicate report changes nothing and owes nothing
    async with harness.database.transaction() as conn:
        assert await run_store.record_job_state(conn, job.id, state="success", agent_id=None) is None
    assert len(await harness.rows()) == 3


# -- check runs ---------------------------------------------------------------------------------------


async def test_check_runs_queued_in_progress_completed_with_conclusions(harness: Harness) -> None:
    wf = workflow(
        {"name": "build", "steps": [{"name": "compile"}]},
        {"name": "test", "steps": [{"name": "setup"}, {"name": "pytest"}]},
        {"name": "deploy", "needs": [{"name": "test"}], "steps": [{"name": "ship"}]},
    )
    run_id = await harness.new_run(wf)
    await harness.drain()
    names = ["ci / build", "ci / test", "ci / deploy"]
    for name in names:
        check = harness.fake.check_run_named(name)
        assert check["status"] == "queued" and check["head_sha"] == SHA and check["repo"] == REPO
        assert check["details_url"] == f"{PUBLIC_URL}/runs/{run_id}?job={name.split(' / ')[1]}"
    jobs = await harness.jobs(run_id)
    assert harness.fake.check_run_named("ci / build")["external_id"] == jobs["build"].id
    # every token the reporting asked for: scoped to the one repository with checks: write
    scoped = [s for s in harness.fake.token_scopes.values() if "checks" in s["permissions"]]
    assert scoped and all(s == {"repositories": ["app"], "permissions": {"checks": "write"}} for s in scoped)

    await harness.report(jobs["build"].id, "running")
    await harness.report(jobs["test"].id, "running")
    await harness.drain()
    assert harness.fake.check_run_named("ci / build")["status"] == "in_progress"

    async with harness.database.transaction() as conn:
        await run_store.record_step(conn, jobs["build"].id, 0, "compile", "success", duration_ms=1234)
        await run_store.record_step(conn, jobs["test"].id, 0, "setup", "success", duration_ms=20)
        await run_store.record_step(conn, jobs["test"].id, 1, "pytest", "failed", duration_ms=3000,
                                    error="AssertionError: 1 != 2")
    await harness.logs.append(run_id, jobs["test"].id, 1, [f"log line {i}" for i in range(1, 81)], 0)
    await harness.report(jobs["build"].id, "success")
    await harness.report(jobs["test"].id, "failed", error="step pytest failed")
    await harness.drain()

    assert [harness.statuses(n) for n in names[:2]] == [["queued", "in_progress", "completed"]] * 2
    build, test, deploy = (harness.fake.check_run_named(n) for n in names)
    assert (build["conclusion"], test["conclusion"], deploy["conclusion"]) == ("success", "failure", "skipped")
    assert "| 1 | compile | success | 1.2 s |" in build["output"]["summary"]
    assert test["output"]["title"] == "Failed at step 'pytest'"
    text = test["output"]["text"]
    assert "AssertionError: 1 != 2" in text and "log line 80" in text and "log line 31" in text
    assert "log line 30\n" not in text  # only the last 50 lines
    assert build["completed_at"].endswith("Z") and build["started_at"].endswith("Z")
    assert {r.status for r in await harness.rows()} == {"sent"}


async def test_cancelled_and_timed_out_conclusions(harness: Harness) -> None:
    wf = workflow({"name": "slow", "steps": [{"name": "s"}]}, {"name": "waiting", "steps": [{"name": "s"}]},
                  {"name": "later", "needs": [{"name": "slow"}], "steps": [{"name": "s"}]})
    run_id = await harness.new_run(wf)
    jobs = await harness.jobs(run_id)
    await harness.report(jobs["slow"].id, "running")
    async with harness.database.transaction() as conn:
        assert await run_store.mark_job_stale(conn, jobs["slow"].id, "no heartbeat for 120s")
    async with harness.database.transaction() as conn:
        await run_store.cancel_run(conn, run_id, by="test", force=False)
    await harness.drain()
    slow, waiting, later = (harness.fake.check_run_named(f"ci / {n}") for n in ("slow", "waiting", "later"))
    assert (slow["conclusion"], waiting["conclusion"], later["conclusion"]) == ("timed_out", "cancelled", "skipped")
    assert "no heartbeat for 120s" in slow["output"]["text"]


async def test_github_outage_delays_reports_and_loses_none(harness: Harness) -> None:
    harness.fake.check_failures = [(502, {})] * 6
    wf = workflow({"name": "a", "steps": [{"name": "s"}]}, {"name": "b", "steps": [{"name": "s"}]})
    run_id = await harness.new_run(wf)
    jobs = await harness.jobs(run_id)
    await harness.worker.run_once()  # both creations fail: GitHub is down
    failing = await harness.rows(status="pending")
    assert len(failing) == 2 and all(r.attempts == 1 and "HTTP 502" in (r.last_error or "") for r in failing)
    await harness.report(jobs["a"].id, "running")  # state changes go on while GitHub is away
    await harness.report(jobs["a"].id, "success")
    await harness.report(jobs["b"].id, "running")
    await harness.drain()
    assert harness.fake.check_failures == []
    a, b = harness.fake.check_run_named("ci / a"), harness.fake.check_run_named("ci / b")
    assert (a["status"], a.get("conclusion"), b["status"]) == ("completed", "success", "in_progress")
    for name in ("ci / a", "ci / b"):  # in order: never an older state after a newer one
        seen = [ORDER[s] for s in harness.statuses(name)]
        assert seen == sorted(seen)
    await harness.report(jobs["b"].id, "failed", error="boom")
    await harness.drain()
    assert harness.fake.check_run_named("ci / b")["conclusion"] == "failure"
    assert len(harness.fake.check_runs) == 2  # created once each, whatever the retries
    assert {r.status for r in await harness.rows()} == {"sent"}


async def test_rate_limit_waits_for_the_reset(harness: Harness) -> None:
    reset = int(time.time()) + 2
    harness.fake.check_failures = [(403, {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0",
                                          "x-ratelimit-reset": str(reset)})]
    await harness.new_run(workflow())
    await harness.worker.run_once()
    [row] = await harness.rows()
    assert row.status == "pending" and "rate limited" in (row.last_error or "")
    assert row.next_attempt_at >= dt.datetime.fromtimestamp(reset, dt.UTC) - dt.timedelta(milliseconds=1)
    assert await harness.worker.run_once() == 0  # not due before the reset
    await harness.drain()
    assert harness.fake.check_run_named("ci / build")["status"] == "queued"


@pytest.mark.parametrize("harness", [{"report_give_up_after_ms": 1}], indirect=True)
async def test_give_up_marks_failed_and_retry_sends_it(harness: Harness) -> None:
    harness.fake.check_failures = [(502, {})] * 2
    await harness.new_run(workflow())
    await harness.worker.run_once()
    deadline = time.monotonic() + 10
    while not await harness.rows(status="failed"):
        assert time.monotonic() < deadline, await harness.rows()
        await harness.worker.run_once()
        await asyncio.sleep(0.02)
    [row] = await harness.rows(status="failed")
    assert row.attempts == 2 and "HTTP 502" in (row.last_error or "")
    assert await harness.worker.run_once() == 0 and harness.fake.check_runs == {}
    async with harness.database.transaction() as conn:
        assert await outbox.retry_report(conn, row.id)
        assert not await outbox.retry_report(conn, row.id)  # only a failed row can be retried
    await harness.drain()
    assert harness.fake.check_run_named("ci / build")["status"] == "queued"


async def test_sent_reports_are_pruned_after_the_retention(harness: Harness) -> None:
    await harness.new_run(workflow())
    await harness.new_run(workflow())
    await harness.drain()
    old, recent = await harness.rows()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=harness.settings.report_retention_hours + 1)
    async with harness.database.transaction() as conn:
        await conn.execute(schema.report_outbox.update().where(schema.report_outbox.c.id == old.id)
                           .values(sent_at=long_ago))
    assert await harness.worker.prune() == 1
    assert [r.id for r in await harness.rows()] == [recent.id]


async def test_a_422_is_final(harness: Harness) -> None:
    run_id = await harness.new_run(workflow())
    async with harness.database.transaction() as conn:  # a commit GitHub does not know
        await conn.execute(schema.runs.update().where(schema.runs.c.id == run_id).values(sha=""))
    await harness.worker.run_once()
    [row] = await harness.rows()
    assert row.status == "failed" and "HTTP 422" in (row.last_error or "")


async def test_two_workers_send_each_report_once(harness: Harness) -> None:
    other = ReportWorker(harness.state, Ingest.from_settings(harness.settings), harness.logs)
    harness.workers.append(other)
    wf = workflow(*({"name": f"j{i}", "steps": [{"name": "s"}]} for i in range(12)))
    run_id = await harness.new_run(wf)
    jobs = await harness.jobs(run_id)
    for job in jobs.values():
        await harness.report(job.id, "running")
    deadline = time.monotonic() + 15
    while await harness.rows(status="pending"):
        assert time.monotonic() < deadline
        await asyncio.gather(harness.worker.run_once(), other.run_once())
    assert len(harness.fake.check_runs) == 12  # no check run created twice
    posts = [c for c in harness.fake.check_calls if c[0] == "POST"]
    assert len(posts) == 12


# -- notifications ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "harness", [{"notify_urls": ["http://127.0.0.1:9/unused"], "notify_secret": NOTIFY_SECRET}], indirect=True
)
async def test_notifications_are_signed_retried_and_in_order(harness: Harness, receiver: Receiver) -> None:
    async with harness.database.transaction() as conn:
        git = await create_source(
            conn, key=harness.key, name="git", kind="git",
            config={"url": "/nowhere", "notify_urls": [receiver.url], "notify_job_events": True},
            secrets={"webhook_secret": "w", "notify_secret": "source-secret"},
        )
    # the global URL (port 9, nothing listens) must not hold up the source's URL: separate ordering keys
    wf = workflow({"name": "build", "steps": [{"name": "s"}]}, {"name": "test", "steps": [{"name": "s"}]})
    run_id = await harness.new_run(wf, source=git)
    jobs = await harness.jobs(run_id)
    for name in ("build", "test"):
        await harness.report(jobs[name].id, "running")
    await harness.report(jobs["build"].id, "success")
    await harness.report(jobs["test"].id, "failed", error="boom")

    deadline = time.monotonic() + 15
    while len(receiver.delivered()) < 3:
        assert time.monotonic() < deadline, receiver.received
        await harness.worker.run_once()
        await asyncio.sleep(0.02)
    delivered = receiver.delivered()
    assert [b["event"] for _h, b in delivered] == ["job.finished", "job.finished", "run.finished"]
    statuses = [s for s, _h, _b in receiver.received]
    assert statuses[:2] == [500, 500] and statuses.count(204) == 3  # retried after the 500s
    for headers, body in delivered:
        raw = json.dumps(body, separators=(",", ":")).encode()
        assert verify_hmac_sha256(b"source-secret", raw, headers["x-signature-256"])
        assert not verify_hmac_sha256(NOTIFY_SECRET.encode(), raw, headers["x-signature-256"])
        assert headers["x-kici-event"] == body["event"] and headers["x-kici-delivery"] == body["delivery_id"]
    first_try = json.loads(receiver.received[0][2])
    assert first_try["delivery_id"] == delivered[0][1]["delivery_id"]  # the same id on every retry
    run_event = delivered[2][1]
    assert run_event["run_id"] == run_id and run_event["status"] == "failed" and run_event["repo"] == REPO
    assert run_event["sha"] == SHA and run_event["workflow"] == "ci"
    assert run_event["url"] == f"{PUBLIC_URL}/runs/{run_id}"
    assert sorted((j["name"], j["status"]) for j in run_event["jobs"]) == [("build", "success"), ("test", "failed")]
    assert delivered[0][1]["job"]["name"] == "build"
    # the global URL got run.finished only (no job events without KICI_NOTIFY_JOB_EVENTS); it is unreachable
    global_rows = await harness.rows(target="http://127.0.0.1:9/unused")
    assert [r.event for r in global_rows] == ["run.finished"] and global_rows[0].status == "pending"
    assert global_rows[0].attempts >= 1 and "ConnectError" in (global_rows[0].last_error or "")


# -- through the webhook route ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lock_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return compile_into(tmp_path_factory.mktemp("lock"))


@dataclass
class Hooks:
    http: httpx.AsyncClient
    app: Any
    h: Harness

    async def deliver(self, event: str, body: bytes) -> httpx.Response:
        headers = {
            "Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-GitHub-Hook-Installation-Target-ID": str(APP_ID),
            "X-Hub-Signature-256": "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest(),
        }
        return await self.http.post("/webhook/default/github", content=body, headers=headers)

    async def drain(self) -> None:
        self.h.worker = services_of(self.app).reporter
        await self.h.drain()


@pytest.fixture
async def hooks(harness: Harness, lock_bytes: bytes, tmp_path: Path) -> AsyncIterator[Hooks]:
    fixture = json.loads((GITHUB_FIXTURES / "push.branch-created.json").read_bytes())
    harness.fake.files[(HELLO, fixture["after"])] = lock_bytes
    pr = json.loads((GITHUB_FIXTURES / "pull_request.opened.json").read_bytes())
    harness.fake.files[(HELLO, pr["pull_request"]["base"]["sha"])] = lock_bytes
    harness.fake.files[(HELLO, pr["pull_request"]["head"]["sha"])] = lock_bytes
    harness.fake.compare[(HELLO, pr["pull_request"]["base"]["sha"], pr["pull_request"]["head"]["sha"])] = ["src/a.py"]
    app = create_app(harness.settings, harness.database, secret_key=harness.key)
    ingest_for(app).on_runs_created = None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator") as http:
        try:
            yield Hooks(http, app, harness)
        finally:
            await services_of(app).reporter.close()


async def _run_jobs(h: Harness, run_ids: list[str], outcome: str = "success") -> None:
    for run_id in run_ids:
        for job in (await h.jobs(run_id)).values():
            await h.report(job.id, "running")
            await h.report(job.id, outcome)


async def test_push_and_pull_request_deliveries_produce_check_runs(hooks: Hooks) -> None:
    h = hooks.h
    push = await hooks.deliver("push", (GITHUB_FIXTURES / "push.branch-created.json").read_bytes())
    assert push.status_code == 202, push.text
    await hooks.drain()
    assert {c["name"]: c["status"] for c in h.fake.check_runs.values()} == {"ci / build": "queued",
                                                                           "lint / lint": "queued"}
    await _run_jobs(h, push.json()["run_ids"])
    pr = await hooks.deliver("pull_request", (GITHUB_FIXTURES / "pull_request.opened.json").read_bytes())
    assert pr.status_code == 202 and len(pr.json()["run_ids"]) == 1, pr.text
    await hooks.drain()
    await _run_jobs(h, pr.json()["run_ids"], "failed")
    await hooks.drain()
    by_sha = sorted(
        (c["head_sha"][:7], c["name"], c["status"], c.get("conclusion")) for c in h.fake.check_runs.values()
    )
    push_sha = json.loads((GITHUB_FIXTURES / "push.branch-created.json").read_bytes())["after"][:7]
    pr_sha = json.loads((GITHUB_FIXTURES / "pull_request.opened.json").read_bytes())["pull_request"]["head"]["sha"][:7]
    assert by_sha == sorted([(push_sha, "ci / build", "completed", "success"),
                             (push_sha, "lint / lint", "completed", "success"),
                             (pr_sha, "lint / lint", "completed", "failure")])
    # the installation of each delivery was used for its token
    assert h.fake.hits["POST /app/installations/1/access_tokens"] >= 1
    metrics = (await hooks.http.get("/metrics")).text
    sent = next(line for line in metrics.splitlines() if line.startswith('kici_reports_sent_total{kind="check_run"}'))
    # 3 check runs created, 3 completed: each job's in_progress and completed were sent as one update
    assert float(sent.split()[-1]) == 6 and len(h.fake.check_calls) == 6


async def test_corrupt_lock_file_reports_a_failing_check_run(hooks: Hooks) -> None:
    h = hooks.h
    fixture = json.loads((GITHUB_FIXTURES / "push.branch-created.json").read_bytes())
    h.fake.files[(HELLO, fixture["after"])] = b'{"schemaVersion": 999}'
    response = await hooks.deliver("push", (GITHUB_FIXTURES / "push.branch-created.json").read_bytes())
    assert response.status_code == 202 and response.json()["outcome"] == "lockfile_corrupt", response.text
    [run_id] = response.json()["run_ids"]
    await hooks.drain()
    check = h.fake.check_run_named("lock_resolution")
    assert (check["status"], check["conclusion"], check["external_id"]) == ("completed", "failure", run_id)
    assert "lock file could not be read" in check["output"]["summary"] and check["head_sha"] == fixture["after"]


async def test_rerequested_check_run_and_suite_rerun(hooks: Hooks) -> None:
    h = hooks.h
    push = await hooks.deliver("push", (GITHUB_FIXTURES / "push.branch-created.json").read_bytes())
    run_ids = push.json()["run_ids"]
    await _run_jobs(h, run_ids, "failed")
    await hooks.drain()
    build = h.fake.check_run_named("ci / build")
    suite = json.loads((GITHUB_FIXTURES / "check_suite.requested.json").read_bytes())
    # GitHub's check_run.rerequested shape (docs: webhook-events-and-payloads#check_run)
    body = {
        "action": "rerequested",
        "check_run": {
            "id": build["id"], "name": build["name"], "head_sha": build["head_sha"],
            "external_id": build["external_id"],
            "status": "completed", "conclusion": "failure", "app": {"id": APP_ID},
            "check_suite": {"id": 118578147, "head_sha": build["head_sha"]},
        },
        "repository": suite["repository"], "sender": suite["sender"], "installation": suite["installation"],
    }
    response = await hooks.deliver("check_run", json.dumps(body).encode())
    assert response.status_code == 202, response.text
    [rerun_id] = response.json()["run_ids"]
    async with h.database.read() as conn:
        rerun = await run_store.get_run(conn, rerun_id)
        originals = {r: await run_store.get_run(conn, r) for r in run_ids}
    ci = next(r for r in originals.values() if r is not None and r.workflow == "ci")
    assert rerun is not None and rerun.original_run_id == ci.id and rerun.workflow == "ci" and rerun.reporting
    async with h.database.read() as conn:
        [row] = [e for e in await audit.list_audit(conn, outcome="allowed") if e.action == "run.rerun"]
    assert (row.actor, row.target) == (f"github:{suite['sender']['login']}", f"run:{ci.id}")
    # check_suite.rerequested: the latest run of each workflow at the suite's head
    suite_body = copy.deepcopy(suite)
    suite_body["action"] = "rerequested"
    suite_body["check_suite"]["head_sha"] = ci.sha
    response = await hooks.deliver("check_suite", json.dumps(suite_body).encode())
    assert response.status_code == 202, response.text
    async with h.database.read() as conn:
        reruns = [await run_store.get_run(conn, r) for r in response.json()["run_ids"]]
    assert sorted((r.workflow, r.original_run_id) for r in reruns if r is not None) == sorted(
        (r.workflow, r.id) for r in originals.values() if r is not None
    )
    # a check run of another App's job id is not ours to rerun; our own check run echoes are filtered
    body["check_run"]["external_id"] = "not-a-job"
    assert (await hooks.deliver("check_run", json.dumps(body).encode())).json()["status"] == "filtered"
    body["action"] = "completed"
    assert (await hooks.deliver("check_run", json.dumps(body).encode())).json()["status"] == "filtered"
    suite_body["action"] = "completed"
    suite_body["check_suite"]["app"] = {"id": APP_ID}
    echo = (await hooks.deliver("check_suite", json.dumps(suite_body).encode())).json()
    assert echo["status"] == "filtered" and "echo" in echo["reason"]
    async with h.database.read() as conn:
        count = (await conn.execute(sa.select(sa.func.count()).select_from(schema.runs))).scalar_one()
    assert count == 2 + 1 + 2


# -- test reports in check runs ---------------------------------------------------------------------


def _failure(i: int, message: str) -> TestResultRecord:
    return TestResultRecord(id=i, run_id="r", job_id="j", job="test", suite="s", classname=f"tests.test_{i}",
                            name=f"test_{i}" + "x" * 400, status="failed", duration_ms=1, message=message,
                            details="d", file=None, line=None)


def test_check_output_lists_failing_tests_within_githubs_limits() -> None:
    summary = TestSummary(passed=120, failed=500, skipped=3, total=623, files=1)
    digest = TestsDigest(summary, [_failure(i, "boom `x`\n" + "m" * 5000) for i in range(FAILING_TESTS_SHOWN)])
    output = check_output(_job("failed"), [], "failure", [], digest)
    assert len(output["summary"]) <= MAX_OUTPUT_CHARS
    assert "**Tests:** 120 passed, 500 failed, 3 skipped" in output["summary"]
    assert f"Failing tests (first {FAILING_TESTS_SHOWN} of 500):" in output["summary"]
    assert "- `tests.test_0::test_0" in output["summary"] and "(failed): boom 'x' mmm" in output["summary"]
    # a job whose reports hold no failure says only the counts
    quiet = check_output(_job("success"), [], "success", [], TestsDigest(TestSummary(passed=2, total=2), []))
    assert quiet["summary"].endswith("**Tests:** 2 passed")


REPORT = b"""<testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_ok2" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad" time="0.2"><failure message="assert 1 == 2">tb</failure></testcase>
<testcase classname="tests.test_a" name="test_err"><error message="RuntimeError: boom">tb</error></testcase>
<testcase classname="tests.test_a" name="test_skip"><skipped message="later"/></testcase>
</testsuite></testsuites>"""


async def test_a_finished_job_s_check_run_summarises_its_test_reports(harness: Harness) -> None:
    wf = workflow({"name": "test", "steps": [{"name": "pytest"}]}, {"name": "lint", "steps": [{"name": "ruff"}]})
    run_id = await harness.new_run(wf)
    jobs = await harness.jobs(run_id)
    for name in ("test", "lint"):
        await harness.report(jobs[name].id, "running")
    await harness.drain()
    async with harness.database.transaction() as conn:
        await report_store.replace_report_file(
            conn, file_id=schema.new_id(), org_id="default", run_id=run_id, job_id=jobs["test"].id,
            path="reports/junit.xml", size=len(REPORT), sha256=None, blob_key=None,
            report=parse_junit(io.BytesIO(REPORT), max_bytes=10_000), error=None)
        await report_store.replace_report_file(
            conn, file_id=schema.new_id(), org_id="default", run_id=run_id, job_id=jobs["test"].id,
            path="reports/broken.xml", size=3, sha256=None, blob_key=None, report=None,
            error="not well-formed XML: no element found")
    assert "Tests" not in harness.fake.check_run_named("ci / test")["output"]["summary"]  # sent while it ran
    await harness.report(jobs["test"].id, "failed", error="step pytest failed")
    await harness.report(jobs["lint"].id, "success")
    await harness.drain()
    summary = harness.fake.check_run_named("ci / test")["output"]["summary"]
    assert "**Tests:** 2 passed, 1 failed, 1 error, 1 skipped (1 report file(s) could not be read)" in summary
    assert "Failing tests (2):" in summary
    assert "- `tests.test_a::test_bad` (failed): assert 1 == 2" in summary
    assert "- `tests.test_a::test_err` (error): RuntimeError: boom" in summary
    assert "Tests" not in harness.fake.check_run_named("ci / lint")["output"]["summary"]  # it sent no reports
