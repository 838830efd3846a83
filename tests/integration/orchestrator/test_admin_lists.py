"""The read-only admin lists on SQLite and PostgreSQL: the dispatch queue (`/queue`), agents (`/agents`,
with their busy-job counts) and the webhook event log (`/events`). Every row of another org stays
invisible. (Permissions per route are in `test_admin_auth.ROUTES`.)"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, EventLogStatus
from kici.orchestrator.store import agents, events, tokens
from kici.orchestrator.store.orgs import ensure_org

from .conftest import insert_job, insert_run

API = "/api/v1/admin"
OTHER_ORG = "other-org"


@dataclass
class Api:
    http: httpx.AsyncClient
    database: Database
    token: str

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.http.get(API + path, params=params, headers={"Authorization": f"Bearer {self.token}"})

    async def ok(self, path: str, **params: Any) -> Any:
        response = await self.get(path, **params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
async def api(database: Database, tmp_path: Path) -> AsyncIterator[Api]:
    """An in-process app called with an auditor token: the least role that may read these lists."""
    async with database.transaction() as conn:
        made = await tokens.create_admin_token(conn, name="auditor", role=AdminRole.AUDITOR)
        await ensure_org(conn, OTHER_ORG)
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url), database)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orch.test") as http:
        yield Api(http=http, database=database, token=made.plaintext)


T0 = dt.datetime(2026, 11, 27, 8, 0, tzinfo=dt.UTC)


async def _enqueue(conn: Any, run_id: str, name: str, status: str, minute: int, **values: Any) -> str:
    org_id = values.pop("org_id", "default")
    job_id = await insert_job(conn, run_id, name, status="queued", org_id=org_id)
    await conn.execute(schema.dispatch_queue.insert().values(
        job_id=job_id, run_id=run_id, org_id=org_id, status=status, created_at=T0 + dt.timedelta(minutes=minute),
        **values,
    ))
    return job_id


# -- queue ------------------------------------------------------------------------------------------


async def test_queue_lists_active_rows_oldest_first(api: Api) -> None:
    async with api.database.transaction() as conn:
        run = await insert_run(conn, workflow="ci", repo="acme/app")
        other = await insert_run(conn, workflow="deploy", repo="acme/site")
        pending = await _enqueue(conn, run, "build", "pending", 3, runs_on_labels=["linux"],
                                 exclude_labels=["slow"], expires_at=T0 + dt.timedelta(hours=1))
        dispatched = await _enqueue(conn, other, "ship", "dispatched", 1, agent_id="agent-1", dispatch_attempts=2,
                                    dispatched_at=T0 + dt.timedelta(minutes=2))
        recovering = await _enqueue(conn, run, "test", "recovering", 2, agent_id="agent-2", dispatch_attempts=1,
                                    dispatched_at=T0 + dt.timedelta(minutes=2),
                                    recovery_deadline=T0 + dt.timedelta(minutes=5))
        await _enqueue(conn, run, "done", "completed", 0, agent_id="agent-1", dispatch_attempts=1)
        await _enqueue(conn, run, "gone", "expired", 0)
        foreign = await insert_run(conn, org_id=OTHER_ORG)
        await _enqueue(conn, foreign, "theirs", "pending", 0, org_id=OTHER_ORG)

    rows = await api.ok("/queue")
    assert [r["job_id"] for r in rows] == [dispatched, recovering, pending]
    first, second, third = rows
    assert (first["job_name"], first["workflow"], first["repo"], first["status"]) == ("ship", "deploy", "acme/site",
                                                                                      "dispatched")
    assert (first["agent"], first["attempts"], first["run_id"]) == ("agent-1", 2, other)
    assert first["dispatched_seconds"] is not None and first["dispatched_seconds"] < first["age_seconds"]
    assert second["recovery_deadline"].startswith("2026-11-27T08:05:00")
    assert (third["agent"], third["attempts"], third["dispatched_seconds"]) == (None, 0, None)
    assert (third["runs_on_labels"], third["exclude_labels"]) == (["linux"], ["slow"])
    assert third["expires_at"].startswith("2026-11-27T09:00:00")
    assert third["age_seconds"] > 60  # enqueued at T0 + 3 min, in the past

    assert [r["job_id"] for r in await api.ok("/queue", status="pending")] == [pending]
    assert [r["job_id"] for r in await api.ok("/queue", status="recovering")] == [recovering]
    assert [r["job_id"] for r in await api.ok("/queue", limit=2)] == [dispatched, recovering]
    bad = await api.get("/queue", status="completed")
    assert bad.status_code == 422
    assert bad.json()["error"].startswith("invalid request: status (query): Input should be 'pending', ")
    assert (await api.get("/queue", limit=0)).status_code == 422


async def test_queue_empty(api: Api) -> None:
    assert await api.ok("/queue") == []


# -- agents -----------------------------------------------------------------------------------------


async def _agent(conn: Any, agent_id: str, *, org_id: str = "default", connected: bool = True, **kw: Any) -> None:
    token = await tokens.create_agent_token(conn, name=f"tok-{agent_id}", labels=["linux"], org_id=org_id)
    await agents.register_agent(conn, agent_id=agent_id, org_id=org_id, agent_token_id=token.token.id,
                                labels=kw.get("labels", ["linux"]), max_concurrency=kw.get("max_concurrency", 2),
                                version="0.9.1", hostname=f"{agent_id}.local")
    if not connected:
        await agents.mark_agent_disconnected(conn, agent_id)


async def test_agents_list_show_and_running_jobs(api: Api) -> None:
    async with api.database.transaction() as conn:
        await _agent(conn, "b-busy", labels=["linux", "docker"], max_concurrency=4)
        await _agent(conn, "a-idle")
        await _agent(conn, "c-gone", connected=False)
        await _agent(conn, "z-foreign", org_id=OTHER_ORG)
        run = await insert_run(conn, status="running")
        for name, status in [("r1", "running"), ("r2", "recovering"), ("r3", "cancelling"), ("q", "queued"),
                             ("s", "success"), ("f", "failed")]:
            await insert_job(conn, run, name, status=status, agent_id="b-busy")
        await insert_job(conn, run, "elsewhere", status="running", agent_id="c-gone")
        await insert_job(conn, run, "nobody", status="pending")

    listed = await api.ok("/agents")
    assert [a["id"] for a in listed] == ["a-idle", "b-busy", "c-gone"]
    busy = listed[1]
    assert busy == {
        "id": "b-busy", "labels": ["linux", "docker"], "hostname": "b-busy.local", "version": "0.9.1",
        "max_concurrency": 4, "connected": True, "draining": False, "last_seen_at": busy["last_seen_at"],
        "registered_at": busy["registered_at"], "running_jobs": 3,
    }
    assert busy["last_seen_at"] is not None and "agent_token_id" not in busy
    assert [(a["id"], a["connected"], a["running_jobs"]) for a in listed] == [
        ("a-idle", True, 0), ("b-busy", True, 3), ("c-gone", False, 1)]
    assert [a["id"] for a in await api.ok("/agents", connected="true")] == ["a-idle", "b-busy"]
    assert len(await api.ok("/agents", connected="false")) == 3

    shown = await api.ok("/agents/b-busy")
    assert shown == busy
    assert (await api.ok("/agents/c-gone"))["running_jobs"] == 1
    for unknown in ("nope", "z-foreign"):
        missing = await api.get(f"/agents/{unknown}")
        assert missing.status_code == 404
        assert missing.json() == {"error": f"no agent with id {unknown!r}"}


async def test_running_job_counts_store(database: Database) -> None:
    async with database.transaction() as conn:
        run = await insert_run(conn)
        await insert_job(conn, run, "a", status="running", agent_id="x")
        await insert_job(conn, run, "b", status="cancelling", agent_id="y")
        await insert_job(conn, run, "c", status="success", agent_id="y")
    async with database.read() as conn:
        assert await agents.running_job_counts(conn) == {"x": 1, "y": 1}
        assert await agents.running_job_counts(conn, ["y", "z"]) == {"y": 1}
        assert await agents.running_job_counts(conn, []) == {}


# -- events -----------------------------------------------------------------------------------------


async def _delivery(conn: Any, delivery_id: str, minute: int, status: EventLogStatus, *, org_id: str = "default",
                    **fields: Any) -> None:
    assert await events.begin_delivery(conn, delivery_id=delivery_id, provider="github", ttl_seconds=3600,
                                       org_id=org_id, event="push", repo="acme/app", ref="refs/heads/main",
                                       sha="b" * 40, **fields)
    if status is not EventLogStatus.RECEIVED:
        await events.finish_event_log(conn, delivery_id, status, org_id=org_id, reason=fields.get("reason"),
                                      matched_count=1 if status is EventLogStatus.PROCESSED else 0)
    # distinct, known receive times: "newest first" must not depend on the clock's resolution
    await conn.execute(schema.event_log.update().where(schema.event_log.c.delivery_id == delivery_id)
                       .values(created_at=T0 + dt.timedelta(minutes=minute)))


async def test_events_list_show(api: Api) -> None:
    async with api.database.transaction() as conn:
        await _delivery(conn, "d-old", 0, EventLogStatus.PROCESSED)
        await _delivery(conn, "d-filtered", 1, EventLogStatus.FILTERED, reason="no workflow matched")
        await _delivery(conn, "d-new", 2, EventLogStatus.PROCESSED, action="opened")
        await _delivery(conn, "d-foreign", 3, EventLogStatus.PROCESSED, org_id=OTHER_ORG)
        first = await insert_run(conn, delivery_id="d-new", workflow="ci")
        second = await insert_run(conn, delivery_id="d-new", workflow="lint",
                                  created_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))

    listed = await api.ok("/events")
    assert [e["delivery_id"] for e in listed] == ["d-new", "d-filtered", "d-old"]
    new = listed[0]
    assert (new["provider"], new["event"], new["action"], new["repo"], new["status"], new["matched_count"]) == (
        "github", "push", "opened", "acme/app", "processed", 1)
    assert new["processed_at"] is not None and "org_id" not in new and "run_ids" not in new
    assert listed[1]["reason"] == "no workflow matched"
    assert [e["delivery_id"] for e in await api.ok("/events", status="processed")] == ["d-new", "d-old"]
    assert [e["delivery_id"] for e in await api.ok("/events", limit=1)] == ["d-new"]
    bad = await api.get("/events", status="done")
    assert bad.status_code == 422 and bad.json()["error"].startswith("invalid request: status (query): ")

    shown = await api.ok("/events/d-new")
    assert shown == {**new, "run_ids": [first, second]}
    assert (await api.ok("/events/d-old"))["run_ids"] == []
    for unknown in ("nope", "d-foreign"):
        missing = await api.get(f"/events/{unknown}")
        assert missing.status_code == 404 and missing.json() == {"error": f"no delivery with id {unknown!r}"}


# -- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/queue", "/agents", "/agents/a", "/events", "/events/d"])
async def test_no_token_is_401(api: Api, path: str) -> None:
    response = await api.http.get(API + path)
    assert response.status_code == 401
    assert response.json() == {"error": "missing or invalid admin token"}
