"""`GET /cluster`: the orchestrator nodes sharing this database, the leader lease and agents per node."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from kici.orchestrator.auth import ERROR_RESPONSES, AdminRoute, Permission, Principal, require
from kici.orchestrator.container import AppState, app_state, services_of
from kici.orchestrator.store import cluster as cluster_store

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]


class ClusterNode(BaseModel):
    id: str
    address: str | None
    version: str | None
    started_at: dt.datetime
    lease_expires_at: dt.datetime
    alive: bool = Field(description="Its lease has not run out (a dead node's row is removed by a survivor)")
    leader: bool = Field(description="It holds the leader lease (sweeps, schedules, retention, reports)")
    agents: int = Field(description="Agents connected through it")


class LeaderLease(BaseModel):
    holder: str | None
    term: int = Field(description="Fencing term: raised by one at every change of leader")
    expires_at: dt.datetime
    acquired_at: dt.datetime | None
    valid: bool = Field(description="The lease has not run out")


class ClusterStatus(BaseModel):
    node: str = Field(description="The node that answered")
    now: dt.datetime = Field(description="The database's clock, which leases are measured on")
    leader: str | None = Field(description="The node holding an unexpired leader lease; null while there is none")
    term: int
    lease: LeaderLease
    nodes: list[ClusterNode]
    agents_without_node: int = Field(
        description="Connected agents whose node is gone, not yet taken over (they are within a heartbeat)"
    )
    bus_listening: bool = Field(description="This node's PostgreSQL LISTEN connection is up (false on SQLite)")


@router.get("/cluster", summary="Nodes, leader lease and term, agents per node")
async def cluster_status(
    state: State, request: Request, _: Annotated[Principal, Depends(require(Permission.AGENTS_READ))]
) -> ClusterStatus:
    async with state.database.read() as conn:
        now = await cluster_store.db_now(conn)
        nodes = await cluster_store.list_nodes(conn)
        lease = await cluster_store.get_lease(conn)
        counts = await cluster_store.agent_counts(conn)
    if lease is None:  # not created yet (the first node's next heartbeat does)
        lease = cluster_store.LeaseRecord(holder=None, term=0, expires_at=now, acquired_at=None)
    valid = lease.expires_at > now
    leader = lease.holder if valid else None
    known = {node.id for node in nodes}
    listed = [
        ClusterNode(
            id=node.id, address=node.address, version=node.version, started_at=node.started_at,
            lease_expires_at=node.lease_expires_at, alive=node.lease_expires_at > now, leader=node.id == leader,
            agents=counts.get(node.id, 0),
        )
        for node in nodes
    ]
    orphans = sum(n for node_id, n in counts.items() if node_id is None or node_id not in known)
    return ClusterStatus(
        node=state.node_id, now=now, leader=leader, term=lease.term,
        lease=LeaderLease(holder=lease.holder, term=lease.term, expires_at=lease.expires_at,
                          acquired_at=lease.acquired_at, valid=valid),
        nodes=listed, agents_without_node=orphans, bus_listening=services_of(request.app).bus.listening,
    )
