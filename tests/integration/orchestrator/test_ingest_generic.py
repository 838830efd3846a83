"""`POST /webhook/{org}/generic/{source}`: the reference check order (404 → 413 → 429 → 401 → duplicate
idempotency key → filtered → 202), every auth method, and runs from a `generic_webhook` trigger whose lock
file comes from the source's `lock_source` (a real git repository)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.store.events import get_event_log
from kici.orchestrator.store.sources import create_source, set_source_enabled
from tests.integration.orchestrator.test_providers_git import GitRepo

WORKFLOWS = """
from kici import generic_webhook, job, step, workflow

deploy = workflow("deploy", on=[generic_webhook("hooks", events=["deploy"], match={"env": "prod"})],
                  jobs=[job("go", steps=[step("s", "echo s")])])
"""
HMAC_SECRET = "generic-secret"
TOKEN = "bearer-token-1"


@dataclass
class Env:
    http: httpx.AsyncClient
    database: Database
    key: bytes

    async def source(self, name: str, config: dict[str, Any], secrets: dict[str, str] | None = None) -> str:
        async with self.database.transaction() as conn:
            return (
                await create_source(conn, key=self.key, name=name, kind="generic", config=config, secrets=secrets)
            ).id

    async def runs(self) -> list[Any]:
        async with self.database.read() as conn:
            return list(await conn.execute(sa.select(schema.runs)))


def sign(body: bytes, secret: str = HMAC_SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@pytest.fixture
async def env(database: Database, tmp_path: Path) -> AsyncIterator[Env]:
    repo = GitRepo(tmp_path / "repo")
    repo.compile(WORKFLOWS)
    repo.commit()
    key = os.urandom(32)
    async with database.transaction() as conn:
        await create_source(conn, key=key, name="app-repo", kind="git", config={"url": str(repo.path)})
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=database.url), database, secret_key=key)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://o") as http:
        yield Env(http, database, key)


async def test_check_order(env: Env) -> None:
    src = await env.source(
        "hooks",
        {
            "auth": "hmac_sha256",
            "max_payload_bytes": 100,
            "rate_limit_rpm": 3,
            "allowed_events": ["deploy"],
            "lock_source": "app-repo",
        },
        {"hmac_secret": HMAC_SECRET},
    )
    url = "/webhook/default/generic/hooks"
    assert (await env.http.post("/webhook/default/generic/nope", content=b"{}")).status_code == 404
    big = b"{" + b" " * 200 + b"}"
    assert (await env.http.post(url, content=big, headers={"X-Signature-256": sign(big)})).status_code == 413
    body = b'{"env": "prod"}'
    unsigned = await env.http.post(url, content=body)
    assert unsigned.status_code == 401
    headers = {"X-Signature-256": "sha256=" + sign(body), "X-Event-Type": "deploy", "Idempotency-Key": "k1"}
    first = await env.http.post(url, content=body, headers=headers)
    assert first.status_code == 202 and first.json()["outcome"] == "processed", first.text
    assert first.json()["delivery_id"] == f"generic:{src}:k1"
    assert (await env.http.post(url, content=body, headers=headers)).json()["duplicate"] is True
    # three requests counted in this minute (the 404 and 413 are answered before counting): the fourth is limited
    limited = await env.http.post(url, content=body, headers=headers)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    runs = await env.runs()
    assert [r.workflow for r in runs] == ["deploy"] and runs[0].delivery_id == f"generic:{src}:k1"
    assert runs[0].event["source"] == "hooks" and runs[0].event["name"] == "deploy"


async def test_duplicates_filters_and_payload_match(env: Env) -> None:
    await env.source(
        "hooks",
        {"auth": "hmac_sha256", "allowed_events": ["deploy", "other"], "lock_source": "app-repo"},
        {"hmac_secret": HMAC_SECRET},
    )
    await env.source("second", {"auth": "none", "lock_source": "app-repo"})
    url = "/webhook/default/generic/hooks"
    body = b'{"env": "prod"}'
    raw_hex = {"X-Signature-256": sign(body), "X-Event-Type": "deploy", "Idempotency-Key": "same"}
    assert (await env.http.post(url, content=body, headers=raw_hex)).status_code == 202  # bare hex accepted
    dup = await env.http.post(url, content=body, headers=raw_hex)
    assert dup.status_code == 200 and dup.json()["duplicate"] is True
    # the same key on another source is its own delivery (but that source's name matches no trigger)
    other = await env.http.post(
        "/webhook/default/generic/second", content=body, headers={"X-Event-Type": "deploy", "Idempotency-Key": "same"}
    )
    assert other.status_code == 202 and other.json()["outcome"] == "processed"
    filtered = await env.http.post(
        url, content=body, headers={**raw_hex, "X-Event-Type": "nope", "Idempotency-Key": "f"}
    )
    assert filtered.status_code == 200 and filtered.json()["status"] == "filtered"
    staging = b'{"env": "staging"}'
    nomatch = await env.http.post(
        url, content=staging, headers={"X-Signature-256": sign(staging), "X-Event-Type": "deploy"}
    )
    assert nomatch.status_code == 202
    async with env.database.read() as conn:
        log = await get_event_log(conn, nomatch.json()["delivery_id"])
    assert log is not None and log.status == "processed" and log.matched_count == 0
    assert len(await env.runs()) == 1
    deep = await env.http.post("/webhook/default/generic/second", content=b"[" * 100_000)
    assert deep.status_code == 400


async def test_bearer_ip_allowlist_and_misconfiguration(env: Env) -> None:
    await env.source("bearer", {"auth": "bearer_token"}, {"bearer_token": TOKEN})
    await env.source("ips", {"auth": "ip_allowlist", "allowed_ips": ["10.0.0.0/8"]})
    await env.source("broken", {"auth": "hmac_sha256"})
    disabled = await env.source("off", {"auth": "none"})
    async with env.database.transaction() as conn:
        await set_source_enabled(conn, disabled, False)
    post = env.http.post
    assert (
        await post("/webhook/default/generic/bearer", content=b"{}", headers={"Authorization": "Bearer wrong"})
    ).status_code == 401
    ok = await post("/webhook/default/generic/bearer", content=b"{}", headers={"Authorization": f"bearer {TOKEN}"})
    assert ok.status_code == 202 and ok.json()["outcome"] == "lockfile_missing"  # no lock_source configured
    assert (
        await post("/webhook/default/generic/ips", content=b"{}")
    ).status_code == 401  # the ASGI client is 127.0.0.1
    assert (await post("/webhook/default/generic/broken", content=b"{}")).status_code == 500
    assert (await post("/webhook/default/generic/off", content=b"{}")).status_code == 404
    assert (await post("/webhook/default/generic/app-repo", content=b"{}")).status_code == 404, "not a generic source"


async def test_the_rate_limit_is_shared_by_every_orchestrator_on_the_database(env: Env, tmp_path: Path) -> None:
    await env.source("shared", {"auth": "none", "rate_limit_rpm": 4, "allowed_events": ["deploy"],
                                "lock_source": "app-repo"}, {})
    # a second orchestrator (its own app, its own process state) on the same database
    other_app = create_app(Settings(data_dir=tmp_path / "data2", database_url=env.database.url), env.database,
                           secret_key=env.key)
    url = "/webhook/default/generic/shared"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other_app), base_url="http://o2") as other:
        answers = []
        for i in range(6):
            client = env.http if i % 2 == 0 else other
            headers = {"X-Event-Type": "deploy", "Idempotency-Key": f"s{i}"}
            reply = await client.post(url, content=b"{}", headers=headers)
            answers.append(reply.status_code)
    assert answers == [202, 202, 202, 202, 429, 429], answers
    async with env.database.read() as conn:
        [hits] = (await conn.execute(sa.select(schema.rate_limit_windows.c.hits))).scalars().all()
    assert hits == 4, "refused requests are not counted"
