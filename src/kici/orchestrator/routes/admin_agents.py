"""Agents (`/agents`): every agent that ever registered, with whether it is connected now and how many
jobs it is busy with. The rows are the database's view (`kici.orchestrator.store.agents`), so every
orchestrator process answers the same, whichever one holds the agent's connection."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from kici.orchestrator.auth import (
    ERROR_RESPONSES,
    AdminError,
    AdminRoute,
    ErrorResponse,
    Permission,
    Principal,
    require,
)
from kici.orchestrator.container import AppState, app_state
from kici.orchestrator.store import agents
from kici.orchestrator.store.agents import AgentRecord

router = APIRouter(route_class=AdminRoute, responses=ERROR_RESPONSES)

State = Annotated[AppState, Depends(app_state)]
Reader = Annotated[Principal, Depends(require(Permission.AGENTS_READ))]
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse, "description": "No such agent"}}


class AgentInfo(BaseModel):
    """An agent, without its token: which credential an agent uses is shown to token readers only."""

    id: str
    labels: list[str]
    hostname: str | None
    version: str | None
    max_concurrency: int = Field(description="Jobs the agent runs at once")
    connected: bool = Field(description="Whether an orchestrator holds a live, registered connection to it")
    draining: bool = Field(
        description="The agent said it is draining (finishing its jobs, taking no new ones; SIGUSR1 to the agent)"
    )
    last_seen_at: dt.datetime | None
    registered_at: dt.datetime = Field(description="The agent's latest registration")
    running_jobs: int = Field(description="Jobs assigned to it that are running, recovering or cancelling")

    @classmethod
    def of(cls, agent: AgentRecord, running_jobs: int) -> AgentInfo:
        values = agent.model_dump(include=set(cls.model_fields) - {"running_jobs"})
        return cls(**values, running_jobs=running_jobs)


@router.get("/agents", summary="List agents, by id")
async def list_agents(
    state: State,
    principal: Reader,
    connected: Annotated[bool, Query(description="Only agents connected now")] = False,
) -> list[AgentInfo]:
    async with state.database.read() as conn:
        found = await agents.list_agents(conn, connected_only=connected, org_id=principal.token.org_id)
        busy = await agents.running_job_counts(conn, [a.id for a in found])
    return [AgentInfo.of(a, busy.get(a.id, 0)) for a in found]


@router.get("/agents/{agent_id}", summary="Show an agent", responses=_NOT_FOUND)
async def show_agent(agent_id: str, state: State, principal: Reader) -> AgentInfo:
    async with state.database.read() as conn:
        agent = await agents.get_agent(conn, agent_id)
        if agent is None or agent.org_id != principal.token.org_id:
            raise AdminError(404, f"no agent with id {agent_id!r}")
        busy = await agents.running_job_counts(conn, [agent.id])
    return AgentInfo.of(agent, busy.get(agent.id, 0))
