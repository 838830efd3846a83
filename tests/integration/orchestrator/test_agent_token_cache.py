"""Agent tokens are verified through a per-process cache (`kici.orchestrator.agents.token_cache`): a burst
of connections reads the token row once and writes `last_used_at` once, yet a revocation still refuses
new connections — at once when this process revoked, within `token_cache_s` when another did — and an
expiry is checked on every use."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from websockets.asyncio.client import connect

from kici.engine.protocol import PROTOCOL_VERSION
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import agent_tokens, utcnow
from kici.orchestrator.store import agents as agent_store
from kici.orchestrator.store.tokens import create_agent_token, revoke_agent_token

from .dispatch_harness import FAST_TIMEOUTS, Orchestrator, SimAgent, serve_orchestrator, until

LONG_CACHE = dataclasses.replace(FAST_TIMEOUTS, token_cache_s=3600)
"""Only a revocation, an expiry or the end of the test can retire a cached token."""


@contextlib.contextmanager
def statements(database: Database) -> Iterator[list[str]]:
    """The SQL statements the orchestrator's engine executes inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)


async def auth_reply(orch: Orchestrator, token: str) -> dict[str, Any]:
    """The orchestrator's answer to `auth.request` with `token` on a new connection."""
    async with connect(orch.ws_url, open_timeout=5, close_timeout=2) as ws:
        await ws.send(json.dumps({"type": "auth.request", "token": token, "protocolVersion": PROTOCOL_VERSION}))
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return reply


async def token_id_of(database: Database, agent_id: str) -> str:
    async with database.read() as conn:
        record = await agent_store.get_agent(conn, agent_id)
    assert record is not None and record.agent_token_id is not None
    return record.agent_token_id


async def test_a_burst_of_connections_reads_the_token_once_and_touches_it_once(
    database: Database, tmp_path: Path
) -> None:
    async with serve_orchestrator(database, tmp_path, timeouts=LONG_CACHE) as orch:
        await orch.agent_token(["linux"])
        agents = [SimAgent(orch, f"builder-{i}", ["linux"]) for i in range(8)]
        try:
            with statements(database) as seen:
                await asyncio.gather(*(agent.connect() for agent in agents))
            reads = [s for s in seen if s.lstrip().startswith("SELECT") and "FROM agent_tokens" in s]
            touches = [s for s in seen if s.lstrip().startswith("UPDATE agent_tokens")]
            assert (len(reads), len(touches)) == (1, 1), seen
            async with database.read() as conn:
                used = (await conn.execute(sa.select(agent_tokens.c.last_used_at))).scalar_one()
            assert used is not None
        finally:
            for agent in agents:
                await agent.close()


async def test_a_token_revoked_by_this_process_is_refused_at_once(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, timeouts=LONG_CACHE) as orch:
        agent = SimAgent(orch, "builder-1", ["linux"])
        await agent.connect()
        response = await orch.admin("DELETE", f"/agent-tokens/{await token_id_of(database, 'builder-1')}")
        assert response.status_code == 200, response.text
        assert await agent.wait_closed(within=5) == 4010
        # the verification cached by the first connection is not reused
        reply = await auth_reply(orch, orch.agent_tokens["linux"])
        assert reply == {"type": "auth.failure", "reason": "invalid or revoked agent token"}


async def test_a_revocation_made_elsewhere_reaches_new_connections_within_the_cache_time(
    database: Database, tmp_path: Path
) -> None:
    async with serve_orchestrator(database, tmp_path, timeouts=LONG_CACHE) as orch:
        agent = SimAgent(orch, "builder-1", ["linux"])
        await agent.connect()
        await agent.close()
        async with database.transaction() as conn:  # as another orchestrator process would
            assert await revoke_agent_token(conn, await token_id_of(database, "builder-1"))
        # the cached row is still within its time: this process has not seen the revocation yet
        assert (await auth_reply(orch, orch.agent_tokens["linux"]))["type"] == "auth.success"

        orch.app.state.agent_timeouts = dataclasses.replace(FAST_TIMEOUTS, token_cache_s=0.2)

        async def refused() -> bool:
            return (await auth_reply(orch, orch.agent_tokens["linux"]))["type"] == "auth.failure"

        await until(refused, within=5, what="the revoked token to be refused")


async def test_an_expiry_is_checked_on_every_use_of_a_cached_token(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path, timeouts=LONG_CACHE) as orch:
        async with database.transaction() as conn:
            created = await create_agent_token(conn, name="short", labels=[],
                                               expires_at=utcnow() + dt.timedelta(seconds=1))
        assert (await auth_reply(orch, created.plaintext))["type"] == "auth.success"

        async def refused() -> bool:
            return (await auth_reply(orch, created.plaintext))["type"] == "auth.failure"

        with statements(database) as seen:
            await until(refused, within=5, what="the expired token to be refused")
        # refused by the cached row's `expires_at`, without reading it again
        assert not [s for s in seen if "FROM agent_tokens" in s], seen
