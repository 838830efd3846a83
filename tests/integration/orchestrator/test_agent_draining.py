"""An agent's `agent.status` saying it drains reaches the `agents` table, so every orchestrator process's
agents list (REST and dashboard) shows it; registering again clears it. Real WebSockets, SQLite and
PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from kici.orchestrator.db.database import Database
from kici.orchestrator.store import agents as agent_store

from .dispatch_harness import SimAgent, serve_orchestrator, until


async def test_draining_status_is_stored_shown_and_cleared_on_reconnect(database: Database, tmp_path: Path) -> None:
    async def draining() -> bool | None:
        listed = (await orch.admin("GET", "/agents")).json()
        return next((a["draining"] for a in listed if a["id"] == "d1"), None)

    async def shown_draining() -> bool:
        return await draining() is True

    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "d1", ["linux"])
        try:
            await agent.connect()
            await agent.send({"type": "agent.status", "active_jobs": 0, "draining": False})
            assert await draining() is False
            await agent.send({"type": "agent.status", "active_jobs": 1, "draining": True})
            await until(shown_draining, what="draining shown by the REST API")
            async with database.read() as conn:
                record = await agent_store.get_agent(conn, "d1")
            assert record is not None and record.draining is True and record.connected is True
            shown = (await orch.admin("GET", "/agents/d1")).json()
            assert shown["draining"] is True
            await agent.close()
            agent = SimAgent(orch, "d1", ["linux"])  # a restarted agent registers afresh: not draining
            await agent.connect()
            assert await draining() is False
        finally:
            await agent.close()

