"""A git repository with scheduled and dispatchable workflows and an in-process orchestrator app (no
lifespan: the tests drive the scheduler's ticks with their own clock), for the schedule and manual-run
tests."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.container import services_of
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.store.tokens import create_admin_token
from tests.integration.orchestrator.test_providers_git import GitRepo

API = "/api/v1/admin"
HOOK_SECRET = "hook-secret"

WORKFLOWS = """
from kici import dispatch, inputs, job, push, schedule, step, workflow

build = job("build", runs_on=["linux"], steps=[step("hi", "echo hi")])
nightly = workflow("nightly", on=[schedule("* * * * *", inputs={"level": "full"})], jobs=[build])
deploy = workflow(
    "deploy",
    on=[dispatch(inputs={
        "count": inputs.number(required=True),
        "mode": inputs.choice(["fast", "slow"], default="fast"),
        "dry_run": inputs.boolean(default=False),
        "note": inputs.string(),
    })],
    jobs=[job("ship", runs_on=["linux"], steps=[step("s", "echo s")])],
)
release = workflow(
    "release",
    on=[dispatch(inputs={
        "version": inputs.string(required=True, description="the version to release"),
        "target": inputs.environment(required=True, description="where to deploy"),
        "notes": inputs.string(default="none"),
        "fallback": inputs.environment(default="staging"),
        "retries": inputs.number(default=2, description="how often to retry"),
        "verbose": inputs.boolean(required=True),
    })],
    jobs=[job("ship", runs_on=["linux"], steps=[step("s", "echo s")])],
)
ci = workflow("ci", on=[push(branches=["main"])], jobs=[job("t", runs_on=["linux"], steps=[step("t", "echo t")])])
"""


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Orch:
    app: Any
    http: httpx.AsyncClient
    database: Database
    token: dict[AdminRole, str]

    async def admin(self, method: str, path: str, role: AdminRole = AdminRole.ADMIN, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token[role]}"}
        return await self.http.request(method, API + path, headers=headers, **kwargs)

    @property
    def scheduler(self) -> Any:
        return services_of(self.app).scheduler

    async def runs(self, workflow: str | None = None) -> list[Any]:
        query = sa.select(schema.runs).order_by(schema.runs.c.created_at)
        if workflow is not None:
            query = query.where(schema.runs.c.workflow == workflow)
        async with self.database.read() as conn:
            return list(await conn.execute(query))

    async def schedules(self) -> list[dict[str, Any]]:
        response = await self.admin("GET", "/schedules")
        assert response.status_code == 200, response.text
        listed: list[dict[str, Any]] = response.json()
        return listed

    async def add_git_source(self, repo: GitRepo, name: str = "local", **config: Any) -> dict[str, Any]:
        response = await self.admin("POST", "/sources", json={
            "kind": "git", "name": name, "config": {"url": str(repo.path), "repo": "acme/app", **config},
            "secrets": {"webhook_secret": HOOK_SECRET},
        })
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    async def notify(self, source: str, ref: str, before: str, after: str) -> httpx.Response:
        data = json.dumps({"ref": ref, "before": before, "after": after}).encode()
        sig = "sha256=" + hmac.new(HOOK_SECRET.encode(), data, hashlib.sha256).hexdigest()
        return await self.http.post(f"/webhook/default/git/{source}", content=data,
                                    headers={"Content-Type": "application/json", "X-Hub-Signature-256": sig})


def schedule_repo(path: Path, source: str = WORKFLOWS) -> tuple[GitRepo, str]:
    repo = GitRepo(path)
    repo.write("README.md", "hello\n")
    repo.compile(source)
    return repo, repo.commit("workflows")


@asynccontextmanager
async def orchestrator(database: Database, data_dir: Path) -> AsyncIterator[Orch]:
    async with database.transaction() as conn:
        made = {role: await create_admin_token(conn, name=f"{role.value}-token", role=role) for role in AdminRole}
    key = os.urandom(32)
    app = create_app(Settings(data_dir=data_dir, database_url=database.url), database, secret_key=key)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator") as http:
        yield Orch(app, http, database, {r: c.plaintext for r, c in made.items()})


def next_fire(database_url: str) -> dt.datetime | None:
    """The (one) schedule registration's next slot, read from the database; None before it exists."""
    async def read() -> dt.datetime | None:
        db = Database.connect(database_url)
        try:
            async with db.transaction() as conn:
                value = (await conn.execute(sa.select(schema.schedules.c.next_fire_at))).scalar_one_or_none()
        finally:
            await db.close()
        assert value is None or isinstance(value, dt.datetime)
        return value

    return asyncio.run(read())


def set_next_fire(database_url: str, when: dt.datetime) -> None:
    """Move every schedule's next slot to `when`: a test brings a slot forward instead of waiting for a
    minute boundary (or makes one overdue, as after a downtime)."""
    async def update() -> None:
        db = Database.connect(database_url)
        try:
            async with db.transaction() as conn:
                await conn.execute(schema.schedules.update().values(next_fire_at=when))
        finally:
            await db.close()

    asyncio.run(update())
