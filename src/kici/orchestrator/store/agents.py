"""The `agents` table: one row per agent id, upserted on every registration.

`connected` mirrors whether some orchestrator process holds a live, registered WebSocket for the agent;
the live connection itself is in `kici.orchestrator.agents.AgentRegistry`. All statements are portable
Core (no dialect-specific upsert): callers serialise registrations of one agent id, so a read-then-write
inside one transaction is enough.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.states import JobState
from kici.orchestrator.db.schema import agents, jobs, utcnow

BUSY_JOB_STATES = (JobState.RUNNING.value, JobState.RECOVERING.value, JobState.CANCELLING.value)
"""Job states in which a job occupies its agent: started and not yet reported finished."""


class AgentRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    org_id: str
    agent_token_id: str | None
    labels: list[str]
    max_concurrency: int
    version: str | None
    hostname: str | None
    connected: bool
    draining: bool = False
    """The agent's last `agent.status` said it is draining (cleared when it registers again)."""
    last_seen_at: dt.datetime | None
    registered_at: dt.datetime
    node_id: str | None = None
    """The orchestrator node holding the connection (`nodes.id`); None for rows from before clustering."""


def _record(row: Any) -> AgentRecord:
    return AgentRecord.model_validate(dict(row._mapping))


async def get_agent(conn: AsyncConnection, agent_id: str) -> AgentRecord | None:
    row = (await conn.execute(sa.select(agents).where(agents.c.id == agent_id))).first()
    return _record(row) if row is not None else None


async def list_agents(
    conn: AsyncConnection, *, connected_only: bool = False, org_id: str | None = None
) -> list[AgentRecord]:
    """Agents ordered by id; only `org_id`'s when given."""
    query = sa.select(agents)
    if org_id is not None:
        query = query.where(agents.c.org_id == org_id)
    if connected_only:
        query = query.where(agents.c.connected.is_(True))
    rows = await conn.execute(query.order_by(agents.c.id))
    return [_record(row) for row in rows]


async def running_job_counts(conn: AsyncConnection, agent_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Per agent id, how many jobs assigned to it are running, recovering or cancelling (`BUSY_JOB_STATES`);
    agents with none are absent. Only `agent_ids` when given (an empty sequence gives an empty dict)."""
    if agent_ids is not None and not agent_ids:
        return {}
    query = (
        sa.select(jobs.c.agent_id, sa.func.count().label("n"))
        .where(jobs.c.agent_id.is_not(None), jobs.c.status.in_(BUSY_JOB_STATES))
        .group_by(jobs.c.agent_id)
    )
    if agent_ids is not None:
        query = query.where(jobs.c.agent_id.in_(list(agent_ids)))
    return {str(row.agent_id): int(row.n) for row in await conn.execute(query)}


async def busy_jobs(conn: AsyncConnection, agent_ids: Sequence[str]) -> dict[str, list[tuple[str, str, str]]]:
    """Per agent id, its busy jobs (`BUSY_JOB_STATES`) as (run id, job id, job name), for the dashboard."""
    if not agent_ids:
        return {}
    query = (
        sa.select(jobs.c.agent_id, jobs.c.run_id, jobs.c.id, jobs.c.name)
        .where(jobs.c.agent_id.in_(list(agent_ids)), jobs.c.status.in_(BUSY_JOB_STATES))
        .order_by(jobs.c.agent_id, jobs.c.started_at)
    )
    found: dict[str, list[tuple[str, str, str]]] = {}
    for row in await conn.execute(query):
        found.setdefault(str(row.agent_id), []).append((str(row.run_id), str(row.id), str(row.name)))
    return found


@dataclass(frozen=True)
class Registration:
    """One agent connection's `agent.register`, as its row records it."""

    agent_id: str
    org_id: str
    agent_token_id: str
    labels: Sequence[str]
    max_concurrency: int
    version: str | None
    hostname: str | None
    now: dt.datetime
    node_id: str | None = None
    """The orchestrator node holding the connection (None: no cluster identity, e.g. tests)."""


def _registered_values(registration: Registration) -> dict[str, Any]:
    return {
        "org_id": registration.org_id,
        "agent_token_id": registration.agent_token_id,
        "labels": list(registration.labels),
        "max_concurrency": registration.max_concurrency,
        "version": registration.version,
        "hostname": registration.hostname,
        "connected": True,
        "draining": False,  # a new connection starts taking jobs; its first agent.status says otherwise
        "last_seen_at": registration.now,
        "registered_at": registration.now,
        "node_id": registration.node_id,
    }


# only the row bound to the registering token is updated: a row of another token makes the insert fail
# instead (callers refuse that case before; this keeps two orchestrators racing from rebinding an id)
_UPDATE_REGISTERED = agents.update().where(
    agents.c.id == sa.bindparam("b_id"), agents.c.agent_token_id == sa.bindparam("b_token")
)


async def register_agents(conn: AsyncConnection, registrations: Sequence[Registration]) -> set[str]:
    """Mark every agent's row connected (inserted when new), in at most three statements however many
    there are (a reconnect storm registers hundreds at once); `registered_at` is the latest registration.
    The agent ids refused because another token registered them first: their rows are left alone. The
    ids must be distinct (callers serialise registrations of one agent id)."""
    if not registrations:
        return set()
    rows = await conn.execute(
        sa.select(agents.c.id, agents.c.agent_token_id).where(agents.c.id.in_([r.agent_id for r in registrations]))
    )
    bound = {str(row.id): row.agent_token_id for row in rows}
    refused = {r.agent_id for r in registrations if r.agent_id in bound and bound[r.agent_id] != r.agent_token_id}
    updates = [r for r in registrations if r.agent_id in bound and r.agent_id not in refused]
    inserts = [r for r in registrations if r.agent_id not in bound]
    if updates:
        await conn.execute(
            _UPDATE_REGISTERED,
            [{"b_id": r.agent_id, "b_token": r.agent_token_id, **_registered_values(r)} for r in updates],
        )
    if inserts:
        await conn.execute(agents.insert(), [{"id": r.agent_id, **_registered_values(r)} for r in inserts])
    return refused


async def register_agent(
    conn: AsyncConnection,
    *,
    agent_id: str,
    org_id: str,
    agent_token_id: str,
    labels: Sequence[str],
    max_concurrency: int,
    version: str | None,
    hostname: str | None,
    now: dt.datetime | None = None,
    node_id: str | None = None,
) -> AgentRecord:
    """`register_agents` for one agent; its row. An id bound to another token is never rebound (the insert
    then fails on the primary key)."""
    registration = Registration(agent_id, org_id, agent_token_id, labels, max_concurrency, version, hostname,
                                now or utcnow(), node_id)
    if await register_agents(conn, [registration]):
        await conn.execute(agents.insert().values(id=agent_id, **_registered_values(registration)))
    record = await get_agent(conn, agent_id)
    assert record is not None
    return record


_TOUCH = agents.update().where(agents.c.id == sa.bindparam("b_id"))


async def touch_agents(conn: AsyncConnection, seen: Mapping[str, dt.datetime]) -> None:
    """Record when each agent was last seen (agent id → time), in one statement for all of them."""
    if seen:
        await conn.execute(_TOUCH, [{"b_id": agent_id, "last_seen_at": at} for agent_id, at in seen.items()])


async def set_agent_draining(conn: AsyncConnection, agent_id: str, draining: bool) -> bool:
    """Record what the agent's `agent.status` said about draining; False when there is no such row."""
    result = await conn.execute(agents.update().where(agents.c.id == agent_id).values(draining=draining))
    return result.rowcount == 1


async def mark_agent_disconnected(
    conn: AsyncConnection, agent_id: str, *, last_seen_at: dt.datetime | None = None, node_id: str | None = None
) -> bool:
    """The agent's connection ended. `last_seen_at` (when given) is the last frame received, which may be
    newer than the throttled heartbeat writes. With `node_id`, only while the row still names that node as
    the holder: a connection that ends after the agent reconnected to another node changes nothing (False)."""
    values: dict[str, Any] = {"connected": False}
    if last_seen_at is not None:
        values["last_seen_at"] = last_seen_at
    query = agents.update().where(agents.c.id == agent_id)
    if node_id is not None:
        query = query.where(agents.c.node_id == node_id)
    result = await conn.execute(query.values(**values))
    return result.rowcount == 1


async def mark_orphan_disconnected(conn: AsyncConnection, agent_id: str, node_id: str | None) -> bool:
    """A connected agent held by a node that is gone (`node_id`, None for rows from before clustering) is
    marked disconnected, unless it registered again (through another node) meanwhile: False then."""
    holder = agents.c.node_id.is_(None) if node_id is None else agents.c.node_id == node_id
    result = await conn.execute(
        agents.update().where(agents.c.id == agent_id, agents.c.connected.is_(True), holder).values(connected=False)
    )
    return result.rowcount == 1


_MARK_DISCONNECTED = agents.update().where(agents.c.id == sa.bindparam("b_id")).values(connected=False)


async def mark_agents_disconnected(conn: AsyncConnection, last_seen: Mapping[str, dt.datetime]) -> None:
    """`mark_agent_disconnected` for many agents (agent id → its last frame's time) in one statement."""
    if last_seen:
        await conn.execute(
            _MARK_DISCONNECTED, [{"b_id": agent_id, "last_seen_at": at} for agent_id, at in last_seen.items()]
        )


async def agents_of_token(conn: AsyncConnection, agent_token_id: str) -> list[str]:
    """Ids of the agents bound to this agent token."""
    rows = await conn.execute(sa.select(agents.c.id).where(agents.c.agent_token_id == agent_token_id))
    return sorted(str(row.id) for row in rows)


async def mark_token_agents_disconnected(conn: AsyncConnection, agent_token_id: str) -> int:
    """The token was revoked: none of its agents counts as connected any more."""
    result = await conn.execute(
        agents.update().where(agents.c.agent_token_id == agent_token_id, agents.c.connected.is_(True))
        .values(connected=False)
    )
    return int(result.rowcount or 0)
