"""Migrations on real SQLite files and a real PostgreSQL: apply, status, idempotence, concurrency, and the
migrated schema agreeing with `schema.py`."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError, StatementError

from kici.engine.states import JobState, RunStatus
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.migrate import MigrationError, head_revision, migrate, migration_status
from kici.orchestrator.db.schema import DEFAULT_ORG_ID, VERSION_TABLE, metadata

from .conftest import insert_run, orchestrator_env


async def test_migrate_empty_database_to_head(database_url: str) -> None:
    before = await migration_status(database_url)
    assert before.current is None and not before.up_to_date
    assert before.pending[-1] == before.head == head_revision() == "0007"

    result = await migrate(database_url)
    assert (result.before, result.after, result.applied) == (None, "0007", ("0001", "0002", "0007"))

    after = await migration_status(database_url)
    assert after.up_to_date and after.current == after.head and after.pending == ()


async def test_migrating_twice_is_a_no_op(database_url: str) -> None:
    await migrate(database_url)
    again = await migrate(database_url)
    assert again.applied == () and again.before == again.after == "0007"


async def test_migrated_schema_matches_schema_module(database: Database) -> None:
    def diff(conn: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": VERSION_TABLE, "target_metadata": metadata}
        )
        return list(compare_metadata(context, metadata))

    async with database.read() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_default_org_exists_after_migration(database: Database) -> None:
    async with database.read() as conn:
        ids = (await conn.execute(sa.select(schema.orgs.c.id))).scalars().all()
    assert ids == [DEFAULT_ORG_ID]


async def test_status_check_constraints_follow_the_engine(database: Database) -> None:
    async with database.transaction() as conn:
        run_id = await insert_run(conn)
        for state in JobState:
            await conn.execute(schema.jobs.insert().values(run_id=run_id, name=f"j-{state}", job="j", status=state))
        for status in RunStatus:
            await insert_run(conn, status=status.value)
    with pytest.raises(IntegrityError):
        async with database.transaction() as conn:
            await conn.execute(schema.jobs.insert().values(run_id=run_id, name="bad", job="j", status="bogus"))
    with pytest.raises(IntegrityError):
        async with database.transaction() as conn:
            await insert_run(conn, status="exploded")


async def test_foreign_keys_are_enforced(database: Database) -> None:
    with pytest.raises(IntegrityError):
        async with database.transaction() as conn:
            await conn.execute(schema.jobs.insert().values(run_id="no-such-run", name="j", job="j"))
    async with database.transaction() as conn:  # deleting a run cascades to its jobs
        run_id = await insert_run(conn)
        await conn.execute(schema.jobs.insert().values(run_id=run_id, name="j", job="j"))
        await conn.execute(schema.runs.delete().where(schema.runs.c.id == run_id))
        assert (await conn.execute(sa.select(sa.func.count()).select_from(schema.jobs))).scalar_one() == 0


async def test_timestamps_round_trip_as_aware_utc(database: Database) -> None:
    moment = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    async with database.transaction() as conn:
        run_id = await insert_run(conn, created_at=moment)
        query = sa.select(schema.runs.c.created_at).where(schema.runs.c.id == run_id)
        stored = (await conn.execute(query)).scalar_one()
    assert stored == moment and stored.tzinfo == dt.UTC and stored.hour == 5
    with pytest.raises(StatementError, match="naive datetime"):
        async with database.transaction() as conn:
            await insert_run(conn, created_at=dt.datetime(2024, 1, 1))


async def test_database_from_a_newer_version_is_refused(database: Database) -> None:
    async with database.transaction() as conn:
        await conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(MigrationError, match=r"'9999'.*does not know"):
        await migrate(database)
    with pytest.raises(MigrationError, match="does not know"):
        await migration_status(database)


MIGRATOR = """
import asyncio, sys, time
from pathlib import Path
from kici.orchestrator.db.migrate import migrate
go = Path(sys.argv[2])
print("waiting", flush=True)
while not go.exists():
    time.sleep(0.01)
result = asyncio.run(migrate(sys.argv[1]))
print("applied=" + ",".join(result.applied), flush=True)
"""


def test_concurrent_migrators_do_not_collide(database_url: str, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR, database_url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=orchestrator_env(tmp_path),
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:  # every migrator is imported and waiting before any of them starts
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "waiting"
        go.touch()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in outputs]
    applied = sorted(out.strip() for out, _ in outputs)
    assert applied == ["applied=", "applied=0001,0002,0007"]

