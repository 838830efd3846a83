"""Job caches (the `caches` table): one row per saved cache entry; its archive is a blob (`blob_key`) in the
orchestrator's blob store (kici.orchestrator.caches)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import caches, new_id, utcnow


class CacheScope(BaseModel):
    """The repository a cache belongs to."""

    org_id: str
    source_id: str
    """The run's source, or `""` for runs without one."""
    repo: str


class CacheRecord(BaseModel):
    id: str
    org_id: str
    source_id: str
    repo: str
    namespace: str
    key: str
    blob_key: str
    size: int
    sha256: str
    run_id: str | None
    created_at: dt.datetime
    last_used_at: dt.datetime


def _of(row: sa.Row[tuple[object, ...]] | None) -> CacheRecord | None:
    return None if row is None else CacheRecord.model_validate(dict(row._mapping))


def _in_scope(scope: CacheScope) -> sa.ColumnElement[bool]:
    return sa.and_(caches.c.org_id == scope.org_id, caches.c.source_id == scope.source_id,
                   caches.c.repo == scope.repo)


async def find_exact(conn: AsyncConnection, scope: CacheScope, namespace: str, key: str) -> CacheRecord | None:
    row = (
        await conn.execute(
            sa.select(caches).where(_in_scope(scope), caches.c.namespace == namespace, caches.c.key == key)
        )
    ).first()
    return _of(row)


async def find_newest_with_prefix(
    conn: AsyncConnection, scope: CacheScope, namespace: str, prefix: str
) -> CacheRecord | None:
    """The newest entry (by save time) whose key starts with `prefix` (compared exactly, no wildcards)."""
    row = (
        await conn.execute(
            sa.select(caches)
            .where(_in_scope(scope), caches.c.namespace == namespace,
                   sa.func.substr(caches.c.key, 1, len(prefix)) == prefix)
            .order_by(caches.c.created_at.desc(), caches.c.id.desc())
            .limit(1)
        )
    ).first()
    return _of(row)


async def touch(conn: AsyncConnection, cache_id: str, now: dt.datetime | None = None) -> None:
    await conn.execute(caches.update().where(caches.c.id == cache_id).values(last_used_at=now or utcnow()))


async def insert(
    conn: AsyncConnection, scope: CacheScope, *, namespace: str, key: str, blob_key: str, size: int, sha256: str,
    run_id: str | None, now: dt.datetime | None = None,
) -> CacheRecord:
    """Raises `IntegrityError` when the key exists in the namespace (keys are immutable)."""
    at = now or utcnow()
    values = {
        "id": new_id(), **scope.model_dump(), "namespace": namespace, "key": key, "blob_key": blob_key,
        "size": size, "sha256": sha256, "run_id": run_id, "created_at": at, "last_used_at": at,
    }
    await conn.execute(caches.insert().values(**values))
    return CacheRecord.model_validate(values)


async def repo_bytes(conn: AsyncConnection, scope: CacheScope) -> int:
    query = sa.select(sa.func.coalesce(sa.func.sum(caches.c.size), 0)).where(_in_scope(scope))
    return int((await conn.execute(query)).scalar_one())


async def least_recently_used(conn: AsyncConnection, scope: CacheScope, *, keep: str | None = None,
                              limit: int = 500) -> list[CacheRecord]:
    """The scope's entries, least recently used first (leaving out the entry `keep`)."""
    query = sa.select(caches).where(_in_scope(scope))
    if keep is not None:
        query = query.where(caches.c.id != keep)
    rows = await conn.execute(query.order_by(caches.c.last_used_at, caches.c.created_at, caches.c.id).limit(limit))
    return [CacheRecord.model_validate(dict(r._mapping)) for r in rows]


async def unused_since(conn: AsyncConnection, before: dt.datetime, *, limit: int = 500) -> list[CacheRecord]:
    rows = await conn.execute(
        sa.select(caches).where(caches.c.last_used_at < before).order_by(caches.c.last_used_at).limit(limit)
    )
    return [CacheRecord.model_validate(dict(r._mapping)) for r in rows]


async def list_caches(
    conn: AsyncConnection, *, org_id: str, repo: str | None = None, key_prefix: str | None = None,
    limit: int | None = None,
) -> list[CacheRecord]:
    query = sa.select(caches).where(caches.c.org_id == org_id)
    if repo is not None:
        query = query.where(caches.c.repo == repo)
    if key_prefix:
        query = query.where(sa.func.substr(caches.c.key, 1, len(key_prefix)) == key_prefix)
    query = query.order_by(caches.c.repo, caches.c.namespace, caches.c.key)
    if limit is not None:
        query = query.limit(limit)
    return [CacheRecord.model_validate(dict(r._mapping)) for r in await conn.execute(query)]


async def delete_rows(conn: AsyncConnection, ids: Sequence[str]) -> int:
    if not ids:
        return 0
    result = await conn.execute(caches.delete().where(caches.c.id.in_(list(ids))))
    return int(result.rowcount or 0)
