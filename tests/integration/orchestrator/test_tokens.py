"""Admin and agent token store, and the start-up bootstrap of the first admin token, on both databases."""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from kici.orchestrator.config import Settings
from kici.orchestrator.db import schema
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole
from kici.orchestrator.startup import bootstrap
from kici.orchestrator.store import orgs, tokens


async def table_text(database: Database, table: sa.Table) -> str:
    """Every value of every row of `table`, as one string (to prove a secret is nowhere in it)."""
    async with database.read() as conn:
        rows = (await conn.execute(sa.select(table))).all()
    return "\n".join(repr(value) for row in rows for value in row)


async def test_admin_token_lifecycle(database: Database) -> None:
    async with database.transaction() as conn:
        created = await tokens.create_admin_token(conn, name="ci", role="admin")
    plaintext = created.plaintext
    assert re.fullmatch(r"kici_[0-9a-f]{64}", plaintext)
    assert created.token.role == AdminRole.ADMIN and created.token.active and created.token.last_used_at is None

    async with database.transaction() as conn:
        verified = await tokens.verify_admin_token(conn, plaintext)
    assert verified is not None and verified.id == created.token.id and verified.last_used_at is not None
    async with database.read() as conn:
        [listed] = await tokens.list_admin_tokens(conn)
        assert listed.id == created.token.id and listed.last_used_at is not None
        assert await tokens.verify_admin_token(conn, plaintext + "x", touch=False) is None
        assert await tokens.verify_admin_token(conn, "", touch=False) is None

    async with database.transaction() as conn:
        assert await tokens.revoke_admin_token(conn, created.token.id) is True
        assert await tokens.revoke_admin_token(conn, created.token.id) is False  # already revoked
        assert await tokens.revoke_admin_token(conn, "no-such-id") is False
    async with database.read() as conn:
        assert await tokens.verify_admin_token(conn, plaintext, touch=False) is None
        assert await tokens.list_admin_tokens(conn) == []
        [revoked] = await tokens.list_admin_tokens(conn, include_revoked=True)
        assert revoked.revoked_at is not None and not revoked.active
        assert await tokens.count_active_admin_tokens(conn) == 0


async def test_only_the_hash_is_stored(database: Database) -> None:
    async with database.transaction() as conn:
        admin = await tokens.create_admin_token(conn, name="ops", role=AdminRole.OWNER)
        agent = await tokens.create_agent_token(conn, name="builder", labels=["linux"])
    admin_rows = await table_text(database, schema.admin_tokens)
    agent_rows = await table_text(database, schema.agent_tokens)
    for plaintext, rows in ((admin.plaintext, admin_rows), (agent.plaintext, agent_rows)):
        secret = plaintext.split("_", 1)[1]
        assert plaintext not in rows and secret not in rows
        assert hashlib.sha256(plaintext.encode()).hexdigest() in rows
    assert "plaintext" not in admin.token.model_dump() and "token_hash" not in admin.token.model_dump()


async def test_the_same_token_cannot_be_stored_twice(database: Database) -> None:
    async with database.transaction() as conn:
        await tokens.create_admin_token(conn, name="a", role="owner", plaintext="pinned-token-0123456789")
    with pytest.raises(IntegrityError):
        async with database.transaction() as conn:
            await tokens.create_admin_token(conn, name="b", role="auditor", plaintext="pinned-token-0123456789")


async def test_roles_are_checked(database: Database) -> None:
    with pytest.raises(ValueError):
        async with database.transaction() as conn:
            await tokens.create_admin_token(conn, name="x", role="superuser")


async def test_agent_token_lifecycle(database: Database) -> None:
    async with database.transaction() as conn:
        created = await tokens.create_agent_token(conn, name="builder", labels=["linux", "docker"])
    assert re.fullmatch(r"kat_[0-9a-f]{64}", created.plaintext)
    async with database.transaction() as conn:
        verified = await tokens.verify_agent_token(conn, created.plaintext)
        assert verified is not None and verified.labels == ["linux", "docker"] and verified.last_used_at
        assert await tokens.verify_agent_token(conn, "kat_" + "0" * 64) is None
        assert [t.name for t in await tokens.list_agent_tokens(conn)] == ["builder"]
        assert await tokens.revoke_agent_token(conn, created.token.id) is True
        assert await tokens.verify_agent_token(conn, created.plaintext) is None
        assert await tokens.list_agent_tokens(conn) == []
        assert len(await tokens.list_agent_tokens(conn, include_revoked=True)) == 1


async def test_ensure_default_org_is_idempotent(database: Database) -> None:
    async with database.transaction() as conn:
        assert await orgs.ensure_default_org(conn) is False  # the migration created it
        assert await orgs.ensure_org(conn, "acme") is True
        assert await orgs.ensure_org(conn, "acme") is False
        assert await orgs.list_org_ids(conn) == ["acme", "default"]


# -- bootstrap ----------------------------------------------------------------------------------------


def settings_for(database: Database, data_dir: Path, **extra: object) -> Settings:
    data_dir.mkdir(exist_ok=True)
    return Settings(data_dir=data_dir, database_url=database.url, **extra)  # type: ignore[arg-type]


async def test_bootstrap_generates_one_owner_token_once(database: Database, tmp_path: Path) -> None:
    settings = settings_for(database, tmp_path / "data")
    generated = await bootstrap(settings, database)
    assert generated is not None and re.fullmatch(r"kici_[0-9a-f]{64}", generated.plaintext)
    token_file = settings.bootstrap_token_file
    assert token_file.read_text().strip() == generated.plaintext
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    async with database.read() as conn:
        owner = await tokens.verify_admin_token(conn, generated.plaintext, touch=False)
    assert owner is not None and owner.role == AdminRole.OWNER and owner.name == "bootstrap"

    assert await bootstrap(settings, database) is None  # a token exists: nothing new
    async with database.read() as conn:
        assert await tokens.count_active_admin_tokens(conn) == 1
    assert generated.plaintext not in await table_text(database, schema.admin_tokens)


async def test_bootstrap_after_every_token_was_revoked_generates_a_new_one(database: Database, tmp_path: Path) -> None:
    settings = settings_for(database, tmp_path / "data")
    first = await bootstrap(settings, database)
    assert first is not None
    async with database.transaction() as conn:
        assert await tokens.revoke_admin_token(conn, first.token_id)
    second = await bootstrap(settings, database)
    assert second is not None and second.plaintext != first.plaintext
    assert settings.bootstrap_token_file.read_text().strip() == second.plaintext


async def test_pinned_bootstrap_token_is_upserted_as_owner(database: Database, tmp_path: Path) -> None:
    pinned = "operator-chosen-token-42"
    settings = settings_for(database, tmp_path / "data", bootstrap_admin_token=pinned)
    assert await bootstrap(settings, database) is None
    assert not settings.bootstrap_token_file.exists()  # the operator already has it
    async with database.transaction() as conn:
        token = await tokens.verify_admin_token(conn, pinned)
        assert token is not None and token.role == AdminRole.OWNER
        await tokens.set_admin_token_role(conn, token.id, AdminRole.AUDITOR)  # someone demoted it
    assert await bootstrap(settings, database) is None
    async with database.transaction() as conn:
        again = await tokens.verify_admin_token(conn, pinned)
        assert again is not None and again.id == token.id and again.role == AdminRole.OWNER
        assert await tokens.count_active_admin_tokens(conn) == 1
        await tokens.revoke_admin_token(conn, token.id)
    # A revoked pinned token stays revoked, and no other token is generated in its place.
    assert await bootstrap(settings, database) is None
    async with database.read() as conn:
        assert await tokens.verify_admin_token(conn, pinned, touch=False) is None
        assert await tokens.count_active_admin_tokens(conn) == 0
