"""`kici-admin` for the audit trail, token expiry and retention: the real command in a subprocess against a
real `kici-orchestrator` process (the module-scoped one of test_kici_admin)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import sqlalchemy as sa

from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import utcnow

from .test_kici_admin import Orchestrator, kici_admin, ok, one_line_error, orchestrator, table  # noqa: F401


def _expire(database_url: str, token_id: str) -> None:
    async def run() -> None:
        database = Database.connect(database_url)
        try:
            async with database.transaction() as conn:
                await conn.execute(schema.admin_tokens.update().where(schema.admin_tokens.c.id == token_id)
                                   .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
        finally:
            await database.close()

    asyncio.run(run())


def test_token_expiry(orchestrator: Orchestrator) -> None:  # noqa: F811
    url = orchestrator.url
    out = ok(kici_admin("token", "create", "--name", "temp-ops", "--role", "viewer", "--expires-in", "30d", url=url))
    assert "Created admin token 'temp-ops' (role viewer, expires 20" in out
    created = json.loads(ok(kici_admin("token", "create", "--name", "short", "--role", "viewer", "--expires-in",
                                       "2h", "--json", url=url)))
    expires = dt.datetime.fromisoformat(created["expires_at"])
    assert dt.timedelta(hours=1, minutes=59) < expires - utcnow() <= dt.timedelta(hours=2)
    assert ok(kici_admin("whoami", url=url, token=created["token"]))

    _expire(orchestrator.database_url, created["id"])
    refused = kici_admin("whoami", url=url, token=created["token"])
    assert one_line_error(refused, 1) == "kici-admin: error: missing or invalid admin token (HTTP 401)"
    rows = {row[1]: row for row in table(ok(kici_admin("token", "list", url=url)))[1:]}
    assert rows["short"][-1] == "EXPIRED" and rows["bootstrap"][-1] == "never"

    bad = kici_admin("token", "create", "--name", "x", "--role", "viewer", "--expires-in", "1 month", url=url)
    assert "invalid duration '1 month'" in one_line_error(bad, 2)
    agent = json.loads(ok(kici_admin("agent-token", "create", "--name", "pool-t", "--expires-in", "7d", "--json",
                                     url=url)))
    assert agent["expires_at"] is not None and agent["expired"] is False


def test_audit_list_filters_and_pages(orchestrator: Orchestrator) -> None:  # noqa: F811
    url = orchestrator.url
    me = json.loads(ok(kici_admin("whoami", "--json", url=url)))["id"]
    for i in range(3):
        ok(kici_admin("token", "create", "--name", f"audited-{i}", "--role", "viewer", url=url))
    created = json.loads(ok(kici_admin("audit", "list", "--action", "token.create", "--actor", f"token:{me}",
                                       "--from", "1h", "--json", url=url)))
    assert len(created) >= 3 and {e["action"] for e in created} == {"token.create"}
    assert all(e["actor"] == f"token:{me}" and e["target"].startswith("token:") for e in created)
    prefixed = json.loads(ok(kici_admin("audit", "list", "--action", "token.", "--json", url=url)))
    assert {e["action"] for e in prefixed} <= {"token.create", "token.revoke"}
    assert json.loads(ok(kici_admin("audit", "list", "--to", "2000-01-01T00:00:00", "--json", url=url))) == []

    first = kici_admin("audit", "list", "--action", "token.create", "--limit", "2", url=url)
    assert first.returncode == 0 and "token.create" in first.stdout
    hint = first.stderr.strip()
    assert hint.startswith("More entries: kici-admin audit list --before ")
    cursor = hint.split("--before ")[1].split()[0]
    second = json.loads(ok(kici_admin("audit", "list", "--action", "token.create", "--limit", "2", "--before",
                                      cursor, "--json", url=url)))
    shown = {line.split()[0] for line in first.stdout.splitlines()[1:]}
    assert second and not {e["created_at"] for e in second} & shown

    bad = kici_admin("audit", "list", "--from", "last week", url=url)
    assert "invalid time 'last week'" in one_line_error(bad, 2)


def _old_finished_run(database_url: str) -> str:
    async def run() -> str:
        database = Database.connect(database_url)
        try:
            async with database.transaction() as conn:
                old = utcnow() - dt.timedelta(days=400)
                result = await conn.execute(schema.runs.insert().values(
                    workflow="ancient", repo="acme/old", sha="a" * 40, status="success", created_at=old,
                    finished_at=old).returning(schema.runs.c.id))
                return str(result.scalar_one())
        finally:
            await database.close()

    return asyncio.run(run())


def _run_exists(database_url: str, run_id: str) -> bool:
    async def run() -> bool:
        database = Database.connect(database_url)
        try:
            async with database.read() as conn:
                return (await conn.execute(sa.select(schema.runs.c.id).where(schema.runs.c.id == run_id))).first() \
                    is not None
        finally:
            await database.close()

    return asyncio.run(run())


def test_prune(orchestrator: Orchestrator) -> None:  # noqa: F811
    url = orchestrator.url
    run_id = _old_finished_run(orchestrator.database_url)
    dry = ok(kici_admin("prune", "--dry-run", url=url))
    assert dry.startswith("Would delete (dry run, nothing deleted):")
    assert table(dry)[2][:2] == ["runs", "1"]
    assert _run_exists(orchestrator.database_url, run_id)
    done = json.loads(ok(kici_admin("prune", "--json", url=url)))
    assert done["dry_run"] is False and done["counts"]["runs"] == 1 and done["complete"] is True
    assert not _run_exists(orchestrator.database_url, run_id)
    pruned = json.loads(ok(kici_admin("audit", "list", "--action", "data.prune", "--json", url=url)))
    assert len(pruned) == 1 and "deleted 1 runs" in pruned[0]["reason"]
