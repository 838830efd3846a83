"""The scoped secret store: sealing (AES-256-GCM bound to org, scope and name), fingerprints, the REST routes
(write-only for values, 422 naming the field with nothing written, audit rows with names only), reads under
the old key, and key rotation in batches over scoped secrets and source secrets."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from kici.orchestrator.app import create_app
from kici.orchestrator.config import Settings
from kici.orchestrator.crypto import Keyring, fingerprint, key_id, seal, source_aad
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import AdminRole, scoped_secrets, sources
from kici.orchestrator.key_rotation import rotate_key
from kici.orchestrator.store import audit, tokens
from kici.orchestrator.store import secrets as store
from kici.orchestrator.store.secrets import SecretError
from kici.orchestrator.store.sources import SourceError, create_source, load_source_secrets, update_source

API = "/api/v1/admin"
K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)
VALUE = "pypi-AgEIcHlwaS5vcmc-very-secret"


async def _rows(database: Database) -> list[sa.Row[tuple[object, ...]]]:
    async with database.read() as conn:
        return list((await conn.execute(sa.select(scoped_secrets).order_by(scoped_secrets.c.name))).all())


# -- the store --------------------------------------------------------------------------------------


async def test_set_list_open_delete(database: Database) -> None:
    keys = Keyring(K1)
    async with database.transaction() as conn:
        info, created = await store.set_secret(conn, keys, name="PYPI_TOKEN", scope="org", value=VALUE, actor="t1")
        assert created and info.fingerprint == fingerprint(K1, VALUE.encode())
        again, created = await store.set_secret(conn, keys, name="PYPI_TOKEN", scope="org", value=VALUE + "2",
                                                actor="t2")
        assert not created and again.fingerprint != info.fingerprint
        assert (again.created_by, again.updated_by, again.created_at) == ("t1", "t2", info.created_at)
        await store.set_secret(conn, keys, name="PYPI_TOKEN", scope="repo:acme/app", value=VALUE)
        await store.set_secret(conn, keys, name="DEPLOY_KEY", scope="env:production", value="x\ny")
    async with database.read() as conn:
        listed = await store.list_secrets(conn)
        assert [(s.scope, s.name) for s in listed] == [
            ("env:production", "DEPLOY_KEY"), ("org", "PYPI_TOKEN"), ("repo:acme/app", "PYPI_TOKEN")]
        assert [s.name for s in await store.list_secrets(conn, scope="repo:acme/app")] == ["PYPI_TOKEN"]
        assert await store.open_secret(conn, keys, name="PYPI_TOKEN", scope="org") == VALUE + "2"
        assert await store.open_secret(conn, keys, name="DEPLOY_KEY", scope="env:production") == "x\ny"
        assert await store.open_secret(conn, keys, name="NOPE", scope="org") is None
    rows = await _rows(database)
    assert all(VALUE.encode() not in bytes(r.value) for r in rows)
    assert {r.key_id for r in rows} == {key_id(K1)}
    async with database.transaction() as conn:
        deleted = await store.delete_secret(conn, name="PYPI_TOKEN", scope="org")
        assert deleted is not None and deleted.name == "PYPI_TOKEN"
        assert await store.delete_secret(conn, name="PYPI_TOKEN", scope="org") is None
    assert len(await _rows(database)) == 2


async def test_same_value_seals_differently_and_a_moved_ciphertext_does_not_open(database: Database) -> None:
    keys = Keyring(K1)
    async with database.transaction() as conn:
        await store.set_secret(conn, keys, name="A", scope="env:prod", value=VALUE)
        await store.set_secret(conn, keys, name="A", scope="env:staging", value=VALUE)
    prod, staging = sorted(await _rows(database), key=lambda r: r.scope)
    assert prod.value != staging.value and prod.fingerprint == staging.fingerprint
    async with database.transaction() as conn:  # an attacker with database access copies prod's blob
        await conn.execute(scoped_secrets.update().where(scoped_secrets.c.id == staging.id).values(value=prod.value))
    async with database.read() as conn:
        with pytest.raises(SecretError, match=r"secret A \(env:staging\)"):
            await store.open_secret(conn, keys, name="A", scope="env:staging")
        with pytest.raises(SecretError):  # another key: an error, never an empty or wrong value
            await store.open_secret(conn, Keyring(K2), name="A", scope="env:prod")


@pytest.mark.parametrize(
    ("name", "scope", "value", "message"),
    [
        ("1BAD", "org", "v", "name must be letters"),
        ("BAD-NAME", "org", "v", "name must be letters"),
        ("OK", "repo:acme", "v", "scope must be"),
        ("OK", "team:x", "v", "scope must be"),
        ("OK", "env:", "v", "scope must be"),
        ("OK", "org", "", "value must be a non-empty string"),
        ("OK", "org", "x" * (store.MAX_VALUE_BYTES + 1), "larger than"),
    ],
)
async def test_bad_input_writes_nothing(database: Database, name: str, scope: str, value: str, message: str) -> None:
    with pytest.raises(SecretError, match=message):
        async with database.transaction() as conn:
            await store.set_secret(conn, Keyring(K1), name=name, scope=scope, value=value)
    assert await _rows(database) == []


# -- the old key and rotation -----------------------------------------------------------------------


async def test_rotation_in_batches_with_the_old_key(database: Database) -> None:
    async with database.transaction() as conn:
        for i in range(5):
            await store.set_secret(conn, Keyring(K1), name=f"S{i}", scope="org", value=f"value-{i}")
        source = await create_source(conn, key=K1, name="hooks", kind="generic", config={"auth": "hmac_sha256"},
                                     secrets={"hmac_secret": "hook-secret", "notify_secret": "notify"})
    rotating = Keyring(K2, old=K1)
    async with database.read() as conn:  # before any re-sealing, reads work through the old key
        assert await store.open_secret(conn, rotating, name="S3", scope="org") == "value-3"
        assert await load_source_secrets(conn, source.id, rotating) == {"hmac_secret": "hook-secret",
                                                                        "notify_secret": "notify"}
        with pytest.raises(SourceError):
            await load_source_secrets(conn, source.id, Keyring(K2))
        assert await store.count_stale_secrets(conn, rotating) == 5
    # An interrupted rotation: one batch of two, then a value not re-sealed yet is replaced (under the new key).
    async with database.transaction() as conn:
        batch = await store.reseal_secrets(conn, rotating, after_id=None, limit=2)
        assert (batch.examined, batch.resealed, batch.failed) == (2, 2, [])
    replaced = next(r.name for r in await _rows(database) if r.key_id == key_id(K1))
    async with database.transaction() as conn:
        await store.set_secret(conn, rotating, name=replaced, scope="org", value="newer")
    async with database.read() as conn:
        assert await store.count_stale_secrets(conn, rotating) == 2
    result = await rotate_key(database, rotating, batch_size=2)
    assert (result.secrets_resealed, result.source_secrets_resealed, result.failed, result.remaining) == (2, 2, [], 0)
    assert (result.key_id, result.old_key_id) == (key_id(K2), key_id(K1))
    rows = await _rows(database)
    assert {r.key_id for r in rows} == {key_id(K2)}
    assert {r.fingerprint for r in rows if r.name != replaced} == {fingerprint(K2, f"value-{r.name[1]}".encode())
                                                                   for r in rows if r.name != replaced}
    # The old key is gone: everything opens with the new key alone; the value written meanwhile survived.
    only_new = Keyring(K2)
    async with database.read() as conn:
        assert [await store.open_secret(conn, only_new, name=f"S{i}", scope="org") for i in range(5)] == [
            "newer" if f"S{i}" == replaced else f"value-{i}" for i in range(5)]
        assert await load_source_secrets(conn, source.id, only_new) == {"hmac_secret": "hook-secret",
                                                                        "notify_secret": "notify"}
    again = await rotate_key(database, only_new)  # re-running is harmless
    assert (again.secrets_resealed, again.source_secrets_resealed, again.remaining) == (0, 0, 0)


async def test_rotation_reports_what_no_key_opens_and_leaves_it(database: Database) -> None:
    async with database.transaction() as conn:
        await store.set_secret(conn, Keyring(K3), name="LOST", scope="repo:acme/app", value="gone")
        await store.set_secret(conn, Keyring(K1), name="KEPT", scope="org", value="kept")
        source = await create_source(conn, key=K1, name="src", kind="git", config={"url": "/srv/app.git"},
                                     secrets={"webhook_secret": "w"})
        await update_source(conn, source.id, key=K3, secrets={"notify_secret": "n"})  # one field under K3
    result = await rotate_key(database, Keyring(K2, old=K1))
    assert sorted(result.failed) == ["secret LOST (repo:acme/app)", "source src: field notify_secret"]
    assert (result.secrets_resealed, result.source_secrets_resealed, result.remaining) == (1, 1, 2)
    lost = next(r for r in await _rows(database) if r.name == "LOST")
    assert lost.key_id == key_id(K3)
    async with database.read() as conn:
        assert await store.open_secret(conn, Keyring(K3), name="LOST", scope="repo:acme/app") == "gone"


async def test_source_blob_from_before_key_ids_opens_and_is_rotated(database: Database) -> None:
    async with database.transaction() as conn:
        source = await create_source(conn, key=K1, name="old", kind="git", config={"url": "/srv/a.git"})
        legacy = {"v": 1, "fields": {"webhook_secret": base64.b64encode(
            seal(K1, b"legacy", source_aad(source.id, "webhook_secret"))).decode()}}
        await conn.execute(sources.update().where(sources.c.id == source.id)
                           .values(secrets=json.dumps(legacy).encode()))
    async with database.read() as conn:
        assert await load_source_secrets(conn, source.id, Keyring(K2, old=K1)) == {"webhook_secret": "legacy"}
    result = await rotate_key(database, Keyring(K2, old=K1))
    assert (result.source_secrets_resealed, result.remaining) == (1, 0)
    async with database.read() as conn:
        assert await load_source_secrets(conn, source.id, Keyring(K2)) == {"webhook_secret": "legacy"}


# -- the REST routes --------------------------------------------------------------------------------


@dataclass
class Api:
    http: httpx.AsyncClient
    database: Database
    owner: str
    admin: str
    auditor: str

    async def call(self, token: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        return await self.http.request(method, API + path, headers={"Authorization": f"Bearer {token}"},
                                       **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def api(database: Database, tmp_path: Path) -> AsyncIterator[Api]:
    async with database.transaction() as conn:
        made = {r: (await tokens.create_admin_token(conn, name=r.value, role=r)).plaintext
                for r in (AdminRole.OWNER, AdminRole.ADMIN, AdminRole.AUDITOR)}
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url), database, secret_key=K1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://o") as http:
        yield Api(http, database, made[AdminRole.OWNER], made[AdminRole.ADMIN], made[AdminRole.AUDITOR])


async def test_routes_are_write_only_and_audited(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    answers = []
    with caplog.at_level(logging.DEBUG, logger="kici.orchestrator"):
        created = await api.call(api.admin, "PUT", "/secrets/PYPI_TOKEN", json={"scope": "org", "value": VALUE})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["created"] is True and body["fingerprint"] == fingerprint(K1, VALUE.encode())
        assert set(body) == {"name", "scope", "fingerprint", "created_at", "updated_at", "created_by", "updated_by",
                             "created"}
        updated = await api.call(api.admin, "PUT", "/secrets/PYPI_TOKEN", json={"scope": "org", "value": VALUE})
        assert (updated.status_code, updated.json()["created"]) == (200, False)
        await api.call(api.admin, "PUT", "/secrets/PYPI_TOKEN", json={"scope": "repo:acme/app", "value": VALUE})
        listed = await api.call(api.auditor, "GET", "/secrets")
        assert [(s["name"], s["scope"]) for s in listed.json()] == [("PYPI_TOKEN", "org"),
                                                                    ("PYPI_TOKEN", "repo:acme/app")]
        scoped = await api.call(api.auditor, "GET", "/secrets", params={"scope": "repo:acme/app"})
        assert len(scoped.json()) == 1
        deleted = await api.call(api.admin, "DELETE", "/secrets/PYPI_TOKEN", params={"scope": "org"})
        assert deleted.status_code == 200 and deleted.json()["scope"] == "org"
        missing = await api.call(api.admin, "DELETE", "/secrets/PYPI_TOKEN", params={"scope": "org"})
        assert missing.status_code == 404 and missing.json() == {"error": "no secret PYPI_TOKEN in scope org"}
        rotated = await api.call(api.owner, "POST", "/rotate-key")
        assert rotated.status_code == 200 and rotated.json()["remaining"] == 0
        answers = [created, updated, listed, scoped, deleted, missing, rotated]
    assert all(VALUE not in r.text for r in answers)
    assert all(VALUE not in (r.getMessage() + json.dumps(getattr(r, "kici_fields", {}), default=str))
               for r in caplog.records)
    async with api.database.read() as conn:
        rows = [r for r in await audit.list_audit(conn, outcome="allowed", limit=100)]
    assert sorted((r.action, r.reason) for r in rows if r.action.startswith("secret.")) == [
        ("secret.delete", "secret PYPI_TOKEN (org) deleted"),
        ("secret.set", "secret PYPI_TOKEN (org) created"),
        ("secret.set", "secret PYPI_TOKEN (org) updated"),
        ("secret.set", "secret PYPI_TOKEN (repo:acme/app) created"),
    ]
    [rotation] = [r for r in rows if r.action == "key.rotate"]
    assert rotation.permission == "key:rotate" and "0 secrets and 0 source secrets" in (rotation.reason or "")
    assert all(VALUE not in r.model_dump_json() for r in rows)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "message"),
    [
        ("PUT", "/secrets/BAD-NAME", {"json": {"scope": "org", "value": "v"}}, "name (path): name must be"),
        ("PUT", "/secrets/OK", {"json": {"scope": "repo:nope", "value": "v"}}, "scope: scope must be"),
        ("PUT", "/secrets/OK", {"json": {"scope": "org", "value": ""}}, "value: value must be a non-empty"),
        ("PUT", "/secrets/OK", {"json": {"scope": "org", "value": 12345}}, "value: Input should be a valid string"),
        ("PUT", "/secrets/OK", {"json": {"value": "v"}}, "scope: Field required"),
        ("DELETE", "/secrets/OK", {}, "scope (query): Field required"),
        ("GET", "/secrets", {"params": {"scope": "nope"}}, "scope (query): scope must be"),
    ],
)
async def test_bad_requests_are_422_naming_the_field(
    api: Api, method: str, path: str, kwargs: dict[str, object], message: str
) -> None:
    response = await api.call(api.admin, method, path, **kwargs)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]
    assert "12345" not in response.text
    assert await _rows(api.database) == []


async def test_without_a_secret_key_nothing_is_stored(database: Database, tmp_path: Path) -> None:
    async with database.transaction() as conn:
        owner = (await tokens.create_admin_token(conn, name="o", role=AdminRole.OWNER)).plaintext
    app = create_app(Settings(data_dir=tmp_path, database_url=database.url), database, secret_key=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://o") as http:
        headers = {"Authorization": f"Bearer {owner}"}
        put = await http.put(API + "/secrets/A", json={"scope": "org", "value": "v"}, headers=headers)
        assert put.status_code == 503 and "no secret key" in put.json()["error"]
        rotate = await http.post(API + "/rotate-key", headers=headers)
        assert rotate.status_code == 503
    assert await _rows(database) == []
