"""Scoped secrets: named values an operator stores for jobs, sealed at rest with AES-256-GCM under the
secret key (associated data `secret:{org}:{scope}:{name}`, so a value copied to another row does not
open). Scopes: `org`, `repo:<owner/name>`, `env:<environment>`.

Nothing here returns a value except `open_secret` and `resolve_secrets` (dispatch, for the names a job
declares):
`SecretInfo`, what listings and writes return, carries the name, scope, fingerprint and dates only.
Every row records the id of the key that sealed it; `reseal_secrets` is one batch of a key rotation.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.crypto import CryptoError, Keyring, fingerprint, open_any, seal, secret_aad
from kici.orchestrator.db.schema import DEFAULT_ORG_ID, new_id, scoped_secrets, utcnow

__all__ = [
    "MAX_VALUE_BYTES",
    "ResolvedSecrets",
    "SecretError",
    "SecretInfo",
    "SecretResealBatch",
    "count_stale_secrets",
    "delete_secret",
    "list_secrets",
    "open_secret",
    "reseal_secrets",
    "resolve_secrets",
    "set_secret",
    "validate_name",
    "validate_scope",
]

MAX_VALUE_BYTES = 64 * 1024
"""Large enough for a PEM key or a kubeconfig; a value is sent to agents whole."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_ENV = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class SecretError(ValueError):
    """A name, scope or value is invalid (the message names which), or a value cannot be opened."""


class SecretInfo(BaseModel):
    """A secret as the API shows it: never its value."""

    model_config = ConfigDict(frozen=True)

    name: str
    scope: str
    fingerprint: str
    created_at: dt.datetime
    updated_at: dt.datetime
    created_by: str | None
    updated_by: str | None


def validate_name(name: str) -> str:
    """Secret names become environment variable names in jobs: letters, digits and `_`, not starting with
    a digit, at most 128 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise SecretError(
            "name must be letters, digits and '_' (not starting with a digit, at most 128 characters)"
        )
    return name


def validate_scope(scope: str) -> str:
    """`org`, `repo:<owner/name>` or `env:<environment>`."""
    if scope == "org":
        return scope
    if isinstance(scope, str) and scope.startswith("repo:") and _REPO.match(scope[5:]):
        return scope
    if isinstance(scope, str) and scope.startswith("env:") and _ENV.match(scope[4:]):
        return scope
    raise SecretError(f"scope must be 'org', 'repo:<owner/name>' or 'env:<environment>', got {scope!r}")


def _check_value(value: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise SecretError("value must be a non-empty string")
    data = value.encode("utf-8")
    if len(data) > MAX_VALUE_BYTES:
        raise SecretError(f"value is larger than {MAX_VALUE_BYTES} bytes")
    return data


def _info(row: Any) -> SecretInfo:
    return SecretInfo.model_validate(
        {k: getattr(row, k) for k in ("name", "scope", "fingerprint", "created_at", "updated_at",
                                      "created_by", "updated_by")}
    )


_INFO_COLUMNS = [scoped_secrets.c[k] for k in ("id", "name", "scope", "fingerprint", "created_at", "updated_at",
                                               "created_by", "updated_by")]


def _sealed(keys: Keyring, org_id: str, scope: str, name: str, data: bytes) -> dict[str, Any]:
    try:
        current = keys.current
        blob = seal(current, data, secret_aad(org_id, scope, name))
        assert current is not None
        return {"value": blob, "key_id": keys.current_id, "fingerprint": fingerprint(current, data)}
    except CryptoError as exc:
        raise SecretError(str(exc)) from None


async def set_secret(
    conn: AsyncConnection,
    keys: Keyring,
    *,
    name: str,
    scope: str,
    value: str,
    org_id: str = DEFAULT_ORG_ID,
    actor: str | None = None,
) -> tuple[SecretInfo, bool]:
    """Create or replace a secret; (its metadata, True when it was created)."""
    validate_name(name)
    validate_scope(scope)
    sealed = _sealed(keys, org_id, scope, name, _check_value(value))
    now = utcnow()
    where = (scoped_secrets.c.org_id == org_id, scoped_secrets.c.scope == scope, scoped_secrets.c.name == name)
    updated = await conn.execute(scoped_secrets.update().where(*where).values(**sealed, updated_at=now,
                                                                               updated_by=actor))
    created = updated.rowcount == 0
    if created:
        await conn.execute(
            scoped_secrets.insert().values(id=new_id(), org_id=org_id, scope=scope, name=name, **sealed,
                                           created_at=now, updated_at=now, created_by=actor, updated_by=actor)
        )
    row = (await conn.execute(sa.select(*_INFO_COLUMNS).where(*where))).one()
    return _info(row), created


async def list_secrets(
    conn: AsyncConnection, *, org_id: str = DEFAULT_ORG_ID, scope: str | None = None
) -> list[SecretInfo]:
    """By scope, then name."""
    query = sa.select(*_INFO_COLUMNS).where(scoped_secrets.c.org_id == org_id)
    if scope is not None:
        query = query.where(scoped_secrets.c.scope == validate_scope(scope))
    query = query.order_by(scoped_secrets.c.scope, scoped_secrets.c.name)
    return [_info(row) for row in await conn.execute(query)]


async def delete_secret(
    conn: AsyncConnection, *, name: str, scope: str, org_id: str = DEFAULT_ORG_ID
) -> SecretInfo | None:
    """The deleted secret's metadata; None when there was none."""
    where = (scoped_secrets.c.org_id == org_id, scoped_secrets.c.scope == validate_scope(scope),
             scoped_secrets.c.name == validate_name(name))
    row = (await conn.execute(sa.select(*_INFO_COLUMNS).where(*where))).first()
    if row is None:
        return None
    await conn.execute(scoped_secrets.delete().where(scoped_secrets.c.id == row.id))
    return _info(row)


async def open_secret(
    conn: AsyncConnection, keys: Keyring, *, name: str, scope: str, org_id: str = DEFAULT_ORG_ID
) -> str | None:
    """The plaintext of one secret (current key first, then the old one); None when it does not exist.
    `SecretError` when no key opens it: never an empty or wrong value."""
    row = (
        await conn.execute(
            sa.select(scoped_secrets.c.value).where(
                scoped_secrets.c.org_id == org_id, scoped_secrets.c.scope == scope, scoped_secrets.c.name == name
            )
        )
    ).first()
    if row is None:
        return None
    try:
        plain, _ = open_any(keys, row.value, secret_aad(org_id, scope, name))
    except CryptoError as exc:
        raise SecretError(f"secret {name} ({scope}): {exc}") from None
    return plain.decode("utf-8")


class ResolvedSecrets(BaseModel):
    """What `resolve_secrets` found: the values (never logged, never stored elsewhere) with the scope each
    came from, and the names no scope holds."""

    model_config = ConfigDict(frozen=True)

    values: dict[str, str]
    scopes: dict[str, str]
    """Name → the scope its value came from."""
    missing: list[str]
    """Declared names found in no scope looked at, in declaration order."""


_RESOLVE = (
    sa.select(scoped_secrets.c.name, scoped_secrets.c.scope, scoped_secrets.c.value)
    .where(
        scoped_secrets.c.org_id == sa.bindparam("v_org"),
        scoped_secrets.c.name.in_(sa.bindparam("v_names", expanding=True)),
        scoped_secrets.c.scope.in_(sa.bindparam("v_scopes", expanding=True)),
    )
)


async def resolve_secrets(
    conn: AsyncConnection, keys: Keyring, *, names: list[str], scopes: list[str], org_id: str = DEFAULT_ORG_ID
) -> ResolvedSecrets:
    """The values of `names`, each from the first of `scopes` (most specific first: `env:…`, `repo:…`,
    `org`) that holds it — one statement for all names and scopes. Only the winning row of each name is
    opened. `SecretError` naming the secret and scope when no key opens it: never an empty or wrong value."""
    if not names:
        return ResolvedSecrets(values={}, scopes={}, missing=[])
    rank = {scope: i for i, scope in enumerate(scopes)}
    best: dict[str, Any] = {}
    for row in await conn.execute(_RESOLVE, {"v_org": org_id, "v_names": names, "v_scopes": scopes}):
        found = best.get(row.name)
        if found is None or rank[row.scope] < rank[found.scope]:
            best[row.name] = row
    values: dict[str, str] = {}
    chosen: dict[str, str] = {}
    for name in names:
        winner = best.get(name)
        if winner is None:
            continue
        try:
            plain, _ = open_any(keys, winner.value, secret_aad(org_id, winner.scope, name))
        except CryptoError as exc:
            raise SecretError(f"secret {name} ({winner.scope}) cannot be opened: {exc}") from None
        values[name] = plain.decode("utf-8")
        chosen[name] = winner.scope
    return ResolvedSecrets(values=values, scopes=chosen, missing=[n for n in names if n not in best])


class SecretResealBatch(BaseModel):
    """One batch of a key rotation over scoped secrets."""

    examined: int
    """Rows not sealed under the current key looked at (0: none left after `after_id`)."""
    resealed: int
    last_id: str | None
    failed: list[str]
    """`secret <name> (<scope>)` for each value no key could open (left as it was)."""


async def reseal_secrets(
    conn: AsyncConnection, keys: Keyring, *, after_id: str | None, limit: int
) -> SecretResealBatch:
    """Re-seal, under the current key, up to `limit` secrets (by id, after `after_id`) another key sealed,
    recomputing their fingerprints. Each UPDATE is conditional on the row being unchanged since it was
    read, so a concurrent `secret set` (sealed with the current key already) is never overwritten."""
    current_id = keys.current_id
    query = sa.select(scoped_secrets).where(scoped_secrets.c.key_id != current_id)
    if after_id is not None:
        query = query.where(scoped_secrets.c.id > after_id)
    rows = (await conn.execute(query.order_by(scoped_secrets.c.id).limit(limit))).all()
    resealed, failed = 0, []
    for row in rows:
        try:
            plain, _ = open_any(keys, row.value, secret_aad(row.org_id, row.scope, row.name))
        except CryptoError:
            failed.append(f"secret {row.name} ({row.scope})")
            continue
        sealed = _sealed(keys, row.org_id, row.scope, row.name, plain)
        result = await conn.execute(
            scoped_secrets.update()
            .where(scoped_secrets.c.id == row.id, scoped_secrets.c.key_id == row.key_id,
                   scoped_secrets.c.value == row.value)
            .values(**sealed)
        )
        resealed += 1 if result.rowcount == 1 else 0
    return SecretResealBatch(examined=len(rows), resealed=resealed, last_id=rows[-1].id if rows else after_id,
                             failed=failed)


async def count_stale_secrets(conn: AsyncConnection, keys: Keyring) -> int:
    """Secrets not sealed under the current key."""
    query = sa.select(sa.func.count()).select_from(scoped_secrets).where(scoped_secrets.c.key_id != keys.current_id)
    return int((await conn.execute(query)).scalar_one())
