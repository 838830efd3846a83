"""The cluster's tables: `nodes` (one row per live orchestrator process, its lease renewed as a heartbeat),
`leader_lease` (one row: who holds the leader duties, under which fencing term) and `cluster_events` (the
cross-node bus's durable messages).

Every time here is the database's clock (`db_now`): on PostgreSQL `clock_timestamp()`, the one clock all
nodes share, so a node whose own clock is off cannot take a lease early or keep one late. SQLite has one
node and uses the process clock.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import agents, cluster_events, leader_lease, nodes, utcnow

LEADER = "leader"


class NodeRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    incarnation: str
    address: str | None
    version: str | None
    started_at: dt.datetime
    lease_expires_at: dt.datetime


class LeaseRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    holder: str | None
    term: int
    expires_at: dt.datetime
    acquired_at: dt.datetime | None


class ClusterEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    topic: str
    payload: dict[str, Any]
    origin: str
    created_at: dt.datetime


def _is_postgresql(conn: AsyncConnection) -> bool:
    return conn.dialect.name == "postgresql"


async def db_now(conn: AsyncConnection) -> dt.datetime:
    """The database's current time (not the transaction's start): the clock leases are measured on."""
    if not _is_postgresql(conn):
        return utcnow()
    value = (await conn.execute(sa.text("SELECT clock_timestamp()"))).scalar_one()
    assert isinstance(value, dt.datetime)
    return value.astimezone(dt.UTC)


# -- nodes -----------------------------------------------------------------------------------------------


async def get_node(conn: AsyncConnection, node_id: str, *, for_update: bool = False) -> NodeRecord | None:
    query = sa.select(nodes).where(nodes.c.id == node_id)
    if for_update:
        query = query.with_for_update()
    row = (await conn.execute(query)).first()
    return NodeRecord.model_validate(dict(row._mapping)) if row is not None else None


async def list_nodes(conn: AsyncConnection) -> list[NodeRecord]:
    rows = await conn.execute(sa.select(nodes).order_by(nodes.c.id))
    return [NodeRecord.model_validate(dict(row._mapping)) for row in rows]


async def put_node(
    conn: AsyncConnection, *, node_id: str, incarnation: str, address: str | None, version: str | None,
    now: dt.datetime, lease: dt.timedelta,
) -> None:
    """Insert this node's row, or take over the row of the name (its earlier incarnation)."""
    values = {"incarnation": incarnation, "address": address, "version": version, "started_at": now,
              "lease_expires_at": now + lease}
    result = await conn.execute(nodes.update().where(nodes.c.id == node_id).values(**values))
    if result.rowcount == 0:
        await conn.execute(nodes.insert().values(id=node_id, **values))


async def renew_node(
    conn: AsyncConnection, node_id: str, incarnation: str, *, now: dt.datetime, lease: dt.timedelta
) -> bool:
    """Extend this incarnation's lease; False when its row is gone (a survivor declared it dead) or belongs
    to another incarnation."""
    result = await conn.execute(
        nodes.update().where(nodes.c.id == node_id, nodes.c.incarnation == incarnation)
        .values(lease_expires_at=now + lease)
    )
    return result.rowcount == 1


async def delete_node(conn: AsyncConnection, node_id: str, incarnation: str) -> bool:
    """A clean shutdown: this incarnation's row goes (its connections were closed and released already)."""
    result = await conn.execute(nodes.delete().where(nodes.c.id == node_id, nodes.c.incarnation == incarnation))
    return result.rowcount == 1


async def expired_nodes(conn: AsyncConnection, *, now: dt.datetime) -> list[NodeRecord]:
    rows = await conn.execute(sa.select(nodes).where(nodes.c.lease_expires_at <= now).order_by(nodes.c.id))
    return [NodeRecord.model_validate(dict(row._mapping)) for row in rows]


async def remove_dead_node(conn: AsyncConnection, node: NodeRecord, *, now: dt.datetime) -> bool:
    """Delete a node whose lease ran out, if it still has not renewed it: exactly one survivor wins."""
    result = await conn.execute(
        nodes.delete().where(nodes.c.id == node.id, nodes.c.incarnation == node.incarnation,
                             nodes.c.lease_expires_at <= now)
    )
    return result.rowcount == 1


async def orphaned_agents(conn: AsyncConnection, *, unowned: bool = False) -> list[tuple[str, str | None]]:
    """Agents shown as connected through a node that has no row any more (it was declared dead, or shut
    down without releasing them): (agent id, node id). Dead nodes' rows are deleted first
    (`remove_dead_node`), which makes their agents orphans. With `unowned` (a node joining), also those
    connected through no node at all: rows written before nodes existed."""
    gone = sa.and_(agents.c.node_id.is_not(None), agents.c.node_id.not_in(sa.select(nodes.c.id)))
    holder = sa.or_(gone, agents.c.node_id.is_(None)) if unowned else gone
    rows = await conn.execute(
        sa.select(agents.c.id, agents.c.node_id).where(agents.c.connected.is_(True), holder).order_by(agents.c.id)
    )
    return [(str(row.id), row.node_id) for row in rows]


async def agents_of_node(conn: AsyncConnection, node_id: str) -> list[str]:
    """Agents shown as connected through `node_id`."""
    rows = await conn.execute(
        sa.select(agents.c.id).where(agents.c.connected.is_(True), agents.c.node_id == node_id).order_by(agents.c.id)
    )
    return [str(row.id) for row in rows]


async def agent_counts(conn: AsyncConnection) -> dict[str | None, int]:
    """Connected agents per holding node id."""
    rows = await conn.execute(
        sa.select(agents.c.node_id, sa.func.count().label("n")).where(agents.c.connected.is_(True))
        .group_by(agents.c.node_id)
    )
    return {row.node_id: int(row.n) for row in rows}


# -- the leader lease ------------------------------------------------------------------------------------


async def get_lease(conn: AsyncConnection) -> LeaseRecord | None:
    row = (await conn.execute(sa.select(leader_lease).where(leader_lease.c.name == LEADER))).first()
    return LeaseRecord.model_validate(dict(row._mapping)) if row is not None else None


async def ensure_lease(conn: AsyncConnection) -> None:
    """Create the leader lease row if it is missing (the migration seeds it; a restore of a partial dump
    might not have it), expired and at term 0. Safe against a concurrent creator."""
    if await get_lease(conn) is not None:
        return
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    try:
        async with conn.begin_nested():
            await conn.execute(leader_lease.insert().values(name=LEADER, holder=None, term=0, expires_at=epoch))
    except sa.exc.IntegrityError:
        pass  # another node created it first


async def acquire_lease(
    conn: AsyncConnection, holder: str, *, now: dt.datetime, lease: dt.timedelta
) -> int | None:
    """Become leader when the lease ran out (or this node name holds it: an earlier incarnation of this
    node, which is dead since the name is unique among live nodes). The new term, or None."""
    result = await conn.execute(
        leader_lease.update()
        .where(leader_lease.c.name == LEADER,
               sa.or_(leader_lease.c.expires_at <= now, leader_lease.c.holder == holder))
        .values(holder=holder, term=leader_lease.c.term + 1, expires_at=now + lease, acquired_at=now)
        .returning(leader_lease.c.term)
    )
    term = result.scalar_one_or_none()
    return int(term) if term is not None else None


async def renew_lease(
    conn: AsyncConnection, holder: str, term: int, *, now: dt.datetime, lease: dt.timedelta
) -> bool:
    """Extend the lease under `term`; False when it ran out or another node took it (a fenced write)."""
    result = await conn.execute(
        leader_lease.update()
        .where(leader_lease.c.name == LEADER, leader_lease.c.holder == holder, leader_lease.c.term == term,
               leader_lease.c.expires_at > now)
        .values(expires_at=now + lease)
    )
    return result.rowcount == 1


async def release_lease(conn: AsyncConnection, holder: str, term: int, *, now: dt.datetime) -> bool:
    """A clean shutdown: let another node take over at once instead of after the lease."""
    result = await conn.execute(
        leader_lease.update()
        .where(leader_lease.c.name == LEADER, leader_lease.c.holder == holder, leader_lease.c.term == term)
        .values(expires_at=now)
    )
    return result.rowcount == 1


async def hold_lease(conn: AsyncConnection, holder: str, term: int, *, now: dt.datetime) -> bool:
    """Whether `holder` still leads under `term`, checked in the caller's transaction. On PostgreSQL the
    lease row is locked `FOR SHARE` until that transaction ends: another node's takeover (an UPDATE of the
    row) waits for it, so nothing the transaction writes can land after a new term began."""
    query = (
        sa.select(leader_lease.c.term)
        .where(leader_lease.c.name == LEADER, leader_lease.c.holder == holder, leader_lease.c.term == term,
               leader_lease.c.expires_at > now)
        .with_for_update(read=True)
    )
    return (await conn.execute(query)).first() is not None


async def limit_idle_transaction(conn: AsyncConnection, timeout_ms: int) -> None:
    """PostgreSQL ends this transaction's session when it sits idle longer than `timeout_ms`: a leader
    stopped (SIGSTOP) inside a fenced transaction cannot keep the lease row locked past its lease."""
    if _is_postgresql(conn):
        await conn.execute(sa.text(f"SET LOCAL idle_in_transaction_session_timeout = {int(timeout_ms)}"))


async def limit_lock_wait(conn: AsyncConnection, timeout_ms: int) -> None:
    """Give up waiting for a row lock after `timeout_ms` (PostgreSQL; SQLite has its busy timeout)."""
    if _is_postgresql(conn):
        await conn.execute(sa.text(f"SET LOCAL lock_timeout = {int(timeout_ms)}"))


# -- bus events ------------------------------------------------------------------------------------------


async def insert_event(
    conn: AsyncConnection, *, topic: str, payload: dict[str, Any], origin: str, now: dt.datetime | None = None
) -> int:
    result = await conn.execute(
        cluster_events.insert()
        .values(topic=topic, payload=payload, origin=origin, created_at=now or utcnow())
        .returning(cluster_events.c.id)
    )
    return int(result.scalar_one())


async def last_event_id(conn: AsyncConnection) -> int:
    value = (await conn.execute(sa.select(sa.func.max(cluster_events.c.id)))).scalar_one_or_none()
    return int(value or 0)


async def events_after(
    conn: AsyncConnection, after_id: int, *, missing: list[int] | None = None, limit: int = 500
) -> list[ClusterEvent]:
    """Events with an id above `after_id`, plus the `missing` ids below it (ids a slower transaction had
    taken but not committed at the last read), oldest first."""
    condition = cluster_events.c.id > after_id
    if missing:
        condition = sa.or_(condition, cluster_events.c.id.in_(missing))
    rows = await conn.execute(sa.select(cluster_events).where(condition).order_by(cluster_events.c.id).limit(limit))
    return [ClusterEvent.model_validate(dict(row._mapping)) for row in rows]


async def prune_events(conn: AsyncConnection, *, before: dt.datetime) -> int:
    result = await conn.execute(cluster_events.delete().where(cluster_events.c.created_at < before))
    return int(result.rowcount or 0)
