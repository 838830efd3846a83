"""`POST /webhook/{org}/git/{source}` end to end with real git repositories: the notification a
post-receive / post-commit hook sends, the lock file and changed files read with git, on SQLite and
PostgreSQL — and once through a real `kici-orchestrator` process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.container import services_of
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.ingest.poller import GitPoller
from kici.orchestrator.routes.admin_sources import hook_script
from kici.orchestrator.store.events import get_event_log
from kici.orchestrator.store.sources import Source, create_source, set_source_enabled, update_source
from tests.integration.orchestrator.conftest import StartOrchestrator
from tests.integration.orchestrator.test_providers_git import GIT_ENV, GitRepo

SECRET = "hook-secret"
ZERO = "0" * 40


def signed(body: dict[str, Any], secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    data = json.dumps(body).encode()
    sig = "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()
    return data, {"Content-Type": "application/json", "X-Hub-Signature-256": sig}


@dataclass
class Env:
    app: Any
    http: httpx.AsyncClient
    database: Database
    repo: GitRepo
    source: Source
    shas: dict[str, str]

    async def notify(
        self, ref: str, before: str, after: str, *, source: str | None = None, secret: str = SECRET, **headers: str
    ) -> httpx.Response:
        data, hdrs = signed({"ref": ref, "before": before, "after": after}, secret)
        hdrs.update(headers)
        return await self.http.post(f"/webhook/default/git/{source or self.source.name}", content=data, headers=hdrs)

    async def runs(self, delivery_id: str | None = None) -> list[Any]:
        query = sa.select(schema.runs).order_by(schema.runs.c.created_at, schema.runs.c.workflow)
        if delivery_id is not None:
            query = query.where(schema.runs.c.delivery_id == delivery_id)
        async with self.database.read() as conn:
            return list(await conn.execute(query))


def build_repo(path: Path) -> tuple[GitRepo, dict[str, str]]:
    repo = GitRepo(path)
    repo.write("README.md", "hello\n")
    shas = {"bare": repo.commit("no lock file")}
    repo.compile()
    shas["main1"] = repo.commit("add kici")
    repo.write("src/a.py", "a = 1\n")
    shas["main2"] = repo.commit("code")
    repo.git("checkout", "-q", "-b", "changes")
    repo.write("docs/guide.md", "guide\n")
    shas["docs"] = repo.commit("docs")
    repo.write("src/b.py", "b = 1\n")
    shas["code"] = repo.commit("code on changes")
    repo.git("checkout", "-q", "main")
    return repo, shas


@pytest.fixture
async def env(database: Database, tmp_path: Path) -> AsyncIterator[Env]:
    repo, shas = build_repo(tmp_path / "repo")
    key = os.urandom(32)
    async with database.transaction() as conn:
        source = await create_source(
            conn,
            key=key,
            name="local",
            kind="git",
            config={"url": str(repo.path), "repo": "acme/app"},
            secrets={"webhook_secret": SECRET},
        )
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=database.url), database, secret_key=key)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator") as http:
        yield Env(app, http, database, repo, source, shas)


async def test_push_notification_runs_matching_workflows(env: Env) -> None:
    response = await env.notify("refs/heads/main", env.shas["main1"], env.shas["main2"])
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["outcome"] == "processed" and body["delivery_id"].startswith(f"git:{env.source.id}:")
    runs = await env.runs(body["delivery_id"])
    assert [r.workflow for r in runs] == ["ci"]
    assert runs[0].repo == "acme/app" and runs[0].sha == env.shas["main2"] and runs[0].ref == "refs/heads/main"
    # the hook prints these: no KICI_PUBLIC_URL here, so no dashboard URL
    assert body["run_ids"] == [runs[0].id] and body["runs"] == [{"id": runs[0].id, "url": None}]
    async with env.database.read() as conn:
        log = await get_event_log(conn, body["delivery_id"])
    assert log is not None and log.status == "processed" and log.provider == "git" and log.matched_count == 1
    # the same notification again (a hook retry) is a duplicate
    again = await env.notify("refs/heads/main", env.shas["main1"], env.shas["main2"])
    assert again.status_code == 200 and again.json()["duplicate"] is True
    # addressed by id as well as by name
    by_id = await env.notify("refs/heads/main", env.shas["bare"], env.shas["main2"], source=env.source.id)
    assert by_id.status_code == 202 and len(await env.runs()) == 2
    bad = await env.notify("refs/heads/main", env.shas["bare"], env.shas["main2"], secret="wrong")
    assert bad.status_code == 401
    metrics = (await env.http.get("/metrics")).text
    assert 'kici_webhooks_received_total{outcome="accepted",provider="git"} 2.0' in metrics
    assert 'kici_webhooks_received_total{outcome="duplicate",provider="git"} 1.0' in metrics
    assert 'kici_webhooks_received_total{outcome="rejected_401",provider="git"} 1.0' in metrics


async def test_paths_are_read_with_git_diff(env: Env) -> None:
    docs = await env.notify("refs/heads/changes", env.shas["main2"], env.shas["docs"])
    assert [r.workflow for r in await env.runs(docs.json()["delivery_id"])] == ["docs"]
    code = await env.notify("refs/heads/changes", env.shas["docs"], env.shas["code"])
    assert code.status_code == 202 and await env.runs(code.json()["delivery_id"]) == []
    # a new branch (before all zeros) is compared with the default branch: docs/ changed since main
    new = await env.notify("refs/heads/changes", ZERO, env.shas["code"], **{"X-Kici-Delivery": "new-branch"})
    assert [r.workflow for r in await env.runs(new.json()["delivery_id"])] == ["docs"]
    assert new.json()["delivery_id"] == f"git:{env.source.id}:new-branch"


async def test_tags_deletions_and_missing_lock_files(env: Env) -> None:
    env.repo.git("tag", "v1.0", env.shas["main2"])
    tag = await env.notify("refs/tags/v1.0", ZERO, env.shas["main2"])
    assert [r.workflow for r in await env.runs(tag.json()["delivery_id"])] == ["release"]
    deleted = await env.notify("refs/heads/gone", env.shas["main2"], ZERO)
    assert deleted.status_code == 200 and deleted.json()["status"] == "filtered"
    missing = await env.notify("refs/heads/main", ZERO, env.shas["bare"])
    assert missing.status_code == 202 and missing.json()["outcome"] == "lockfile_missing"
    unknown = await env.notify("refs/heads/main", ZERO, "1" * 40)
    assert unknown.status_code == 202 and unknown.json()["outcome"] == "failed"
    assert len(await env.runs()) == 1


async def test_rejections(env: Env) -> None:
    assert (await env.notify("refs/heads/main", ZERO, env.shas["main2"], secret="wrong")).status_code == 401
    assert (await env.notify("refs/heads/main", ZERO, env.shas["main2"], source="nope")).status_code == 404
    async with env.database.read() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(schema.dedup_cache))).scalar_one() == 0
    async with env.database.transaction() as conn:
        await set_source_enabled(conn, env.source.id, False)
    assert (await env.notify("refs/heads/main", ZERO, env.shas["main2"])).status_code == 404
    assert await env.runs() == []


async def test_mirrored_source(database: Database, tmp_path: Path) -> None:
    repo, shas = build_repo(tmp_path / "repo")
    key = os.urandom(32)
    async with database.transaction() as conn:
        await create_source(
            conn,
            key=key,
            name="mirrored",
            kind="git",
            config={"url": f"file://{repo.path}", "mirror": True},
            secrets={"webhook_secret": SECRET},
        )
    data_dir = tmp_path / "data"
    app = create_app(Settings(data_dir=data_dir, database_url=database.url), database, secret_key=key)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://o") as http:
        data, headers = signed({"ref": "refs/heads/main", "before": shas["main1"], "after": shas["main2"]})
        response = await http.post("/webhook/default/git/mirrored", content=data, headers=headers)
    assert response.status_code == 202 and response.json()["outcome"] == "processed"
    assert len(list((data_dir / "git-mirrors").glob("*.git"))) == 1


async def test_through_a_real_orchestrator_process(start_orchestrator: StartOrchestrator, tmp_path: Path) -> None:
    repo, shas = build_repo(tmp_path / "repo")
    key = os.urandom(32)
    db_url = f"sqlite:///{tmp_path / 'orch' / 'kici.db'}"
    proc = start_orchestrator(
        {"KICI_DATABASE_URL": db_url, "KICI_SECRET_KEY": key.hex(), "KICI_DATA_DIR": str(tmp_path / "orch")}
    )
    url = proc.url
    async with httpx.AsyncClient(base_url=url) as http:  # ready = migrated
        for _ in range(300):
            if (await http.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
    database = Database.connect(db_url)
    try:
        async with database.transaction() as conn:
            await create_source(
                conn,
                key=key,
                name="local",
                kind="git",
                config={"url": str(repo.path)},
                secrets={"webhook_secret": SECRET},
            )
        data, headers = signed({"ref": "refs/heads/main", "before": shas["main1"], "after": shas["main2"]})
        async with httpx.AsyncClient(base_url=url) as http:
            first = await http.post("/webhook/default/git/local", content=data, headers=headers)
            second = await http.post("/webhook/default/git/local", content=data, headers=headers)
        assert first.status_code == 202 and first.json()["outcome"] == "processed", first.text
        assert second.status_code == 200 and second.json()["duplicate"] is True
        async with database.read() as conn:
            runs = list(await conn.execute(sa.select(schema.runs.c.workflow)))
        assert [r.workflow for r in runs] == ["ci"]

        # the generated hook, as post-commit: it prints the run it started — only the id, since this
        # orchestrator has no KICI_PUBLIC_URL — and, for a repeated notification, that nothing started
        if all(shutil.which(tool) for tool in ("curl", "openssl")):
            hook = repo.path / ".git" / "hooks" / "post-commit"
            hook.write_text(hook_script("local", f"{url}/webhook/default/git/local", SECRET))
            hook.chmod(0o700)
            repo.write("src/c.py", "c = 1\n")
            repo.git("add", "-A")
            committed = await asyncio.to_thread(
                subprocess.run, ["git", "-C", str(repo.path), "commit", "-m", "hooked"], capture_output=True,
                text=True, env=GIT_ENV, check=True, timeout=60)
            async with database.read() as conn:
                run_ids = [r.id for r in await conn.execute(
                    sa.select(schema.runs.c.id).where(schema.runs.c.sha == repo.git("rev-parse", "HEAD")))]
            assert len(run_ids) == 1
            assert f"kici: refs/heads/main: run {run_ids[0]}\n" in committed.stderr, committed.stderr
            again = await asyncio.to_thread(
                subprocess.run, ["sh", str(hook)], cwd=repo.path, capture_output=True, text=True, env=GIT_ENV,
                stdin=subprocess.DEVNULL, check=True, timeout=60)
            assert again.stdout == "kici: refs/heads/main: no run started (already notified)\n", again
    finally:
        await database.close()
        await asyncio.to_thread(proc.stop)


async def _poll_source(env: Env, seconds: int | None) -> GitPoller:
    async with env.database.transaction() as conn:
        await update_source(conn, env.source.id, config={**env.source.config, "poll_seconds": seconds})
    return GitPoller(env.app.state.kici, services_of(env.app).intake)


async def test_polling_reports_moved_and_new_branches_once(env: Env) -> None:
    poller = await _poll_source(env, 30)
    assert await poller.poll(env.source.id) == []  # the first poll records where the branches are
    assert await env.runs() == []
    env.repo.write("src/c.py", "c = 1\n")
    moved = env.repo.commit("more code")
    assert await poller.poll(env.source.id) == ["refs/heads/main"]
    [run] = await env.runs()
    assert run.workflow == "ci" and run.sha == moved and run.ref == "refs/heads/main"
    assert await poller.poll(env.source.id) == []  # nothing moved since
    # the hook reporting the same update is the same delivery: no second run
    again = await env.notify("refs/heads/main", env.shas["main2"], moved)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    # a new branch is reported with before = zeros; a deleted one is forgotten
    env.repo.git("branch", "feature", moved)
    env.repo.git("branch", "-D", "changes")
    assert await poller.poll(env.source.id) == ["refs/heads/feature"]
    async with env.database.read() as conn:
        refs = dict(list(await conn.execute(sa.select(schema.git_refs.c.ref, schema.git_refs.c.sha))))
    assert refs == {"refs/heads/main": moved, "refs/heads/feature": moved}


async def test_poll_ticks_follow_poll_seconds(env: Env) -> None:
    poller = await _poll_source(env, 5)
    assert await poller.tick(now=100.0) == [env.source.id]
    assert await poller.tick(now=103.0) == []  # not due yet
    assert await poller.tick(now=105.5) == [env.source.id]
    await _poll_source(env, None)
    assert await poller.tick(now=200.0) == []  # polling switched off


async def test_a_rotated_webhook_secret_takes_effect_at_once(env: Env) -> None:
    first = await env.notify("refs/heads/main", env.shas["main1"], env.shas["main2"])
    assert first.status_code == 202  # the secret is now cached by the process
    async with env.database.transaction() as conn:
        await update_source(conn, env.source.id, key=env.app.state.kici.secret_key,
                            secrets={"webhook_secret": "rotated"})
    stale = await env.notify("refs/heads/main", env.shas["bare"], env.shas["main2"])
    assert stale.status_code == 401
    fresh = await env.notify("refs/heads/main", env.shas["bare"], env.shas["main2"], secret="rotated")
    assert fresh.status_code == 202


async def test_a_push_to_an_invalid_ref_name_is_filtered_with_a_reason(env: Env) -> None:
    for ref, why in (("refs/heads/a..b", "it contains '..'"), ("refs/heads/x.lock", "the component 'x.lock' ends "
                     "with '.lock'"), ("refs/heads/bad\x01name", "it contains the control character '\\x01'"),
                     ("refs/tags/v1^{}", "it contains '^'")):
        response = await env.notify(ref, env.shas["main1"], env.shas["main2"])
        assert response.status_code == 200, (ref, response.text)
        body = response.json()
        assert body["status"] == "filtered" and body["reason"] == f"invalid ref name {ref!r}: {why}", body
        async with env.database.read() as conn:
            log = await get_event_log(conn, body["delivery_id"])
        assert log is not None and (log.status, log.reason) == ("filtered", body["reason"])
    assert await env.runs() == []
