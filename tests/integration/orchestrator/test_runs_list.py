"""The runs list (issue 8's filters and cursor paging) on SQLite and PostgreSQL: the store's `find_runs`
(one query, keyset paging) and `GET /api/v1/admin/runs` on top of it."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.engine.events import Event
from kici.engine.lockfile import Workflow
from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, SourceKind
from kici.orchestrator.store import runs as store
from kici.orchestrator.store import tokens
from kici.orchestrator.store.sources import create_source

from .conftest import WORKFLOW_SPEC, insert_run

T0 = dt.datetime(2026, 11, 27, 8, 0, tzinfo=dt.UTC)
API = "/api/v1/admin"


async def _seed(database: Database) -> dict[str, str]:
    """Eight runs a minute apart (r0 oldest), varied on every filtered column, plus one of another org."""
    async with database.transaction() as conn:
        source = await create_source(conn, key=None, name="gh", kind=SourceKind.GENERIC, config={"auth": "none"})
        ids: dict[str, str] = {}
        specs: list[dict[str, Any]] = [
            {"workflow": "ci", "branch": "main", "trigger": "push", "sha": "ab" * 20},
            {"workflow": "ci", "branch": "dev", "trigger": "push", "sha": "cd" * 20, "source_id": source.id},
            {"workflow": "deploy", "branch": "main", "trigger": "tag", "sha": "ab12" + "0" * 36},
            {"workflow": "ci", "branch": "feature", "trigger": "pr", "sha": "ef" * 20, "repo": "acme/other"},
            {"workflow": "ci", "branch": "main", "trigger": "push", "sha": "ab" * 20, "status": "success"},
            {"workflow": "ci", "branch": "main", "trigger": "push", "sha": "12" * 20, "source_id": source.id},
            {"workflow": "nightly", "branch": None, "trigger": "schedule", "sha": "34" * 20, "status": "failed"},
            {"workflow": "ci", "branch": "main", "trigger": "push", "sha": "56" * 20},
        ]
        for i, spec in enumerate(specs):
            ids[f"r{i}"] = await insert_run(conn, created_at=T0 + dt.timedelta(minutes=i), **spec)
        await conn.execute(sa.insert(schema.orgs).values(id="other", name="other", created_at=T0))
        ids["foreign"] = await insert_run(conn, org_id="other", created_at=T0 + dt.timedelta(minutes=30))
        ids["source"] = source.id
    return ids


async def _ids(database: Database, **kwargs: Any) -> list[str]:
    async with database.read() as conn:
        page = await store.find_runs(conn, **kwargs)
    return [r.id for r in page.runs]


async def test_find_runs_filters(database: Database) -> None:
    ids = await _seed(database)

    def names(found: list[str]) -> list[str]:
        by_id = {v: k for k, v in ids.items()}
        return [by_id[i] for i in found]

    F = store.RunFilter
    assert names(await _ids(database)) == [f"r{i}" for i in range(7, -1, -1)]
    assert names(await _ids(database, where=F(workflow="ci"))) == ["r7", "r5", "r4", "r3", "r1", "r0"]
    assert names(await _ids(database, where=F(branch="main", workflow="ci"))) == ["r7", "r5", "r4", "r0"]
    assert names(await _ids(database, where=F(trigger="tag"))) == ["r2"]
    assert names(await _ids(database, where=F(repo="acme/other"))) == ["r3"]
    assert names(await _ids(database, where=F(source_id=ids["source"]))) == ["r5", "r1"]
    assert names(await _ids(database, where=F(status=["success", "failed"]))) == ["r6", "r4"]
    # a full SHA matches exactly; a prefix matches every SHA that starts with it (case-insensitive)
    assert names(await _ids(database, where=F(sha="ab" * 20))) == ["r4", "r0"]
    assert names(await _ids(database, where=F(sha="AB12"))) == ["r2"]
    assert names(await _ids(database, where=F(sha="ab"))) == ["r4", "r2", "r0"]
    assert names(await _ids(database, where=F(workflow="ci", branch="main", status=["success"]))) == ["r4"]
    assert await _ids(database, where=F(workflow="none")) == []
    assert names(await _ids(database, org_id="other")) == ["foreign"]
    with pytest.raises(ValueError, match="not a commit SHA"):
        await _ids(database, where=F(sha="xyz"))


async def test_find_runs_cursor_paging_is_stable(database: Database) -> None:
    ids = await _seed(database)
    seen: list[str] = []
    before: str | None = None
    pages = 0
    while True:
        async with database.read() as conn:
            page = await store.find_runs(conn, limit=3, before=before)
        seen += [r.id for r in page.runs]
        pages += 1
        if page.next is None:
            break
        before = page.next
        # runs created while paging do not shift the pages that follow
        async with database.transaction() as conn:
            await insert_run(conn, created_at=T0 + dt.timedelta(hours=1, minutes=pages))
    assert pages == 3
    assert seen == [ids[f"r{i}"] for i in range(7, -1, -1)]
    # runs created in the same microsecond are ordered by id, and the cursor splits them exactly
    async with database.transaction() as conn:
        same = sorted([await insert_run(conn, workflow="tie", created_at=T0 - dt.timedelta(days=1)) for _ in range(3)])
    first = await _ids(database, where=store.RunFilter(workflow="tie"), limit=2)
    assert first == same[::-1][:2]
    async with database.read() as conn:
        cursor = store.run_cursor(await store.get_run(conn, first[-1]))  # type: ignore[arg-type]
    assert await _ids(database, where=store.RunFilter(workflow="tie"), before=cursor) == [same[0]]
    with pytest.raises(store.BadCursor):
        await _ids(database, before="bm90IGEgY3Vyc29y")


async def test_created_runs_record_branch_and_trigger(database: Database) -> None:
    workflow = Workflow.model_validate(WORKFLOW_SPEC)
    event = Event(type="pr", branch="topic", target_branch="main", ref="refs/pull/3/head", sha="9" * 40)
    async with database.transaction() as conn:
        created = await store.create_run(
            conn,
            store.NewRun(org_id="default", workflow=workflow, event=event, repo="acme/app", ref=event.ref,
                         sha="9" * 40, lock_content_hash=None, delivery_id=None, source_id=None),
            queue_max_depth=100, queue_timeout_ms=0,
        )
        failed = await store.create_failed_run(
            conn, workflow_name="broken", event=Event(type="push", branch="main"), repo="acme/app", ref=None,
            sha="8" * 40, delivery_id=None, source_id=None, reason="lock_resolution",
        )
    assert await _ids(database, where=store.RunFilter(branch="topic", trigger="pr")) == [created.run_id]
    assert await _ids(database, where=store.RunFilter(branch="main", trigger="push")) == [failed]


@pytest.fixture
async def viewer_http(database: Database, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with database.transaction() as conn:
        made = await tokens.create_admin_token(conn, name="dev", role=AdminRole.VIEWER)
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url), database)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://orch.test",
        headers={"Authorization": f"Bearer {made.plaintext}"},
    ) as http:
        yield http


async def test_rest_filters_and_paging(database: Database, viewer_http: httpx.AsyncClient) -> None:
    ids = await _seed(database)
    response = await viewer_http.get(f"{API}/runs", params={"workflow": "ci", "branch": "main", "limit": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["id"] for r in body] == [ids["r7"], ids["r5"]]
    assert {r["branch"] for r in body} == {"main"} and {r["trigger"] for r in body} == {"push"}
    following = await viewer_http.get(
        f"{API}/runs", params={"workflow": "ci", "branch": "main", "before": response.headers["X-Next-Cursor"]}
    )
    assert [r["id"] for r in following.json()] == [ids["r4"], ids["r0"]]
    assert "X-Next-Cursor" not in following.headers
    # each run's own cursor works as `before` too
    assert [r["id"] for r in (await viewer_http.get(
        f"{API}/runs", params={"workflow": "ci", "branch": "main", "before": body[0]["cursor"], "limit": 1}
    )).json()] == [ids["r5"]]
    by_source = await viewer_http.get(f"{API}/runs", params={"source": "gh"})
    assert [r["id"] for r in by_source.json()] == [ids["r5"], ids["r1"]]
    by_source_id = await viewer_http.get(f"{API}/runs", params={"source": ids["source"]})
    assert [r["id"] for r in by_source_id.json()] == [ids["r5"], ids["r1"]]
    assert [r["id"] for r in (await viewer_http.get(f"{API}/runs", params={"sha": "cdcd"})).json()] == [ids["r1"]]
    assert [r["id"] for r in (await viewer_http.get(f"{API}/runs", params={"trigger": "schedule"})).json()] == [
        ids["r6"]
    ]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"before": "garbage!"}, "before (query)"), ({"sha": "not-hex"}, "sha (query)"),
     ({"status": "done"}, "status (query)"), ({"limit": 0}, "limit (query)")],
)
async def test_rest_bad_values_are_422_naming_the_field(
    viewer_http: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    response = await viewer_http.get(f"{API}/runs", params=params)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]
