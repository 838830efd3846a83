"""`POST /webhook/{org}/github` end to end, on SQLite and PostgreSQL: GitHub's published payloads posted
byte for byte and signed as GitHub signs them, lock files compiled by the real `kici compile` and served
by a local fake of GitHub's REST API, runs created by the runs store."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.container import ingest_for
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.store.events import EventLogEntry, get_event_log
from kici.orchestrator.store.schedules import list_schedules
from kici.orchestrator.store.sources import Source, create_source, set_source_enabled, update_source
from tests.integration.orchestrator.test_providers_git import compile_into
from tests.integration.orchestrator.test_providers_github import FakeGitHub, fake_github  # noqa: F401
from tests.paths import GITHUB_FIXTURES

FIXTURE_DIR = GITHUB_FIXTURES

SECRET = "It's a Secret to Everybody"
APP_ID = 29310
HELLO = "Codertocat/Hello-World"
OCTO = "octo-org/octo-repo"
PUBLIC = "baxterthehacker/public-repo"
INITIAL = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
HEAD = "ec26c3e57ca3a959ca5aad62de7213c562f8c821"
BASE = "f95f852bd8fca8fcc58a9a2d6c842781e32a215e"
CHANGES = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"


@pytest.fixture(scope="module")
def lock_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return compile_into(tmp_path_factory.mktemp("lock"))


@dataclass
class Env:
    http: httpx.AsyncClient
    database: Database
    fake: FakeGitHub
    source: Source
    key: bytes
    lock: bytes
    dispatched: list[list[str]] = field(default_factory=list)

    async def deliver(
        self,
        fixture: str,
        *,
        delivery: str | None = None,
        secret: str | None = SECRET,
        body: bytes | None = None,
        app_id: int | None = APP_ID,
        org: str = "default",
        event: str | None = None,
    ) -> httpx.Response:
        data = body if body is not None else (FIXTURE_DIR / fixture).read_bytes()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/044aadd",
            "X-GitHub-Event": event or fixture.split(".")[0],
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-GitHub-Hook-ID": "1",
            "X-GitHub-Hook-Installation-Target-Type": "integration",
        }
        if app_id is not None:
            headers["X-GitHub-Hook-Installation-Target-ID"] = str(app_id)
        if secret is not None:
            headers["X-Hub-Signature-256"] = "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()
        return await self.http.post(f"/webhook/{org}/github", content=data, headers=headers)

    async def runs(self, delivery_id: str | None = None) -> list[Any]:
        query = sa.select(schema.runs).order_by(schema.runs.c.workflow)
        if delivery_id is not None:
            query = query.where(schema.runs.c.delivery_id == delivery_id)
        async with self.database.read() as conn:
            return list(await conn.execute(query))

    async def log(self, delivery_id: str) -> EventLogEntry | None:
        async with self.database.read() as conn:
            return await get_event_log(conn, delivery_id)

    async def dedup_rows(self) -> int:
        async with self.database.read() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(schema.dedup_cache))).scalar_one())


def make_app(database: Database, tmp_path: Path, key: bytes, dispatched: list[list[str]]) -> Any:
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=database.url), database, secret_key=key)

    async def hook(run_ids: Sequence[str]) -> None:
        dispatched.append(list(run_ids))

    ingest_for(app).on_runs_created = hook
    return app


@pytest.fixture
async def env(database: Database, tmp_path: Path, fake_github: FakeGitHub, lock_bytes: bytes) -> AsyncIterator[Env]:  # noqa: F811
    key = os.urandom(32)
    async with database.transaction() as conn:
        source = await create_source(
            conn,
            key=key,
            name="github",
            kind="github",
            config={"app_id": APP_ID, "api_url": fake_github.url},
            secrets={"webhook_secret": SECRET, "private_key": fake_github.private_key_pem},
        )
    for sha in (INITIAL, HEAD, BASE):
        fake_github.files[(HELLO, sha)] = lock_bytes
    fake_github.files[(PUBLIC, CHANGES)] = lock_bytes
    fake_github.refs[(HELLO, "master")] = INITIAL
    fake_github.installations.update({HELLO: 1, PUBLIC: 7, OCTO: 375706})
    fake_github.compare[(HELLO, BASE, HEAD)] = ["src/app.py", "README.md"]
    dispatched: list[list[str]] = []
    app = make_app(database, tmp_path, key, dispatched)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator") as http:
        yield Env(http, database, fake_github, source, key, lock_bytes, dispatched)


async def test_push_matching_two_workflows_creates_two_runs(env: Env) -> None:
    delivery = str(uuid.uuid4())
    response = await env.deliver("push.branch-created.json", delivery=delivery)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "accepted" and body["delivery_id"] == delivery and body["outcome"] == "processed"
    runs = await env.runs(delivery)
    assert [r.workflow for r in runs] == ["ci", "lint"]
    assert len({r.id for r in runs}) == 2 and {r.sha for r in runs} == {INITIAL} and {r.repo for r in runs} == {HELLO}
    assert {r.source_id for r in runs} == {env.source.id} and {r.ref for r in runs} == {"refs/heads/master"}
    assert runs[0].event["type"] == "push" and runs[0].event["delivery_id"] == delivery
    log = await env.log(delivery)
    assert log is not None and log.status == "processed" and log.matched_count == 2 and log.reason == "matched ci, lint"
    assert log.provider == "github" and log.event == "push" and log.repo == HELLO and log.sha == INITIAL
    assert env.dispatched == [body["run_ids"]]
    assert set(env.dispatched[0]) == {r.id for r in runs}
    async with env.database.read() as conn:
        jobs = list(await conn.execute(sa.select(schema.jobs).where(schema.jobs.c.run_id.in_([r.id for r in runs]))))
    assert sorted(j.name for j in jobs) == ["build", "lint"]


@pytest.mark.parametrize("signature", ["missing", "wrong-secret", "reserialised", "garbage"])
async def test_bad_signature_is_401_and_leaves_nothing(env: Env, signature: str) -> None:
    delivery = str(uuid.uuid4())
    if signature == "missing":
        response = await env.deliver("push.branch-created.json", delivery=delivery, secret=None)
    elif signature == "wrong-secret":
        response = await env.deliver("push.branch-created.json", delivery=delivery, secret="not it")
    elif signature == "reserialised":  # signed over the file, but the body was re-serialised on the way
        data = (FIXTURE_DIR / "push.branch-created.json").read_bytes()
        sig = "sha256=" + hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest()
        compact = json.dumps(json.loads(data)).encode()
        response = await env.http.post(
            "/webhook/default/github",
            content=compact,
            headers={
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": delivery,
                "X-GitHub-Hook-Installation-Target-ID": str(APP_ID),
                "X-Hub-Signature-256": sig,
            },
        )
    else:
        response = await env.http.post(
            "/webhook/default/github",
            content=b"{}",
            headers={
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": delivery,
                "X-GitHub-Hook-Installation-Target-ID": str(APP_ID),
                "X-Hub-Signature-256": "sha256=zz",
            },
        )
    assert response.status_code == 401
    assert await env.runs() == [] and await env.dedup_rows() == 0 and await env.log(delivery) is None
    # the genuine delivery with that id afterwards is not a duplicate
    assert (await env.deliver("push.branch-created.json", delivery=delivery)).status_code == 202


async def test_same_delivery_twice_is_a_duplicate_even_after_a_restart(
    env: Env, database: Database, tmp_path: Path
) -> None:
    delivery = str(uuid.uuid4())
    assert (await env.deliver("push.tag-created.json", delivery=delivery)).status_code == 202
    again = await env.deliver("push.tag-created.json", delivery=delivery)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert [r.workflow for r in await env.runs(delivery)] == ["release"]
    # a new app (a restarted orchestrator) on the same database still knows the delivery
    restarted = make_app(database, tmp_path / "second", env.key, [])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=restarted), base_url="http://o") as http:
        env2 = Env(http, database, env.fake, env.source, env.key, env.lock)
        third = await env2.deliver("push.tag-created.json", delivery=delivery)
    assert third.status_code == 200 and third.json()["duplicate"] is True
    assert len(await env.runs(delivery)) == 1 and await env.dedup_rows() == 1
    log = await env.log(delivery)
    assert log is not None and log.status == "processed"


async def test_dedup_outlives_the_dedup_ttl_through_the_event_log(env: Env) -> None:
    delivery = str(uuid.uuid4())
    assert (await env.deliver("push.tag-created.json", delivery=delivery)).status_code == 202
    async with env.database.transaction() as conn:
        await conn.execute(schema.dedup_cache.delete())
    again = await env.deliver("push.tag-created.json", delivery=delivery)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert len(await env.runs(delivery)) == 1


async def test_unknown_or_disabled_source_is_404(env: Env) -> None:
    assert (await env.deliver("push.branch-created.json", app_id=999)).status_code == 404
    assert (await env.deliver("push.branch-created.json", org="nope")).status_code == 404
    # no target-id header: the org's only GitHub source is used
    assert (await env.deliver("push.tag-created.json", app_id=None)).status_code == 202
    async with env.database.transaction() as conn:
        await set_source_enabled(conn, env.source.id, False)
    assert (await env.deliver("push.branch-created.json")).status_code == 404
    assert (await env.deliver("push.branch-created.json", app_id=None)).status_code == 404
    assert len(await env.runs()) == 1


async def test_oversize_body_is_413(env: Env) -> None:
    big = b"{" + b" " * (1024 * 1024) + b"}"
    assert (await env.deliver("push.branch-created.json", body=big)).status_code == 413
    async with env.database.transaction() as conn:
        await update_source(conn, env.source.id, config={**env.source.config, "max_payload_bytes": 4096})
    response = await env.deliver("push.branch-created.json")  # 8827 bytes
    assert response.status_code == 413 and await env.dedup_rows() == 0


async def test_no_lock_file_at_the_sha_is_accepted_without_runs(env: Env) -> None:
    env.fake.files.pop((HELLO, INITIAL))
    delivery = str(uuid.uuid4())
    response = await env.deliver("push.branch-created.json", delivery=delivery)
    assert response.status_code == 202 and response.json()["outcome"] == "lockfile_missing"
    assert await env.runs() == [] and env.dispatched == []
    log = await env.log(delivery)
    assert log is not None and log.status == "lockfile_missing" and log.matched_count == 0
    assert log.reason == f"no .kici/kici.lock.json at {INITIAL}"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"schemaVersion": 999, "contentHash": "x", "workflows": []}', "schemaVersion 999 is not supported"),
        (None, "contentHash"),  # a hand-edited lock file
    ],
)
async def test_corrupt_lock_file_gives_one_failed_run(env: Env, content: bytes | None, reason: str) -> None:
    if content is None:
        content = env.lock.replace(b'"master"', b'"trunk"', 1)
    env.fake.files[(HELLO, INITIAL)] = content
    delivery = str(uuid.uuid4())
    response = await env.deliver("push.branch-created.json", delivery=delivery)
    assert response.status_code == 202 and response.json()["outcome"] == "lockfile_corrupt"
    runs = await env.runs()
    assert len(runs) == 1 and runs[0].status == "failed" and runs[0].workflow == "lock_resolution"
    assert runs[0].delivery_id == delivery and reason in (runs[0].failure_reason or "")
    log = await env.log(delivery)
    assert log is not None and log.status == "lockfile_corrupt" and reason in (log.reason or "")


async def test_branch_outside_every_filter_gives_no_run(env: Env) -> None:
    delivery = str(uuid.uuid4())
    response = await env.deliver("push.branch-with-commits.json", delivery=delivery)
    assert response.status_code == 202 and response.json()["outcome"] == "processed"
    assert await env.runs() == []
    log = await env.log(delivery)
    assert log is not None and log.status == "processed" and log.matched_count == 0
    assert log.reason == "no workflow matched"
    # docs/** filters on paths: the push payload's file list (README.md) was complete, so no compare call
    assert not any("/compare/" in k for k in env.fake.hits)
    assert env.fake.hits[f"GET /repos/{PUBLIC}/installation"] == 1, "no installation in the payload: looked up"


async def test_second_delivery_for_the_same_commit_does_not_refetch_the_lock_file(env: Env) -> None:
    assert (await env.deliver("push.branch-created.json")).status_code == 202
    assert (await env.deliver("status.json")).status_code == 202  # the same repo and sha
    assert (await env.deliver("check_suite.requested.json")).status_code == 202  # another sha
    assert env.fake.lock_fetches(HELLO) == 2


async def test_pull_request_paths_use_the_compare_api(env: Env) -> None:
    delivery = str(uuid.uuid4())
    response = await env.deliver("pull_request.opened.json", delivery=delivery)
    assert response.status_code == 202
    assert [r.workflow for r in await env.runs(delivery)] == ["lint"]
    assert env.fake.hits[f"GET /repos/{HELLO}/compare/{BASE}...{HEAD}"] == 1
    run = (await env.runs(delivery))[0]
    assert run.event["changed_files"] == ["README.md", "src/app.py"] and run.sha == HEAD
    env.fake.compare[(HELLO, BASE, HEAD)] = ["docs/readme.md"]
    env.fake.refs.clear()
    other = str(uuid.uuid4())
    assert (await env.deliver("pull_request.synchronize.json", delivery=other)).status_code == 202
    assert await env.runs(other) == []


async def test_host_failure_is_logged_as_failed(env: Env) -> None:
    env.fake.fail_with = 502
    delivery = str(uuid.uuid4())
    response = await env.deliver("push.branch-created.json", delivery=delivery)
    assert response.status_code == 202 and response.json()["outcome"] == "failed"
    log = await env.log(delivery)
    assert log is not None and log.status == "failed" and "HTTP 502" in (log.reason or "")
    assert await env.runs() == []


async def test_wrong_secret_key_is_a_500_not_a_401(env: Env, database: Database, tmp_path: Path) -> None:
    app = make_app(database, tmp_path / "other", os.urandom(32), [])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://o") as http:
        response = await Env(http, database, env.fake, env.source, env.key, env.lock).deliver(
            "push.branch-created.json"
        )
    assert response.status_code == 500 and await env.dedup_rows() == 0


# file → (HTTP status, outcome or "filtered", workflows run)
EXPECTED: dict[str, tuple[int, str, list[str]]] = {
    "check_suite.requested.json": (202, "processed", []),
    "create.json": (202, "processed", []),
    "delete.json": (202, "processed", []),
    "fork.json": (202, "processed", []),
    "installation.created.json": (200, "filtered", []),
    "installation.deleted.json": (200, "filtered", []),
    "installation_repositories.added.json": (200, "filtered", []),
    "issue_comment.created.json": (202, "processed", []),
    "ping.json": (200, "filtered", []),
    "pull_request.closed.json": (202, "processed", ["lint"]),
    "pull_request.labeled.json": (202, "processed", []),
    "pull_request.opened.json": (202, "processed", ["lint"]),
    "pull_request.reopened.json": (202, "processed", ["lint"]),
    "pull_request.synchronize.json": (202, "processed", ["lint"]),
    "pull_request_review.submitted.json": (202, "processed", []),
    "pull_request_review_comment.created.json": (202, "processed", []),
    "push.branch-created.json": (202, "processed", ["ci", "lint"]),
    "push.branch-with-commits.json": (202, "processed", []),
    "push.tag-created.json": (202, "processed", ["release"]),
    "push.tag-deleted.json": (200, "filtered", []),
    "release.created.json": (202, "processed", []),
    "release.published.json": (202, "processed", []),
    "repository_dispatch.on-demand-test.json": (202, "lockfile_missing", []),
    "star.created.json": (202, "processed", []),
    "status.json": (202, "processed", []),
    "watch.started.json": (202, "processed", []),
    "workflow_run.completed.json": (202, "lockfile_missing", []),
}


async def test_every_published_payload(env: Env) -> None:
    files = sorted(p.name for p in FIXTURE_DIR.glob("*.json"))
    assert files == sorted(EXPECTED), "a fixture was added or removed: extend EXPECTED"
    for name in files:
        status, outcome, workflows = EXPECTED[name]
        delivery = str(uuid.uuid4())
        response = await env.deliver(name, delivery=delivery)
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert (body["status"] if status == 200 else body["outcome"]) == outcome, (name, body)
        assert [r.workflow for r in await env.runs(delivery)] == workflows, name
        log = await env.log(delivery)
        assert log is not None and log.status == outcome and log.matched_count == len(workflows), (name, log)
        if outcome == "filtered":
            assert log.reason, name
    # events without a commit ran on the default branch's head, resolved once per delivery
    assert env.fake.hits[f"GET /repos/{HELLO}/commits/master"] >= 1
    # every Codertocat commit's lock file was fetched once, however many deliveries named it
    assert env.fake.lock_fetches(HELLO) == 3


async def test_concurrent_redeliveries_create_one_run_set(env: Env) -> None:
    delivery = str(uuid.uuid4())
    responses = await asyncio.gather(*(env.deliver("push.tag-created.json", delivery=delivery) for _ in range(5)))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 200, 202]
    assert len(await env.runs(delivery)) == 1 and await env.dedup_rows() == 1


async def test_fork_pull_request_reads_the_lock_file_at_the_base_commit(env: Env) -> None:
    payload = json.loads((FIXTURE_DIR / "pull_request.opened.json").read_bytes())
    payload["pull_request"]["head"]["repo"]["full_name"] = "mallory/Hello-World"
    env.fake.files.pop((HELLO, HEAD))  # whatever the fork's head holds is never read
    delivery = str(uuid.uuid4())
    response = await env.deliver("pull_request.opened.json", delivery=delivery, body=json.dumps(payload).encode())
    assert response.status_code == 202 and response.json()["outcome"] == "processed", response.text
    runs = await env.runs(delivery)
    assert [r.workflow for r in runs] == ["lint"] and runs[0].sha == HEAD
    assert env.fake.lock_fetches(HELLO) == 1


async def test_no_delivery_id_or_no_json_is_400_after_the_signature(env: Env) -> None:
    data = (FIXTURE_DIR / "push.branch-created.json").read_bytes()
    sig = "sha256=" + hmac.new(SECRET.encode(), data, hashlib.sha256).hexdigest()
    headers = {
        "X-GitHub-Event": "push",
        "X-GitHub-Hook-Installation-Target-ID": str(APP_ID),
        "X-Hub-Signature-256": sig,
    }
    assert (await env.http.post("/webhook/default/github", content=data, headers=headers)).status_code == 400
    assert (await env.deliver("push.branch-created.json", body=b"[" * 100_000)).status_code == 400
    assert await env.dedup_rows() == 0 and await env.runs() == []


async def test_oversized_lock_file_is_a_corrupt_one(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kici.orchestrator.providers.github.MAX_LOCK_FILE_BYTES", 100)
    delivery = str(uuid.uuid4())
    response = await env.deliver("push.branch-created.json", delivery=delivery)
    assert response.status_code == 202 and response.json()["outcome"] == "lockfile_corrupt"
    runs = await env.runs(delivery)
    assert len(runs) == 1 and runs[0].status == "failed" and "over the 100-byte limit" in (runs[0].failure_reason or "")


async def test_push_to_the_default_branch_registers_schedules(env: Env, tmp_path: Path) -> None:
    """The payload's `repository.default_branch` says which pushes (re)register a repository's schedules."""
    scheduled = compile_into(tmp_path / "scheduled", 'from kici import job, schedule, step, workflow\n'
                             'nightly = workflow("nightly", on=[schedule("30 2 * * *", timezone="Asia/Tokyo")],\n'
                             '                   jobs=[job("j", steps=[step("s", "echo s")])])\n')
    env.fake.files[(HELLO, INITIAL)] = scheduled
    assert (await env.deliver("push.branch-created.json")).status_code == 202  # refs/heads/master, the default
    async with env.database.read() as conn:
        [registered] = await list_schedules(conn)
    assert (registered.repo, registered.branch, registered.workflow, registered.lock_commit) == (
        HELLO, "master", "nightly", INITIAL)
    assert (registered.cron, registered.timezone, registered.source) == ("30 2 * * *", "Asia/Tokyo", "github")


async def test_a_push_to_an_invalid_ref_name_is_filtered_not_run(env: Env) -> None:
    payload = json.loads((FIXTURE_DIR / "push.branch-with-commits.json").read_text())
    for ref, why in (("refs/heads/feature..x", "it contains '..'"), ("refs/heads/a:b", "it contains ':'"),
                     ("refs/heads/@{-1}", "it contains '@{'")):
        delivery = str(uuid.uuid4())
        response = await env.deliver("push.json", delivery=delivery, body=json.dumps({**payload, "ref": ref}).encode())
        assert response.status_code == 200, response.text
        assert response.json()["reason"] == f"invalid ref name {ref!r}: {why}"
        log = await env.log(delivery)
        assert log is not None and (log.status, log.reason) == ("filtered", f"invalid ref name {ref!r}: {why}")
    assert await env.runs() == [] and not any("/contents/" in k for k in env.fake.hits)
