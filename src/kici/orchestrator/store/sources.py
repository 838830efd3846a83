"""Sources: where events come from (`git`, `github`, `generic`) and how to verify and read them.

A source's non-secret settings live in `config` (JSON); its secrets live in `secrets`, one blob holding
each field sealed separately with AES-256-GCM (`kici.orchestrator.crypto`, associated data
`source:{id}:{field}`). `Source`, what every function here returns, never carries plaintext: only the
names of the secrets that are set (`secret_fields`). The ingest path, which has to verify signatures and
sign GitHub App JWTs, opens them with `load_source_secrets`.

Secrets per kind:
- `github`: `webhook_secret` (X-Hub-Signature-256), `private_key` (the GitHub App's PEM key).
- `git`: `webhook_secret` (the HMAC a post-receive / post-commit hook signs its notification with).
- `generic`: `hmac_secret` (auth `hmac_sha256`), `bearer_token` (auth `bearer_token`).
- every kind: `notify_secret` (signs the source's outgoing notifications; default `KICI_NOTIFY_SECRET`).

Config per kind (validated on create and update; typed per kind in `store.source_configs`, read through
`Source.typed_config` and `Source.git_config()` / `github_config()` / `generic_config()`):
- `github`: `app_id` (required, integer), `api_url` (default https://api.github.com), `installation_id`
  (optional; otherwise taken from each delivery), `max_payload_bytes`.
- `git`: `url` (required: a local path, `file://…`, or any git URL), `repo` (the name events carry;
  default: derived from the URL), `default_branch` (default `main`), `mirror` (true: read through a bare
  mirror under the data dir even for a local path), `poll_seconds` (poll the branches this often),
  `max_payload_bytes`.
- `generic`: `auth` (`hmac_sha256` | `bearer_token` | `ip_allowlist` | `none`), `signature_header`,
  `allowed_ips`, `allowed_events`, `event_header`, `event_path`, `idempotency_header`,
  `dedup_window_seconds`, `rate_limit_rpm`, `max_payload_bytes`; and where its events' workflows come
  from: `lock_source` (the name or id of a `git` or `github` source of the same org), `repo` (for a
  github lock source: `owner/name`) and `ref` (the branch whose head is read; default: `main`).
- `github`: `trust`, the source's trust policy (`kici.orchestrator.holds.policy.TrustPolicy`; absent: the
  defaults). Git and generic sources have none: their events are trusted.
- every kind: `notify_urls` (URLs that receive the source's runs' signed `run.finished` events) and
  `notify_job_events` (also `job.finished`); see docs/operator/notifications.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Mapping
from functools import cached_property
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.refnames import branch_name_problem
from kici.orchestrator.crypto import CryptoError, Keyring, as_keyring, key_id, open_any, seal, source_aad
from kici.orchestrator.db.schema import DEFAULT_ORG_ID, SourceKind, new_id, sources, utcnow
from kici.orchestrator.holds.policy import TrustPolicyError, parse_policy
from kici.orchestrator.store.source_configs import (
    GenericSourceConfig,
    GithubSourceConfig,
    GitSourceConfig,
    SourceConfig,
    SourceConfigError,
    check_config,
    parse_config,
)

__all__ = [
    "DEFAULT_GITHUB_API_URL",
    "GENERIC_AUTH_METHODS",
    "SECRET_FIELDS",
    "ResealBatch",
    "Source",
    "SourceError",
    "count_stale_source_secrets",
    "create_source",
    "delete_source",
    "get_source",
    "get_source_by_name",
    "list_sources",
    "load_source_secrets",
    "reseal_source_secrets",
    "set_source_enabled",
    "update_source",
]

DEFAULT_GITHUB_API_URL = "https://api.github.com"
GENERIC_AUTH_METHODS = frozenset({"hmac_sha256", "bearer_token", "ip_allowlist", "none"})

SECRET_FIELDS: dict[SourceKind, frozenset[str]] = {
    SourceKind.GITHUB: frozenset({"webhook_secret", "private_key", "notify_secret"}),
    SourceKind.GIT: frozenset({"webhook_secret", "notify_secret"}),
    SourceKind.GENERIC: frozenset({"hmac_secret", "bearer_token", "notify_secret"}),
}

_BLOB_VERSION = 1


class SourceError(ValueError):
    """A source's definition is invalid (the message names the field), or its secrets cannot be opened."""


_C = TypeVar("_C", GitSourceConfig, GithubSourceConfig, GenericSourceConfig)


class Source(BaseModel):
    """A source as the API shows it: no secret values, only which secrets are set."""

    model_config = ConfigDict(frozen=True)

    id: str
    org_id: str
    name: str
    kind: SourceKind
    enabled: bool
    config: dict[str, Any]
    secret_fields: list[str]
    created_at: dt.datetime
    updated_at: dt.datetime

    @cached_property
    def typed_config(self) -> SourceConfig:
        """`config` as its kind's model (`store.source_configs.parse_config`: lenient with older rows)."""
        try:
            return parse_config(self.kind, self.config)
        except SourceConfigError as exc:
            raise SourceError(f"source {self.name!r}: {exc}") from None

    def git_config(self) -> GitSourceConfig:
        return self._config_of(GitSourceConfig)

    def github_config(self) -> GithubSourceConfig:
        return self._config_of(GithubSourceConfig)

    def generic_config(self) -> GenericSourceConfig:
        return self._config_of(GenericSourceConfig)

    def _config_of(self, model: type[_C]) -> _C:
        config = self.typed_config
        if not isinstance(config, model):
            raise SourceError(f"source {self.name!r} is a {self.kind.value} source ({model.__name__} asked for)")
        return config


# -- validation -------------------------------------------------------------------------------------


def _positive_int(config: Mapping[str, Any], key: str, *, required: bool = False) -> None:
    value = config.get(key)
    if value is None:
        if required:
            raise SourceError(f"config.{key} is required")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SourceError(f"config.{key} must be a positive integer")


def _string(config: Mapping[str, Any], key: str, *, required: bool = False) -> None:
    value = config.get(key)
    if value is None:
        if required:
            raise SourceError(f"config.{key} is required")
        return
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"config.{key} must be a non-empty string")


def validate_config(kind: SourceKind, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config, checked for `kind`; `SourceError` names the first problem."""
    if not isinstance(config, Mapping):
        raise SourceError("config must be an object")
    out = dict(config)
    _positive_int(out, "max_payload_bytes")
    _notify(out)
    if out.get("trust") is not None:
        # git and generic sources' events come from the operator's own systems: trusted, no policy to keep
        if kind is not SourceKind.GITHUB:
            raise SourceError("config.trust: only github sources have a trust policy (git and generic events "
                              "are trusted)")
        try:
            out["trust"] = parse_policy(out["trust"]).model_dump(mode="json")
        except TrustPolicyError as exc:
            raise SourceError(str(exc)) from None
    if kind is SourceKind.GITHUB:
        if isinstance(out.get("app_id"), str) and out["app_id"].strip().isdigit():
            out["app_id"] = int(out["app_id"].strip())
        _positive_int(out, "app_id", required=True)
        _positive_int(out, "installation_id")
        _string(out, "api_url")
        if "api_url" in out and not str(out["api_url"]).startswith(("http://", "https://")):
            raise SourceError("config.api_url must be an http(s) URL")
    elif kind is SourceKind.GIT:
        _string(out, "url", required=True)
        _string(out, "repo")
        _string(out, "default_branch")
        _branch(out, "default_branch")
        if "mirror" in out and not isinstance(out["mirror"], bool):
            raise SourceError("config.mirror must be true or false")
    else:
        auth = out.get("auth", "hmac_sha256")
        if auth not in GENERIC_AUTH_METHODS:
            raise SourceError(f"config.auth must be one of {', '.join(sorted(GENERIC_AUTH_METHODS))}")
        out["auth"] = auth
        strings = ("signature_header", "event_header", "event_path", "idempotency_header", "repo", "ref", "lock_source")
        for key in strings:
            _string(out, key)
        _branch(out, "ref")
        for key in ("dedup_window_seconds", "rate_limit_rpm"):
            _positive_int(out, key)
        for key in ("allowed_events", "allowed_ips"):
            value = out.get(key)
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                raise SourceError(f"config.{key} must be a list of strings")
        if auth == "ip_allowlist" and not out.get("allowed_ips"):
            raise SourceError("config.allowed_ips is required for auth ip_allowlist")
    try:
        check_config(kind, out)  # the kind's model: types, and no key the kind does not know
    except SourceConfigError as exc:
        raise SourceError(str(exc)) from None
    return out


def _branch(config: dict[str, Any], key: str) -> None:
    """A branch name git would accept (`git check-ref-format --branch`)."""
    value = config.get(key)
    if isinstance(value, str):
        problem = branch_name_problem(value)
        if problem is not None:
            raise SourceError(f"config.{key}: invalid branch name {value!r}: {problem}")


def _notify(config: dict[str, Any]) -> None:
    urls = config.get("notify_urls")
    if urls is not None:
        if isinstance(urls, str):
            urls = config["notify_urls"] = [u.strip() for u in urls.split(",") if u.strip()]
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise SourceError("config.notify_urls must be a list of URLs")
        for url in urls:
            if not re.match(r"^https?://[^\s/?#]+(/\S*)?$", url):
                raise SourceError(f"config.notify_urls: {url!r} is not an http(s) URL")
    if "notify_job_events" in config and not isinstance(config["notify_job_events"], bool):
        raise SourceError("config.notify_job_events must be true or false")


def _check_secret_names(kind: SourceKind, names: Mapping[str, Any]) -> None:
    unknown = sorted(set(names) - SECRET_FIELDS[kind])
    if unknown:
        allowed = ", ".join(sorted(SECRET_FIELDS[kind]))
        raise SourceError(f"unknown secret {unknown[0]!r} for a {kind.value} source (allowed: {allowed})")


# -- the secrets blob -------------------------------------------------------------------------------


def _decode_blob(blob: bytes | None) -> dict[str, str]:
    """field → base64 of the sealed value."""
    return _read_blob(blob)[0]


def _read_blob(blob: bytes | None) -> tuple[dict[str, str], dict[str, str]]:
    """(field → base64 of the sealed value, field → id of the key that sealed it). Blobs written before
    key ids were recorded have none: those fields are opened by trying each key."""
    if not blob:
        return {}, {}
    try:
        data = json.loads(blob)
    except ValueError:
        raise SourceError("source secrets are unreadable (not a KiCI secrets blob)") from None
    if not isinstance(data, dict) or data.get("v") != _BLOB_VERSION or not isinstance(data.get("fields"), dict):
        raise SourceError("source secrets are unreadable (unknown blob version)")
    recorded = data.get("key_ids")
    key_ids: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    return {str(k): str(v) for k, v in data["fields"].items()}, {str(k): str(v) for k, v in key_ids.items()}


def _encode_blob(fields: Mapping[str, str], key_ids: Mapping[str, str]) -> bytes | None:
    if not fields:
        return None
    kept = {name: key_ids[name] for name in sorted(fields) if name in key_ids}
    return json.dumps({"v": _BLOB_VERSION, "fields": dict(sorted(fields.items())), "key_ids": kept}).encode()


def _seal_fields(
    key: Keyring | bytes | None, source_id: str, values: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The values sealed under the current key, and that key's id per field."""
    current = as_keyring(key).current
    sealed: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(value, str) or not value:
            raise SourceError(f"secret {name!r} must be a non-empty string")
        try:
            blob = seal(current, value.encode("utf-8"), source_aad(source_id, name))
        except CryptoError as exc:
            raise SourceError(str(exc)) from None
        sealed[name] = base64.b64encode(blob).decode("ascii")
    ids = {name: key_id(current) for name in sealed} if current is not None else {}
    return sealed, ids


# -- rows -------------------------------------------------------------------------------------------


_COLUMNS = [c for c in sources.c if c.name != "secrets"]


def _source(row: Any) -> Source:
    data = dict(row._mapping)
    blob = data.pop("secrets", None)
    return Source(**data, secret_fields=sorted(_decode_blob(blob)))


def _select() -> sa.Select[Any]:
    return sa.select(*_COLUMNS, sources.c.secrets)


async def create_source(
    conn: AsyncConnection,
    *,
    key: Keyring | bytes | None,
    name: str,
    kind: SourceKind | str,
    config: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str] | None = None,
    enabled: bool = True,
    org_id: str = DEFAULT_ORG_ID,
) -> Source:
    """A new source; `secrets` are sealed with `key` (None only works for a source without secrets)."""
    try:
        kind = SourceKind(kind)
    except ValueError:
        raise SourceError(f"unknown source kind {kind!r} (git, github, generic)") from None
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise SourceError("name must be a non-empty string without '/'")
    checked = validate_config(kind, config or {})
    secrets = dict(secrets or {})
    _check_secret_names(kind, secrets)
    source_id = new_id()
    now = utcnow()
    await conn.execute(
        sources.insert().values(
            id=source_id,
            org_id=org_id,
            name=name.strip(),
            kind=kind.value,
            enabled=enabled,
            config=checked,
            secrets=_encode_blob(*_seal_fields(key, source_id, secrets)),
            created_at=now,
            updated_at=now,
        )
    )
    found = await get_source(conn, source_id)
    assert found is not None
    return found


async def get_source(conn: AsyncConnection, source_id: str, *, org_id: str | None = None) -> Source | None:
    query = _select().where(sources.c.id == source_id)
    if org_id is not None:
        query = query.where(sources.c.org_id == org_id)
    row = (await conn.execute(query)).first()
    return _source(row) if row is not None else None


async def get_source_by_key(conn: AsyncConnection, org_id: str, key: str) -> Source | None:
    """The org's source whose id is `key`, else the one named `key` (one query: webhooks address sources
    either way, and this runs for every delivery)."""
    row = (
        await conn.execute(
            _select()
            .where(sources.c.org_id == org_id, sa.or_(sources.c.id == key, sources.c.name == key))
            .order_by(sa.case((sources.c.id == key, 0), else_=1))
            .limit(1)
        )
    ).first()
    return _source(row) if row is not None else None


async def get_source_by_name(conn: AsyncConnection, org_id: str, name: str) -> Source | None:
    row = (await conn.execute(_select().where(sources.c.org_id == org_id, sources.c.name == name))).first()
    return _source(row) if row is not None else None


async def list_sources(
    conn: AsyncConnection,
    *,
    org_id: str = DEFAULT_ORG_ID,
    kind: SourceKind | str | None = None,
    enabled_only: bool = False,
) -> list[Source]:
    query = _select().where(sources.c.org_id == org_id)
    if kind is not None:
        query = query.where(sources.c.kind == SourceKind(kind).value)
    if enabled_only:
        query = query.where(sources.c.enabled.is_(True))
    rows = await conn.execute(query.order_by(sources.c.created_at, sources.c.id))
    return [_source(row) for row in rows]


async def enabled_sources_of_kind(conn: AsyncConnection, kind: SourceKind) -> list[Source]:
    """Every org's enabled sources of one kind (for services that act on all of them, e.g. the poller)."""
    query = _select().where(sources.c.kind == kind.value, sources.c.enabled.is_(True))
    return [_source(row) for row in await conn.execute(query.order_by(sources.c.created_at, sources.c.id))]


async def update_source(
    conn: AsyncConnection,
    source_id: str,
    *,
    key: Keyring | bytes | None = None,
    org_id: str | None = None,
    name: str | None = None,
    config: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str | None] | None = None,
) -> Source | None:
    """Change a source; None when it does not exist. `config` replaces the whole config; `secrets` is
    merged field by field (a value of None removes that secret; others are re-sealed with `key`)."""
    current = (
        await conn.execute(
            _select().where(sources.c.id == source_id, *([sources.c.org_id == org_id] if org_id else []))
        )
    ).first()
    if current is None:
        return None
    kind = SourceKind(current.kind)
    values: dict[str, Any] = {"updated_at": utcnow()}
    if name is not None:
        if not name.strip() or "/" in name:
            raise SourceError("name must be a non-empty string without '/'")
        values["name"] = name.strip()
    if config is not None:
        values["config"] = validate_config(kind, config)
    if secrets is not None:
        _check_secret_names(kind, secrets)
        fields, key_ids = _read_blob(current.secrets)
        for field_name, value in secrets.items():
            if value is None:
                fields.pop(field_name, None)
        sealed, sealed_ids = _seal_fields(key, source_id, {k: v for k, v in secrets.items() if v is not None})
        fields.update(sealed)
        key_ids.update(sealed_ids)
        values["secrets"] = _encode_blob(fields, key_ids)
    await conn.execute(sources.update().where(sources.c.id == source_id).values(**values))
    return await get_source(conn, source_id)


async def set_source_enabled(
    conn: AsyncConnection, source_id: str, enabled: bool, *, org_id: str | None = None
) -> bool:
    query = sources.update().where(sources.c.id == source_id)
    if org_id is not None:
        query = query.where(sources.c.org_id == org_id)
    result = await conn.execute(query.values(enabled=enabled, updated_at=utcnow()))
    return result.rowcount == 1


async def delete_source(conn: AsyncConnection, source_id: str, *, org_id: str | None = None) -> bool:
    query = sources.delete().where(sources.c.id == source_id)
    if org_id is not None:
        query = query.where(sources.c.org_id == org_id)
    result = await conn.execute(query)
    return result.rowcount == 1


async def load_source_secrets(
    conn: AsyncConnection, source_id: str, key: Keyring | bytes | None
) -> dict[str, str]:
    """The plaintext secrets of a source (for the ingest path only; never returned by the API), opened
    with the current key, else the old one during a rotation. `SourceError` when a secret cannot be opened
    (another key, a tampered or moved blob)."""
    blob = (await conn.execute(sa.select(sources.c.secrets).where(sources.c.id == source_id))).scalar_one_or_none()
    out: dict[str, str] = {}
    for field_name, encoded in _decode_blob(blob).items():
        try:
            plain, _ = open_any(key, base64.b64decode(encoded), source_aad(source_id, field_name))
            out[field_name] = plain.decode("utf-8")
        except (CryptoError, ValueError) as exc:
            raise SourceError(f"secret {field_name!r} of source {source_id}: {exc}") from None
    return out


class ResealBatch(BaseModel):
    """One batch of a key rotation over source secrets."""

    examined: int
    """Sources with secrets looked at in this batch (0: the pass is complete)."""
    resealed: int
    """Secret fields re-sealed under the current key."""
    last_id: str | None
    """Where the next batch starts (exclusive)."""
    failed: list[str]
    """`source <name>: field <field>` for each field no key could open (left as it was)."""


async def reseal_source_secrets(
    conn: AsyncConnection, keys: Keyring, *, after_id: str | None, limit: int
) -> ResealBatch:
    """Re-seal, under the current key, the secret fields of up to `limit` sources (by id, after `after_id`)
    that another key sealed. Each row is rewritten only if it is unchanged since it was read (a conditional
    UPDATE), so a concurrent `source update` is never overwritten; that writer sealed with the current key."""
    current_id = keys.current_id
    query = sa.select(sources.c.id, sources.c.name, sources.c.secrets).where(sources.c.secrets.is_not(None))
    if after_id is not None:
        query = query.where(sources.c.id > after_id)
    rows = (await conn.execute(query.order_by(sources.c.id).limit(limit))).all()
    resealed, failed = 0, []
    for row in rows:
        fields, key_ids = _read_blob(row.secrets)
        stale = [name for name in fields if key_ids.get(name) != current_id]
        if not stale:
            continue
        changed = 0
        for name in stale:
            try:
                plain, _ = open_any(keys, base64.b64decode(fields[name]), source_aad(row.id, name))
            except (CryptoError, ValueError):
                failed.append(f"source {row.name}: field {name}")
                continue
            sealed, sealed_ids = _seal_fields(keys, row.id, {name: plain.decode("utf-8")})
            fields.update(sealed)
            key_ids.update(sealed_ids)
            changed += 1
        if changed:
            result = await conn.execute(
                sources.update()
                .where(sources.c.id == row.id, sources.c.secrets == row.secrets)
                .values(secrets=_encode_blob(fields, key_ids))
            )
            resealed += changed if result.rowcount == 1 else 0
    return ResealBatch(examined=len(rows), resealed=resealed, last_id=rows[-1].id if rows else after_id,
                       failed=failed)


async def count_stale_source_secrets(conn: AsyncConnection, keys: Keyring) -> int:
    """Secret fields of all sources not (known to be) sealed under the current key."""
    current_id = keys.current_id
    total = 0
    for (blob,) in await conn.execute(sa.select(sources.c.secrets).where(sources.c.secrets.is_not(None))):
        fields, key_ids = _read_blob(blob)
        total += sum(1 for name in fields if key_ids.get(name) != current_id)
    return total
