"""Source secrets at rest (AES-256-GCM, bound to `source:{id}:{field}`) and the sources store, on SQLite
and PostgreSQL."""

from __future__ import annotations

import base64
import json
import os

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from kici.orchestrator.crypto import KEY_VERSION, CryptoError, open_sealed, seal, source_aad
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import SourceKind, sources
from kici.orchestrator.store.source_configs import GitSourceConfig
from kici.orchestrator.store.sources import (
    SourceError,
    create_source,
    delete_source,
    get_source,
    get_source_by_name,
    list_sources,
    load_source_secrets,
    set_source_enabled,
    update_source,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def test_seal_round_trip_and_format() -> None:
    blob = seal(KEY, b"hunter2", "source:s1:webhook_secret")
    assert blob[0] == KEY_VERSION and len(blob) == 1 + 12 + len(b"hunter2") + 16
    assert open_sealed(KEY, blob, "source:s1:webhook_secret") == b"hunter2"
    assert seal(KEY, b"hunter2", "a") != seal(KEY, b"hunter2", "a"), "a fresh nonce per seal"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: (OTHER_KEY, b, "source:s1:f"),  # another key
        lambda b: (KEY, b, "source:s2:f"),  # moved to another source
        lambda b: (KEY, b, "source:s1:g"),  # moved to another field
        lambda b: (KEY, b[:-1] + bytes([b[-1] ^ 1]), "source:s1:f"),  # tampered tag
        lambda b: (KEY, bytes([9]) + b[1:], "source:s1:f"),  # unknown key version
        lambda b: (KEY, b[:20], "source:s1:f"),  # truncated
    ],
)
def test_open_refuses_anything_but_the_original_binding(mutate: object) -> None:
    blob = seal(KEY, b"secret", "source:s1:f")
    key, changed, aad = mutate(blob)  # type: ignore[operator]
    with pytest.raises(CryptoError):
        open_sealed(key, changed, aad)


def test_no_or_bad_key_is_an_error() -> None:
    with pytest.raises(CryptoError, match="no secret key"):
        seal(None, b"x", "a")
    with pytest.raises(CryptoError, match="32 bytes"):
        seal(b"short", b"x", "a")
    assert source_aad("id", "private_key") == "source:id:private_key"


async def test_create_get_list_without_plaintext(database: Database) -> None:
    async with database.transaction() as conn:
        gh = await create_source(
            conn,
            key=KEY,
            name="github",
            kind="github",
            config={"app_id": "29310", "api_url": "http://127.0.0.1:1"},
            secrets={"webhook_secret": "s3cret-webhook", "private_key": "-----BEGIN KEY-----"},
        )
        git = await create_source(conn, key=KEY, name="local", kind=SourceKind.GIT, config={"url": "/srv/repo"})
    assert gh.kind is SourceKind.GITHUB and gh.config["app_id"] == 29310 and gh.enabled
    assert gh.secret_fields == ["private_key", "webhook_secret"] and git.secret_fields == []
    dumped = gh.model_dump_json()
    assert "s3cret-webhook" not in dumped and "BEGIN KEY" not in dumped
    async with database.read() as conn:
        raw = (await conn.execute(sa.select(sources.c.secrets).where(sources.c.id == gh.id))).scalar_one()
        assert b"s3cret-webhook" not in raw and b"BEGIN KEY" not in raw
        assert await get_source(conn, gh.id) == gh
        assert await get_source(conn, gh.id, org_id="other") is None
        assert await get_source_by_name(conn, "default", "local") == git
        assert [s.name for s in await list_sources(conn)] == ["github", "local"]
        assert [s.name for s in await list_sources(conn, kind="git")] == ["local"]
        assert await load_source_secrets(conn, gh.id, KEY) == {
            "webhook_secret": "s3cret-webhook",
            "private_key": "-----BEGIN KEY-----",
        }
        with pytest.raises(SourceError, match="wrong key"):
            await load_source_secrets(conn, gh.id, OTHER_KEY)
    # each field is sealed on its own, bound to its source and field
    fields = json.loads(raw)["fields"]
    sealed = base64.b64decode(fields["webhook_secret"])
    assert open_sealed(KEY, sealed, f"source:{gh.id}:webhook_secret") == b"s3cret-webhook"


async def test_secrets_copied_to_another_source_do_not_open(database: Database) -> None:
    async with database.transaction() as conn:
        a = await create_source(
            conn, key=KEY, name="a", kind="git", config={"url": "/a"}, secrets={"webhook_secret": "A"}
        )
        b = await create_source(
            conn, key=KEY, name="b", kind="git", config={"url": "/b"}, secrets={"webhook_secret": "B"}
        )
        blob = (await conn.execute(sa.select(sources.c.secrets).where(sources.c.id == a.id))).scalar_one()
        await conn.execute(sources.update().where(sources.c.id == b.id).values(secrets=blob))
    async with database.read() as conn:
        with pytest.raises(SourceError):
            await load_source_secrets(conn, b.id, KEY)


async def test_update_enable_disable_delete(database: Database) -> None:
    async with database.transaction() as conn:
        src = await create_source(
            conn, key=KEY, name="hooks", kind="generic", config={"auth": "bearer_token"}, secrets={"bearer_token": "t1"}
        )
        updated = await update_source(
            conn, src.id, key=KEY, name="hooks2", config={"auth": "hmac_sha256"}, secrets={"hmac_secret": "h"}
        )
        assert updated is not None and updated.name == "hooks2" and updated.config["auth"] == "hmac_sha256"
        assert updated.secret_fields == ["bearer_token", "hmac_secret"]
        assert await load_source_secrets(conn, src.id, KEY) == {"bearer_token": "t1", "hmac_secret": "h"}
        removed = await update_source(conn, src.id, secrets={"bearer_token": None})
        assert removed is not None and removed.secret_fields == ["hmac_secret"]
        assert await set_source_enabled(conn, src.id, False)
        got = await get_source(conn, src.id)
        assert got is not None and not got.enabled
        assert [s.id for s in await list_sources(conn, enabled_only=True)] == []
        assert await update_source(conn, "nope", name="x") is None
        assert await delete_source(conn, src.id)
        assert not await delete_source(conn, src.id)
        assert await get_source(conn, src.id) is None


@pytest.mark.parametrize(
    ("kind", "config", "secrets", "message"),
    [
        ("github", {}, {}, "config.app_id is required"),
        ("github", {"app_id": 1, "api_url": "ftp://x"}, {}, "http"),
        ("github", {"app_id": 1}, {"hmac_secret": "x"}, "unknown secret 'hmac_secret'"),
        ("git", {}, {}, "config.url is required"),
        ("git", {"url": "/r", "mirror": "yes"}, {}, "config.mirror"),
        ("generic", {"auth": "magic"}, {}, "config.auth"),
        ("generic", {"auth": "ip_allowlist"}, {}, "allowed_ips"),
        ("generic", {"max_payload_bytes": 0}, {}, "max_payload_bytes"),
        ("git", {"url": "/r", "poll_seconds": "60"}, {}, "config.poll_seconds: must be a positive number"),
        ("github", {"app_id": 1, "url": "/r"}, {}, "config.url: unknown key for a github source"),
        ("svn", {}, {}, "unknown source kind"),
        ("git", {"url": "/r"}, {"webhook_secret": ""}, "non-empty"),
    ],
)
async def test_invalid_definitions_are_refused(
    database: Database, kind: str, config: dict[str, object], secrets: dict[str, str], message: str
) -> None:
    async with database.transaction() as conn:
        with pytest.raises(SourceError, match=message):
            await create_source(conn, key=KEY, name="x", kind=kind, config=config, secrets=secrets)


async def test_a_source_stored_before_configs_were_typed_still_loads(database: Database) -> None:
    """Rows the admin API wrote when it kept any key (and never checked `poll_seconds`) read as before:
    stray keys ignored by the typed view, a non-number `poll_seconds` meaning no polling."""
    async with database.transaction() as conn:
        created = await create_source(conn, key=None, name="old", kind="git", config={"url": "/r", "repo": "a/b"})
        legacy = {"url": "/r", "repo": "a/b", "poll_seconds": "60", "hook_installed": True}
        await conn.execute(sa.update(sources).where(sources.c.id == created.id).values(config=legacy))
    async with database.read() as conn:
        found = await get_source(conn, created.id)
    assert found is not None and found.config == legacy  # the API still shows what is stored
    assert found.git_config() == GitSourceConfig(url="/r", repo="a/b")
    with pytest.raises(SourceError, match="is a git source"):
        found.github_config()
    async with database.transaction() as conn:  # a config change must drop the stray key
        with pytest.raises(SourceError, match=r"config\.hook_installed: unknown key"):
            await update_source(conn, created.id, config={**legacy, "poll_seconds": 60})
        fixed = await update_source(conn, created.id, config={"url": "/r", "repo": "a/b", "poll_seconds": 60})
    assert fixed is not None and fixed.git_config().poll_seconds == 60


async def test_names_are_unique_per_org_and_secrets_need_a_key(database: Database) -> None:
    async with database.transaction() as conn:
        await create_source(conn, key=None, name="dup", kind="git", config={"url": "/r"})
        with pytest.raises(SourceError, match="no secret key"):
            await create_source(
                conn, key=None, name="k", kind="git", config={"url": "/r"}, secrets={"webhook_secret": "s"}
            )
    with pytest.raises(IntegrityError):
        async with database.transaction() as conn:
            await create_source(conn, key=os.urandom(32), name="dup", kind="git", config={"url": "/r2"})
