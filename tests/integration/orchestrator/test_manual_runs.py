"""`POST /api/v1/admin/runs` (manual runs through a workflow's `dispatch()` trigger) on SQLite and
PostgreSQL against real git repositories, and against the fake GitHub API for a GitHub source: inputs
validated against the declared ones before anything is created, refs resolved through the source, the
start audited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.store import audit
from tests.integration.orchestrator.schedule_harness import WORKFLOWS, orchestrator, schedule_repo
from tests.integration.orchestrator.test_providers_git import compile_into
from tests.integration.orchestrator.test_providers_github import INSTALLATION_ID, FakeGitHub


def start(**body: Any) -> dict[str, Any]:
    return {"source": "local", "workflow": "deploy", **body}


async def test_inputs_validated(database: Database, tmp_path: Path) -> None:
    repo, head = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)

        bad = {
            "count": ({"count": "many"}, "input 'count' must be a number, not 'many'"),
            "mode": ({"count": 1, "mode": "medium"}, "input 'mode' must be one of fast, slow; got 'medium'"),
            "dry_run": ({"count": 1, "dry_run": "perhaps"}, "input 'dry_run' must be true or false, not 'perhaps'"),
            "required": ({}, "input 'count' is required"),
            "unknown": ({"count": 1, "colour": "red"}, "unknown input(s) colour; declared: count, dry_run, mode, note"),
        }
        for case, (inputs, message) in bad.items():
            response = await orch.admin("POST", "/runs", json=start(ref="main", inputs=inputs))
            assert response.status_code == 422, (case, response.text)
            assert response.json() == {"error": f"invalid request: inputs: {message}"}, case
        assert await orch.runs() == [], "a refused start creates nothing"

        # strings (as the CLI sends them) are converted; defaults fill the rest
        response = await orch.admin("POST", "/runs", json=start(ref="main", inputs={"count": "3", "dry_run": "yes"}))
        assert response.status_code == 201, response.text
        run = response.json()
        assert run["workflow"] == "deploy" and run["sha"] == head and run["ref"] == "refs/heads/main"
        assert run["status"] == "pending" and run["repo"] == "acme/app"
        assert run["event"]["type"] == "dispatch" and run["event"]["branch"] == "main"
        assert run["event"]["inputs"] == {"count": 3, "mode": "fast", "dry_run": True}
        assert run["event"]["actor"] == "admin token 'admin-token'"
        [stored] = await orch.runs()
        assert stored.id == run["id"] and stored.event["inputs"] == {"count": 3, "mode": "fast", "dry_run": True}
        async with database.read() as conn:
            [row] = [e for e in await audit.list_audit(conn, outcome="allowed") if e.action == "runs.start"]
        assert (row.action, row.permission, row.role, row.status) == ("runs.start", "runs:write", "admin", 201)
        assert run["id"] in (row.reason or "")

        # JSON types are taken as they are
        typed = await orch.admin("POST", "/runs", json=start(inputs={"count": 2.5, "mode": "slow", "dry_run": False}))
        assert typed.status_code == 201, typed.text
        assert typed.json()["event"]["inputs"] == {"count": 2.5, "mode": "slow", "dry_run": False}
        assert typed.json()["sha"] == head, "no ref: the head of the default branch"

        # every input kind: required strings and environments, defaults of each type
        release = {"source": "local", "workflow": "release"}
        for inputs, message in (
            ({"target": "prod", "verbose": True}, "input 'version' (the version to release) is required"),
            ({"version": "1.2", "verbose": True}, "input 'target' (where to deploy) is required"),
            ({"version": "1.2", "target": "prod"}, "input 'verbose' is required"),
            ({"version": True, "target": "prod", "verbose": True}, "input 'version' must be a string, not True"),
            ({"version": "1.2", "target": "prod", "verbose": 3}, "input 'verbose' must be true or false, not 3"),
        ):
            refused = await orch.admin("POST", "/runs", json={**release, "inputs": inputs})
            assert refused.status_code == 422 and refused.json() == {"error": f"invalid request: inputs: {message}"}
        full = await orch.admin("POST", "/runs", json={**release, "inputs": {"version": 1.5, "target": "prod",
                                                                             "verbose": "off"}})
        assert full.status_code == 201, full.text
        assert full.json()["event"]["inputs"] == {
            "version": "1.5", "target": "prod", "notes": "none", "fallback": "staging", "retries": 2, "verbose": False,
        }
        assert len(await orch.runs()) == 3


async def test_refs_workflows_and_sources(database: Database, tmp_path: Path) -> None:
    repo, first = schedule_repo(tmp_path / "repo")
    repo.write("src/a.py", "a = 1\n")
    second = repo.commit("second")
    repo.git("tag", "v1", first)
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        inputs = {"count": 1}
        by_sha = await orch.admin("POST", "/runs", json=start(sha=first, inputs=inputs))
        assert by_sha.status_code == 201 and by_sha.json()["sha"] == first and by_sha.json()["ref"] is None
        by_tag = await orch.admin("POST", "/runs", json=start(ref="refs/tags/v1", inputs=inputs))
        assert by_tag.status_code == 201 and by_tag.json()["sha"] == first
        assert by_tag.json()["event"]["tag"] == "v1"
        by_branch = await orch.admin("POST", "/runs", json=start(ref="main", inputs=inputs))
        assert by_branch.json()["sha"] == second

        expected = {
            "unknown source": (start(source="nope"), 404, "no source 'nope'"),
            "unknown workflow": (start(workflow="nope"), 404, None),
            "no dispatch trigger": (start(workflow="nightly"), 422,
                                    "invalid request: workflow: 'nightly' has no dispatch() trigger, so it cannot "
                                    "be started by hand"),
            "unknown ref": (start(ref="no-such-branch", inputs=inputs), 422,
                            "invalid request: ref: 'no-such-branch' not found in acme/app"),
            "unknown sha": (start(sha="1" * 40, inputs=inputs), 422, None),
            "bad sha": (start(sha="not-a-sha", inputs=inputs), 422,
                        "invalid request: sha: not a commit id: 'not-a-sha'"),
            "ref and sha": (start(ref="main", sha=first), 422, "invalid request: give either ref or sha, not both"),
            "no workflow": ({"source": "local"}, 422, "invalid request: workflow: Field required"),
            "extra field": (start(branch="main"), 422, "invalid request: branch: Extra inputs are not permitted"),
        }
        for case, (body, status, message) in expected.items():
            response = await orch.admin("POST", "/runs", json=body)
            assert response.status_code == status, (case, response.text)
            if message is not None:
                assert response.json() == {"error": message}, case
        assert "workflows: ci, deploy, nightly" in (await orch.admin("POST", "/runs", json=start(workflow="nope"))).text
        assert len(await orch.runs()) == 3

        denied = await orch.admin("POST", "/runs", role=AdminRole.AUDITOR, json=start(inputs=inputs))
        assert denied.status_code == 403 and "runs:write" in denied.json()["error"]
        assert (await orch.admin("POST", "/sources/local/disable")).status_code == 200
        disabled = await orch.admin("POST", "/runs", json=start(inputs=inputs))
        assert disabled.status_code == 422
        assert disabled.json() == {"error": "invalid request: source: 'local' is disabled"}
        assert len(await orch.runs()) == 3


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    fake = FakeGitHub()
    try:
        yield fake
    finally:
        fake.close()


async def test_github_source_resolves_refs_through_the_api(
    database: Database, tmp_path: Path, fake_github: FakeGitHub
) -> None:
    lock = compile_into(tmp_path / "work", WORKFLOWS)
    sha = "d" * 40
    fake_github.files[("acme/app", sha)] = lock
    fake_github.refs[("acme/app", "release")] = sha
    fake_github.repositories["acme/app"] = {"default_branch": "release"}
    fake_github.installations["acme/app"] = INSTALLATION_ID
    async with orchestrator(database, tmp_path / "data") as orch:
        created = await orch.admin("POST", "/sources", json={
            "kind": "github", "name": "gh", "config": {"app_id": fake_github.app_id, "api_url": fake_github.url},
            "secrets": {"private_key": fake_github.private_key_pem, "webhook_secret": "w"},
        })
        assert created.status_code == 201, created.text
        body = {"source": "gh", "workflow": "deploy", "inputs": {"count": 7}}
        missing_repo = await orch.admin("POST", "/runs", json=body)
        assert missing_repo.status_code == 422
        assert missing_repo.json() == {"error": "invalid request: repo: required for a GitHub source (owner/name)"}
        by_ref = await orch.admin("POST", "/runs", json={**body, "repo": "acme/app", "ref": "release"})
        assert by_ref.status_code == 201, by_ref.text
        assert by_ref.json()["sha"] == sha and by_ref.json()["event"]["inputs"]["count"] == 7
        default = await orch.admin("POST", "/runs", json={**body, "repo": "acme/app"})
        assert default.status_code == 201 and default.json()["ref"] == "refs/heads/release"
        unknown = await orch.admin("POST", "/runs", json={**body, "repo": "acme/app", "ref": "nope"})
        assert unknown.status_code == 422 and "'nope' not found in acme/app" in unknown.text
        assert fake_github.hits["GET /repos/acme/app/commits/release"] >= 2
        assert len(await orch.runs("deploy")) == 2


async def test_invalid_ref_names_are_refused_before_the_repository_is_asked(database: Database, tmp_path: Path) -> None:
    repo, _ = schedule_repo(tmp_path / "repo")
    async with orchestrator(database, tmp_path / "data") as orch:
        await orch.add_git_source(repo)
        for ref, why in (("main..x", "it contains '..'"), ("refs/heads/a b", "it contains ' '"),
                         ("x.lock", "the component 'x.lock' ends with '.lock'"), ("-x", "it begins with '-'")):
            response = await orch.admin("POST", "/runs", json=start(ref=ref, inputs={"count": 1}))
            assert response.status_code == 422, (ref, response.text)
            assert response.json() == {"error": f"invalid request: ref: invalid ref name {ref!r}: {why}"}
        assert await orch.runs() == []
        async with database.read() as conn:
            assert [e for e in await audit.list_audit(conn, outcome="allowed") if e.action == "runs.start"] == []
