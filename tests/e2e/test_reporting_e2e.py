"""GitHub reporting end to end with real processes: a signed push delivery → the orchestrator reads the
lock file from a fake GitHub API → a real agent clones over HTTP (git's smart HTTP, served by the fake
with `git http-backend`) and runs the steps → the orchestrator reports each job as a check run
(queued → in_progress → completed) to the fake, through an API outage; then GitHub's "Re-run" button
(`check_run.rerequested`) starts a linked rerun. On SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import git
from tests.integration.orchestrator.test_providers_github import APP_ID, FakeGitHub, fake_github  # noqa: F401
from tests.paths import GITHUB_FIXTURES

from .conftest import WORKFLOW_HEADER, System, wait_for

SECRET = "e2e-github-webhook-secret"
REPO = "acme/app"
PUBLIC_URL = "https://ci.example.com"

WORKFLOW = WORKFLOW_HEADER + '''

build = job("build", steps=[step("compile", "echo compiling && sleep 1 && echo compiled")])
JUNIT = (
    "mkdir -p reports && printf '<testsuite name=\\"s\\"><testcase classname=\\"t\\" name=\\"test_one\\"/>"
    "<testcase classname=\\"t\\" name=\\"test_two\\"><failure message=\\"two is broken\\"/></testcase></testsuite>'"
    " > reports/junit.xml"
)
test = job("test", needs=[build], test_reports=["reports/*.xml"],
           steps=[step("pytest", JUNIT + "; for i in $(seq 1 70); do echo test line $i; done; exit 3")])
deploy = job("deploy", needs=[test], steps=[step("ship", "echo must not run")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[build, test, deploy])
'''


def _deliver(system: System, event: str, payload: dict[str, Any]) -> httpx.Response:
    body = json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-GitHub-Hook-Installation-Target-ID": str(APP_ID),
        "X-Hub-Signature-256": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
    }
    return httpx.post(f"{system.url}/webhook/default/github", content=body, headers=headers, timeout=30)


def _push_payload(sha: str) -> dict[str, Any]:
    payload = json.loads((GITHUB_FIXTURES / "push.branch-created.json").read_bytes())
    payload.update({"ref": "refs/heads/main", "before": "0" * 40, "after": sha, "commits": [], "head_commit": None})
    payload["repository"] = {**payload["repository"], "full_name": REPO, "name": "app", "default_branch": "main"}
    payload["installation"] = {"id": 1}
    return dict(payload)


def _checks(fake: FakeGitHub, name: str) -> list[dict[str, Any]]:
    return [c for c in fake.check_runs.values() if c.get("name") == name]


def _statuses(fake: FakeGitHub, check_id: int) -> list[str]:
    return [body["status"] for _m, cid, body in fake.check_calls if cid == check_id]


def test_github_push_reports_check_runs_through_an_outage_and_reruns(
    system: System, fake_github: FakeGitHub, tmp_path: Path  # noqa: F811
) -> None:
    fake = fake_github
    system.start_orchestrator(KICI_PUBLIC_URL=PUBLIC_URL, KICI_REPORT_RETRY_BASE_MS="100",
                              KICI_REPORT_RETRY_MAX_MS="400", KICI_REPORT_POLL_MS="200")
    pem = tmp_path / "app.pem"
    pem.write_text(fake.private_key_pem)
    added = system.kici_admin("source", "add", "github", "gh", "--app-id", str(APP_ID), "--private-key-file",
                              str(pem), "--webhook-secret", SECRET, "--api-url", fake.url)
    assert added.returncode == 0, added.stderr
    sha = system.commit({".kici/workflows/ci.py": WORKFLOW}, "add ci")
    served = tmp_path / "github" / "app.git"
    served.parent.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(system.repo), str(served))
    fake.git_repos[REPO] = served
    fake.installations[REPO] = 1  # dispatch looks the installation up to mint the clone token
    fake.files[(REPO, sha)] = (system.repo / ".kici" / "kici.lock.json").read_bytes()
    system.start_agent("a1")

    fake.check_failures = [(502, {})] * 4  # GitHub's API is down when the run starts
    response = _deliver(system, "push", _push_payload(sha))
    assert response.status_code == 202, response.text
    [run_id] = response.json()["run_ids"]
    run = system.wait_run(sha, "failed", "success")
    assert run["status"] == "failed", system.diagnostics()
    assert fake.git_auth, "the agent cloned through the fake GitHub with an installation token"

    def completed() -> bool:
        return all(
            len(_checks(fake, f"ci / {n}")) == 1 and _checks(fake, f"ci / {n}")[0]["status"] == "completed"
            for n in ("build", "test", "deploy")
        )

    wait_for(completed, within=60, what=f"three completed check runs; calls: {fake.check_calls}")
    assert fake.check_failures == []  # the outage was sat out, nothing lost
    build, test, deploy = (_checks(fake, f"ci / {n}")[0] for n in ("build", "test", "deploy"))
    assert (build["conclusion"], test["conclusion"], deploy["conclusion"]) == ("success", "failure", "skipped")
    # in order, never an older state after a newer one (updates made during the outage may be compacted)
    seen = _statuses(fake, build["id"])
    assert seen[-1] == "completed" and seen == sorted(seen, key=["queued", "in_progress", "completed"].index)
    assert build["head_sha"] == sha and build["details_url"] == f"{PUBLIC_URL}/runs/{run_id}?job=build"
    assert "test line 70" in test["output"]["text"] and "test line 20\n" not in test["output"]["text"]
    # the job's JUnit report, sent by the agent after the failing step, is summarised in its check run
    assert "**Tests:** 1 passed, 1 failed" in test["output"]["summary"], test["output"]["summary"]
    assert "- `t::test_two` (failed): two is broken" in test["output"]["summary"]
    assert "Tests" not in build["output"]["summary"]
    # (the fake answers check-run calls made with any other token 403: reporting used only scoped tokens)
    scoped = {"repositories": ["app"], "permissions": {"checks": "write"}}
    assert scoped in fake.token_scopes.values() and scoped not in [fake.token_scopes[t] for t in fake.git_auth]
    reports = system.kici_admin("reports", "list", "--run", run_id, "--json")
    assert reports.returncode == 0 and {r["status"] for r in json.loads(reports.stdout)} == {"sent"}

    # GitHub's "Re-run" on the failed check run → a linked rerun with check runs of its own
    suite = json.loads((GITHUB_FIXTURES / "check_suite.requested.json").read_bytes())
    rerequest = {
        "action": "rerequested",
        "check_run": {"id": test["id"], "name": test["name"], "head_sha": sha, "external_id": test["external_id"],
                      "status": "completed", "conclusion": "failure", "app": {"id": APP_ID}},
        "repository": {**copy.deepcopy(suite["repository"]), "full_name": REPO, "name": "app"},
        "sender": suite["sender"], "installation": {"id": 1},
    }
    response = _deliver(system, "check_run", rerequest)
    assert response.status_code == 202, response.text
    [rerun_id] = response.json()["run_ids"]
    rerun = system.admin("GET", f"/runs/{rerun_id}").json()
    assert rerun["original_run_id"] == run_id and rerun["sha"] == sha
    wait_for(lambda: len([c for c in _checks(fake, "ci / test") if c["status"] == "completed"]) == 2, within=90,
             what="the rerun's check run of ci / test")
