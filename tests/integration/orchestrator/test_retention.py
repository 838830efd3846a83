"""Retention (issue 9): finished runs, event log and audit entries older than their ages are deleted in
bounded batches, never a run that has not finished, with the runs' log files; a dry run counts the same and
deletes nothing. SQLite and PostgreSQL, through the real admin API and the real log storage."""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from kici.engine.junit import parse_junit
from kici.orchestrator import test_reports
from kici.orchestrator.app import create_app
from kici.orchestrator.artifacts import run_prefix
from kici.orchestrator.config import Settings
from kici.orchestrator.container import services_of
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, utcnow
from kici.orchestrator.retention import LOCK, prune
from kici.orchestrator.storage.logs import LogStore
from kici.orchestrator.store import audit, tokens
from kici.orchestrator.store import test_reports as report_store

from .conftest import insert_job, insert_run

API = "/api/v1/admin"
BATCH = 7
OLD_FINISHED, OLD_UNFINISHED, RECENT = 30, 4, 3
OLD_EVENTS, NEW_EVENTS, OLD_AUDIT, NEW_AUDIT = 25, 4, 20, 5


@dataclass
class Env:
    app: Any
    http: httpx.AsyncClient
    database: Database
    owner: dict[str, str]
    old_runs: list[str]
    kept_runs: list[str]


async def _seed(database: Database, logs: LogStore) -> tuple[list[str], list[str]]:
    now = utcnow()
    old, kept = [], []
    job_ids: dict[str, str] = {}
    async with database.transaction() as conn:
        for i in range(OLD_FINISHED):
            status = ("success", "failed", "cancelled")[i % 3]
            finished = None if i == 0 else now - dt.timedelta(days=100, minutes=i)  # i == 0: failed before it began
            run = await insert_run(conn, status=status, created_at=now - dt.timedelta(days=101),
                                   finished_at=finished)
            for name in ("build", "test"):
                job_ids[run] = await insert_job(conn, run, name, status="success")
            old.append(run)
        for status in ("pending", "running", "cancelling", "held")[:OLD_UNFINISHED]:
            run = await insert_run(conn, status=status, created_at=now - dt.timedelta(days=200))
            job_ids[run] = await insert_job(conn, run, "build")
            kept.append(run)
        for i in range(RECENT):
            run = await insert_run(conn, status="success", created_at=now - dt.timedelta(days=10),
                                   finished_at=now - dt.timedelta(days=10, minutes=-i))
            job_ids[run] = await insert_job(conn, run, "build", status="success")
            kept.append(run)
        for i in range(OLD_EVENTS + NEW_EVENTS):
            age = dt.timedelta(days=40 if i < OLD_EVENTS else 1)
            await conn.execute(schema.event_log.insert().values(
                id=f"ev-{i}", org_id="default", delivery_id=f"d-{i}", provider="git", status="processed",
                created_at=now - age))
        for i in range(OLD_AUDIT + NEW_AUDIT):
            age = dt.timedelta(days=400 if i < OLD_AUDIT else 1)
            await conn.execute(schema.audit_log.insert().values(
                id=f"au-{i}", org_id="default", action="run.cancel", outcome="allowed", actor="system",
                created_at=now - age))
    for i, run in enumerate(old + kept):  # a log per run: sealed into a segment blob, or still in chunks
        await logs.append(run, job_ids[run], 0, ["hello"], 0)
        await logs.flush()
        if i % 2 == 0:
            await logs.seal(run, job_ids[run])
    return old, kept


async def has_logs(env: Env, run: str) -> bool:
    async with env.database.read() as conn:
        rows = sum([int((await conn.execute(sa.select(sa.func.count()).where(table.c.run_id == run))).scalar_one())
                    for table in (schema.log_chunks, schema.log_segments)])
    return rows > 0 or bool(await services_of(env.app).blobs.list(f"logs/{run}/"))


@pytest.fixture
async def env(database: Database, tmp_path: Path) -> AsyncIterator[Env]:
    settings = Settings(data_dir=tmp_path / "data", database_url=database.url, retention_runs_days=90,
                        retention_events_days=30, retention_audit_days=365, retention_batch_size=BATCH)
    async with database.transaction() as conn:
        owner = await tokens.create_admin_token(conn, name="owner", role=AdminRole.OWNER)
    app = create_app(settings, database)
    old, kept = await _seed(database, services_of(app).logs)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://orchestrator") as http:
            yield Env(app, http, database, {"Authorization": f"Bearer {owner.plaintext}"}, old, kept)
    finally:
        await services_of(app).logs.close()


async def _counts(database: Database) -> dict[str, int]:
    async with database.read() as conn:
        async def count(table: sa.Table) -> int:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())

        return {"runs": await count(schema.runs), "jobs": await count(schema.jobs),
                "events": await count(schema.event_log), "audit": await count(schema.audit_log)}


async def test_dry_run_counts_and_deletes_nothing_then_prune_deletes_the_same_in_batches(env: Env) -> None:
    before = await _counts(env.database)
    expected = {"runs": OLD_FINISHED, "jobs": 2 * OLD_FINISHED, "events": OLD_EVENTS, "audit": OLD_AUDIT}

    dry = await env.http.post(API + "/prune", json={"dry_run": True}, headers=env.owner)
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True and dry.json()["counts"] == expected
    assert dry.json()["batches"] == 0 and dry.json()["complete"] is True
    cut = {k: dt.datetime.fromisoformat(v) for k, v in dry.json()["cutoffs"].items()}
    now = utcnow()
    assert abs((now - cut["runs"]) - dt.timedelta(days=90)) < dt.timedelta(minutes=1)
    assert abs((now - cut["events"]) - dt.timedelta(days=30)) < dt.timedelta(minutes=1)
    assert abs((now - cut["audit"]) - dt.timedelta(days=365)) < dt.timedelta(minutes=1)
    assert await _counts(env.database) == before, "a dry run deletes nothing"
    assert all([await has_logs(env, run) for run in env.old_runs])
    async with env.database.read() as conn:
        assert [e for e in await audit.list_audit(conn, limit=1000) if e.action == "data.prune"] == []
    # artifacts' blobs (kept outside the database) go with their runs too
    blobs = services_of(env.app).blobs
    for run in (env.old_runs[0], env.kept_runs[0]):
        await blobs.put(run_prefix(run) + "job/dist/x.whl", io.BytesIO(b"wheel"))

    real = await env.http.post(API + "/prune", json={"dry_run": False}, headers=env.owner)
    assert real.status_code == 200, real.text
    body = real.json()
    assert body["dry_run"] is False and body["counts"] == expected and body["complete"] is True
    # several batches per kind: ceil(n / batch) each, plus nothing for the short last one
    assert body["batches"] == sum(math.ceil(n / BATCH) for n in (OLD_FINISHED, OLD_EVENTS, OLD_AUDIT))
    after = await _counts(env.database)
    assert after["runs"] == before["runs"] - OLD_FINISHED and after["jobs"] == before["jobs"] - 2 * OLD_FINISHED
    assert after["events"] == NEW_EVENTS
    async with env.database.read() as conn:
        left = set((await conn.execute(sa.select(schema.runs.c.id))).scalars())
        entries = await audit.list_audit(conn, limit=1000)
    assert left == set(env.kept_runs), "every unfinished and every recent run is kept"
    assert not any([await has_logs(env, run) for run in env.old_runs]), "logs go with their runs"
    assert all([await has_logs(env, run) for run in env.kept_runs])
    assert await blobs.list(run_prefix(env.old_runs[0])) == []
    assert len(await blobs.list(run_prefix(env.kept_runs[0]))) == 1
    assert {e.id for e in entries if e.id.startswith("au-")} == {f"au-{i}" for i in range(OLD_AUDIT, 25)}
    [row] = [e for e in entries if e.action == "data.prune"]
    assert row.actor is not None and row.actor.startswith("token:") and row.target == "data:retention"
    assert row.reason is not None and f"deleted {OLD_FINISHED} runs ({2 * OLD_FINISHED} jobs)" in row.reason

    again = (await env.http.post(API + "/prune", headers=env.owner)).json()
    assert again["counts"] == {"runs": 0, "jobs": 0, "events": 0, "audit": 0} and again["batches"] == 0


async def test_zero_keeps_forever(env: Env, tmp_path: Path) -> None:
    keep_all = Settings(data_dir=tmp_path / "data", database_url=env.database.url, retention_runs_days=0,
                        retention_events_days=0, retention_audit_days=0)
    result = await prune(env.database, services_of(env.app).delete_run_data, keep_all)
    assert result.counts.total == 0 and result.cutoffs.runs is None and result.cutoffs.audit is None
    events_only = keep_all.model_copy(update={"retention_events_days": 30})
    result = await prune(env.database, services_of(env.app).delete_run_data, events_only, batch_size=10)
    assert (result.counts.runs, result.counts.events, result.counts.audit) == (0, OLD_EVENTS, 0)
    assert result.batches == math.ceil(OLD_EVENTS / 10)


async def test_the_background_pass_prunes_as_system(env: Env) -> None:
    sweeper = services_of(env.app).sweeper
    await sweeper.retention()  # the first pass only arms: a restart is not a prune
    assert (await _counts(env.database))["runs"] == OLD_FINISHED + len(env.kept_runs)
    await sweeper.retention()
    assert (await _counts(env.database))["runs"] == len(env.kept_runs)
    async with env.database.read() as conn:
        [row] = [e for e in await audit.list_audit(conn, limit=1000) if e.action == "retention.prune"]
    assert (row.actor, row.outcome, row.target) == ("system", "allowed", "data:retention")


async def test_a_run_that_is_not_finished_is_never_pruned_whatever_its_age(env: Env) -> None:
    ancient = utcnow() - dt.timedelta(days=3000)
    async with env.database.transaction() as conn:
        await conn.execute(schema.runs.update().where(schema.runs.c.id.in_(env.kept_runs))
                           .values(created_at=ancient, finished_at=ancient))
        statuses = dict((await conn.execute(sa.select(schema.runs.c.id, schema.runs.c.status)
                                            .where(schema.runs.c.id.in_(env.kept_runs)))).all())
    await prune(env.database, services_of(env.app).delete_run_data, services_of(env.app).dispatcher.settings)
    async with env.database.read() as conn:
        left = set((await conn.execute(sa.select(schema.runs.c.id))).scalars())
    assert left == {r for r, s in statuses.items() if s in ("pending", "running", "cancelling", "held")}
    assert all([await has_logs(env, r) for r in left])


async def test_while_another_orchestrator_prunes_this_one_stops(env: Env) -> None:
    if env.database.is_sqlite:
        # one writer per file: a second pruner waits for the write lock instead (nothing to show here)
        pytest.skip("the retention lock is a PostgreSQL advisory lock; SQLite serialises writers by itself")
    async with env.database.transaction() as other:
        assert await env.database.try_lock(other, LOCK)
        services = services_of(env.app)
        result = await prune(env.database, services.delete_run_data, services.dispatcher.settings)
    assert result.complete is False and result.counts.total == 0 and result.batches == 0
    assert (await _counts(env.database))["runs"] == OLD_FINISHED + len(env.kept_runs)
    after = await prune(env.database, services_of(env.app).delete_run_data, services_of(env.app).dispatcher.settings)
    assert after.complete is True and after.counts.runs == OLD_FINISHED


async def test_test_reports_go_with_their_runs(env: Env, tmp_path: Path) -> None:
    """A run's test reports (rows, and the files as sent, kept outside the database) go with it."""
    blobs = services_of(env.app).blobs
    report = parse_junit(io.BytesIO(b'<testsuite><testcase name="a"/><testcase name="b"><failure/></testcase>'
                                    b"</testsuite>"), max_bytes=1000)
    old, kept = env.old_runs[1], env.kept_runs[0]
    for run in (old, kept):
        async with env.database.transaction() as conn:
            jobs = await conn.execute(sa.select(schema.jobs.c.id).where(schema.jobs.c.run_id == run))
            job_id = jobs.scalars().first()
            assert job_id is not None
            file_id = schema.new_id()
            key = test_reports.blob_key(run, job_id, file_id)
            await report_store.replace_report_file(
                conn, file_id=file_id, org_id="default", run_id=run, job_id=job_id, path="reports/junit.xml",
                size=12, sha256="0" * 64, blob_key=key, report=report, error=None)
        await blobs.put(key, io.BytesIO(b"<testsuite/>"))

    async def results(run: str) -> int:
        async with env.database.read() as conn:
            query = sa.select(sa.func.count()).select_from(schema.test_results).where(
                schema.test_results.c.run_id == run)
            return int((await conn.execute(query)).scalar_one())

    assert (await results(old), await results(kept)) == (2, 2)
    settings = Settings(data_dir=tmp_path / "data", database_url=env.database.url, retention_runs_days=90)
    result = await prune(env.database, services_of(env.app).delete_run_data, settings)
    assert result.counts.runs == OLD_FINISHED
    assert (await results(old), await results(kept)) == (0, 2)
    assert await blobs.list(test_reports.run_prefix(old)) == []
    assert len(await blobs.list(test_reports.run_prefix(kept))) == 1
    async with env.database.read() as conn:
        assert [s.total for s in (await report_store.job_summaries(conn, kept)).values()] == [2]
        assert await report_store.job_summaries(conn, old) == {}
