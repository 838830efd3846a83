"""`kici-admin runs logs | watch | rerun` against a small fake admin API serving the contract of the logs
and rerun routes (`GET runs/{run}/jobs/{job}/logs?after=&limit=`, `POST runs/{run}/rerun`) next to the
existing `GET runs/{id}` and `GET runs/{id}/jobs`.

The fake runs a scripted run: each `GET runs/{id}` moves the script one phase on (then it stays at the
last phase), so a follow loop sees the run progress one poll at a time. It pages logs at most `PAGE_CAP`
lines at a time whatever `limit` asks for, so paging by cursor is exercised too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from kici.admin import follow
from kici.admin.main import main

TOKEN = "kici_fake_admin_token"
RUN = "run-1"
PAGE_CAP = 2
API = "/api/v1/admin"
TERMINAL = {"success", "failed", "cancelled", "skipped", "timed_out_stale", "drift_dropped"}


@dataclass
class Phase:
    run_status: str
    jobs: dict[str, tuple[str, int]]
    """Per job name: its status and how many of its lines exist by now."""
    times: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per job name: timestamps the job list reports (`started_at`, `finished_at`, …)."""
    wait_reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class Script:
    jobs: list[tuple[str, str]]
    """(id, name) in plan order."""
    lines: dict[str, list[tuple[int, str]]]
    """Per job name, every (step, text) it will log."""
    phases: list[Phase]
    failure_reason: str | None = None
    steps: dict[str, list[str]] = field(default_factory=lambda: {
        "build": ["compile", "package"], "test": ["pytest"], "test-unit": ["pytest"]})
    """Per job name, its step names by index (what `GET runs/{id}/jobs` reports with each job)."""
    phase: int = -1
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> Phase:
        return self.phases[max(0, self.phase)]

    def run(self) -> dict[str, Any]:
        phase = self.current()
        finished = phase.run_status not in follow.ACTIVE_RUN_STATUSES
        return {
            "id": RUN, "workflow": "ci", "status": phase.run_status, "repo": "acme/app", "ref": "refs/heads/main",
            "sha": "a" * 40, "created_at": "2026-11-27T08:00:00Z", "started_at": "2026-11-27T08:00:01Z",
            "finished_at": "2026-11-27T08:01:06Z" if finished else None, "delivery_id": None,
            "failure_reason": self.failure_reason if finished else None, "cancelled_by": None,
            "original_run_id": None, "parent_run_id": None, "event": {}, "source_id": None,
            "lock_content_hash": None, "workflow_content_hash": None, "timeout_ms": None,
        }

    def job_list(self) -> list[dict[str, Any]]:
        phase = self.current()
        return [
            {"id": job_id, "name": name, "job": name, "status": phase.jobs[name][0],
             "agent": "agent-7" if phase.jobs[name][0] != "queued" else None, "attempt": 1, "matrix": None,
             "error": None, "failure_category": None, "created_at": "2026-11-27T08:00:00Z", "queued_at": None,
             "started_at": None, "finished_at": None, "wait_reason": phase.wait_reasons.get(name),
             "steps": [{"index": i, "name": step} for i, step in enumerate(self.steps.get(name, []))],
             **phase.times.get(name, {})}
            for job_id, name in self.jobs
        ]

    def logs(self, job_id: str, after: int, limit: int) -> dict[str, Any] | None:
        name = dict(self.jobs).get(job_id)
        if name is None:
            return None
        status, available = self.current().jobs[name]
        page = self.lines[name][after:min(available, after + min(limit, PAGE_CAP))]
        next_cursor = after + len(page)
        return {
            "job_id": job_id,
            "lines": [{"n": after + i + 1, "step": step, "line": text} for i, (step, text) in enumerate(page)],
            "next": next_cursor,
            "complete": status in TERMINAL and next_cursor >= available,
        }


class FakeAdmin(BaseHTTPRequestHandler):
    script: Script

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output clean
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        script = self.server.script  # type: ignore[attr-defined]
        with script.lock:
            script.requests.append((method, url.path, query))
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._answer(401, {"error": "missing or invalid admin token"})
            path = url.path.removeprefix(API)
            if not path.startswith(f"/runs/{RUN}"):
                found = re.match(r"/runs/([^/]+)", path)
                if found:
                    return self._answer(404, {"error": f"no run with id {found.group(1)!r}"})
                return self._answer(404, {"error": f"no admin route {method} {url.path}"})
            rest = path.removeprefix(f"/runs/{RUN}")
            if method == "GET" and rest == "":
                script.phase = min(script.phase + 1, len(script.phases) - 1)
                return self._answer(200, script.run())
            if method == "GET" and rest == "/jobs":
                return self._answer(200, script.job_list())
            logs = re.fullmatch(r"/jobs/([^/]+)/logs", rest)
            if method == "GET" and logs:
                page = script.logs(logs.group(1), int(query.get("after", "0")), int(query.get("limit", "100")))
                if page is None:
                    return self._answer(404, {"error": f"no job {logs.group(1)!r} in run {RUN}"})
                return self._answer(200, page)
            if method == "POST" and rest == "/rerun":
                new = {**script.run(), "id": "run-2", "status": "pending", "original_run_id": RUN}
                return self._answer(201, {"run": {k: v for k, v in new.items() if k not in (
                    "event", "source_id", "lock_content_hash", "workflow_content_hash", "timeout_ms")}})
            return self._answer(404, {"error": f"no admin route {method} {url.path}"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")


@dataclass
class Fake:
    url: str
    server: ThreadingHTTPServer

    def load(self, script: Script) -> Script:
        self.server.script = script  # type: ignore[attr-defined]
        return script


@pytest.fixture
def fake() -> Iterator[Fake]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAdmin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Fake(f"http://127.0.0.1:{server.server_address[1]}", server)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "POLL_INTERVAL_S", 0.01)


def kici_admin(fake: Fake, *args: str, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    """Run `kici-admin` in this process; (exit code, stdout, stderr)."""
    for name in list(os.environ):
        if name.startswith("KICI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KICI_ADMIN_URL", fake.url)
    monkeypatch.setenv("KICI_ADMIN_TOKEN", TOKEN)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def finished_script(run_status: str = "success", failure_reason: str | None = None) -> Script:
    lines = {
        "build": [(-1, "checking out acme/app"), (0, "compiling"), (0, "compiled 12 files")],
        "test-unit": [(0, "collected 3 tests"), (0, "3 passed")],
    }
    return Script(
        jobs=[("job-b", "build"), ("job-t", "test-unit")],
        lines=lines,
        phases=[Phase(run_status, {"build": ("success", 3),
                                   "test-unit": ("failed" if run_status == "failed" else "success", 2)})],
        failure_reason=failure_reason,
    )


def live_script() -> Script:
    """Phase 0: build running, tests queued; 1: more lines, tests start; 2: the run has finished but the
    last lines are still to be read; then nothing changes."""
    lines = {
        "build": [(-1, "checking out"), (0, "compiling"), (0, "linking"), (1, "packaging"), (1, "done")],
        "test": [(0, "collected 2 tests"), (0, "test_a ok"), (0, "test_b ok")],
    }
    return Script(
        jobs=[("job-b", "build"), ("job-t", "test")],
        lines=lines,
        phases=[
            Phase("running", {"build": ("running", 1), "test": ("queued", 0)}),
            Phase("running", {"build": ("running", 3), "test": ("running", 1)}),
            Phase("success", {"build": ("success", 5), "test": ("success", 3)}),
        ],
    )


# -- runs logs --------------------------------------------------------------------------------------


def test_logs_of_every_job_in_plan_order(fake: Fake, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    script = fake.load(finished_script())
    code, out, err = kici_admin(fake, "runs", "logs", RUN, capsys=capsys, monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "build     | ── setup ──",
        "build     | checking out acme/app",
        "build     | ── step 1: compile ──",
        "build     | compiling",
        "build     | compiled 12 files",
        "test-unit | ── step 1: pytest ──",
        "test-unit | collected 3 tests",
        "test-unit | 3 passed",
    ]
    # paged by cursor: the fake hands out two lines at a time
    build_pages = [q for m, p, q in script.requests if p.endswith("/jobs/job-b/logs")]
    assert [q["after"] for q in build_pages] == ["0", "2"]
    assert all(q["limit"] == str(follow.PAGE_SIZE) for q in build_pages)


def test_logs_of_one_job_have_no_prefix(fake: Fake, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake.load(finished_script())
    for selector in ("test-unit", "job-t"):
        code, out, _ = kici_admin(fake, "runs", "logs", RUN, "--job", selector, capsys=capsys,
                                  monkeypatch=monkeypatch)
        assert (code, out) == (0, "── step 1: pytest ──\ncollected 3 tests\n3 passed\n")
    code, out, err = kici_admin(fake, "runs", "logs", RUN, "--job", "deploy", capsys=capsys, monkeypatch=monkeypatch)
    assert (code, out) == (1, "")
    assert err == f"kici-admin: error: run {RUN} has no job 'deploy' (its jobs: build, test-unit)\n"
    code, out, err = kici_admin(fake, "runs", "logs", "run-x", capsys=capsys, monkeypatch=monkeypatch)
    assert (code, out, err) == (1, "", "kici-admin: error: no run with id 'run-x' (HTTP 404)\n")


def test_logs_follow_until_the_run_finished_and_logs_are_complete(
    fake: Fake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = fake.load(live_script())
    code, out, err = kici_admin(fake, "runs", "logs", RUN, "--follow", capsys=capsys, monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "build | ── setup ──",  # round 1
        "build | checking out",
        "build | ── step 1: compile ──",  # round 2
        "build | compiling",
        "build | linking",
        "test  | ── step 1: pytest ──",
        "test  | collected 2 tests",
        "build | ── step 2: package ──",  # round 3: the run is finished, the last lines are still read
        "build | packaging",
        "build | done",
        "test  | test_a ok",
        "test  | test_b ok",
    ]
    assert [p for m, p, q in script.requests].count(f"{API}/runs/{RUN}") == 3
    # cursors only move forward (an empty page asks from the same place again next round)
    for job_id in ("job-b", "job-t"):
        afters = [int(q["after"]) for m, p, q in script.requests if p.endswith(f"/jobs/{job_id}/logs")]
        assert afters == sorted(afters), (job_id, afters)


def test_follow_polls_every_half_second(fake: Fake, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "POLL_INTERVAL_S", 0.5)
    fake.load(live_script())
    started = time.monotonic()
    code, _, _ = kici_admin(fake, "runs", "logs", RUN, "-f", "--job", "build", capsys=capsys,
                            monkeypatch=monkeypatch)
    took = time.monotonic() - started
    assert code == 0 and 1.0 <= took < 3.0, took  # three rounds: two pauses between them


def test_follow_ctrl_c_exits_130(fake: Fake) -> None:
    fake.load(Script(jobs=[("job-b", "build")], lines={"build": [(0, "started, never finishing")]},
                     phases=[Phase("running", {"build": ("running", 1)})]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
    env.update({"KICI_ADMIN_URL": fake.url, "KICI_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "kici.admin", "runs", "logs", RUN, "--follow"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "── step 1: compile ──\n"
        assert proc.stdout.readline() == "started, never finishing\n"
        time.sleep(0.3)  # inside the poll loop: asleep or mid-request
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert out == "" and "Traceback" not in err and "Abort" not in err


# -- runs watch -------------------------------------------------------------------------------------


def test_watch_shows_status_changes_lines_and_a_summary(fake: Fake, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake.load(live_script())
    code, out, err = kici_admin(fake, "runs", "watch", RUN, capsys=capsys, monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"Run {RUN} (ci on acme/app refs/heads/main): running",
        "== build running on agent-7",
        "== test  queued",
        "build | ── setup ──",
        "build | checking out",
        "== test  running on agent-7",
        "build | ── step 1: compile ──",
        "build | compiling",
        "build | linking",
        "test  | ── step 1: pytest ──",
        "test  | collected 2 tests",
        "build | ── step 2: package ──",
        "build | packaging",
        "build | done",
        "test  | test_a ok",
        "test  | test_b ok",
        "== build success",
        "== test  success",
        f"Run {RUN} success in 1m05s (jobs: 2 success)",
    ]


def late_script() -> Script:
    """A watch attached late: `build` finished and `lint` started before the first look (lint started
    after build finished), `test` waits for its concurrency group; then lint finishes, after which test
    starts and finishes."""
    at = "2026-11-27T08:00:{:02d}Z".format
    build = {"started_at": at(1), "finished_at": at(10)}
    lint_running = {"started_at": at(11)}
    return Script(
        jobs=[("job-b", "build"), ("job-l", "lint"), ("job-t", "test")],
        lines={"build": [(0, "compiled")], "lint": [(0, "linted")], "test": [(0, "tested")]},
        steps={"build": ["compile"], "lint": ["ruff"], "test": ["pytest"]},
        phases=[
            Phase("running", {"build": ("success", 1), "lint": ("running", 1), "test": ("waiting", 0)},
                  times={"build": build, "lint": lint_running}, wait_reasons={"test": "concurrency: prod"}),
            # one round later test started (08:00:21) *after* lint finished (08:00:20): both changes
            # come in the same round and must print in the order they happened, not in plan order
            Phase("running", {"build": ("success", 1), "lint": ("success", 1), "test": ("running", 0)},
                  times={"build": build, "lint": {**lint_running, "finished_at": at(20)},
                         "test": {"started_at": at(21)}}),
            Phase("success", {"build": ("success", 1), "lint": ("success", 1), "test": ("success", 1)},
                  times={"build": build, "lint": {**lint_running, "finished_at": at(20)},
                         "test": {"started_at": at(21), "finished_at": at(30)}}),
        ],
    )


def test_watch_attached_late_prints_states_in_order(fake: Fake, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fake.load(late_script())
    code, out, err = kici_admin(fake, "runs", "watch", RUN, capsys=capsys, monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"Run {RUN} (ci on acme/app refs/heads/main): running",
        # attach: the state of every job, in plan order (before the fix a finished job came last)
        "== build success",
        "== lint  running on agent-7",
        "== test  waiting (concurrency: prod)",
        "build | ── step 1: compile ──",
        "build | compiled",
        "lint  | ── step 1: ruff ──",
        "lint  | linted",
        # then changes in the order they happened: lint ended before test started
        "== lint  success",
        "== test  running on agent-7",
        "test  | ── step 1: pytest ──",
        "test  | tested",
        "== test  success",
        f"Run {RUN} success in 1m05s (jobs: 3 success)",
    ]


@pytest.mark.parametrize(("status", "reason"), [("failed", "job test-unit failed"), ("cancelled", None)])
def test_watch_exits_1_unless_the_run_succeeded(fake: Fake, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, status: str,
                                                reason: str | None) -> None:
    fake.load(finished_script(status, reason))
    code, out, _ = kici_admin(fake, "runs", "watch", RUN, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 1
    last = out.splitlines()[-1]
    assert last.startswith(f"Run {RUN} {status} in 1m05s (jobs: ")
    assert last.endswith(f"; {reason}" if reason else ")")


# -- runs rerun -------------------------------------------------------------------------------------


def test_rerun(fake: Fake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    script = fake.load(finished_script())
    code, out, err = kici_admin(fake, "runs", "rerun", RUN, capsys=capsys, monkeypatch=monkeypatch)
    assert (code, err) == (0, "")
    assert out == (f"Started run run-2 (ci, pending), a re-run of {RUN}.\n"
                   "Watch it: kici-admin runs watch run-2\n")
    assert ("POST", f"{API}/runs/{RUN}/rerun", {}) in script.requests
    code, out, _ = kici_admin(fake, "runs", "rerun", RUN, "--json", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out)["run"]["original_run_id"] == RUN
    code, out, err = kici_admin(fake, "runs", "rerun", "run-x", capsys=capsys, monkeypatch=monkeypatch)
    assert (code, out, err) == (1, "", "kici-admin: error: no run with id 'run-x' (HTTP 404)\n")


def test_duration_format() -> None:
    from kici.admin.output import duration

    assert [duration(s) for s in (None, -1, 0, 59.9, 60, 3599, 3600, 86399, 90061)] == [
        None, "0s", "0s", "59s", "1m00s", "59m59s", "1h00m", "23h59m", "1d01h"]
