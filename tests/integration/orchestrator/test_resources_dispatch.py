"""A job's `resources` (lock file) reach the agent in `job.dispatch`, on SQLite and PostgreSQL; a job
without them is dispatched with none."""

from __future__ import annotations

from pathlib import Path

from kici.orchestrator.db.database import Database

from .dispatch_harness import SimAgent, serve_orchestrator, workflow


async def test_the_dispatch_carries_the_jobs_resources(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "limits", [], token_labels=[])
        agent.auto = "success"
        try:
            await agent.connect()
            created = await orch.create_run(workflow([
                {"name": "limited", "resources": {"cpus": 1.5, "memory": 512 << 20, "pids": 256}},
                {"name": "free"},
            ]))
            await orch.wait_run(created.run_id, "success")
            dispatches = {d["job"]: d for d in agent.received("job.dispatch")}
            assert dispatches["limited"]["resources"] == {"cpus": 1.5, "memory": 512 << 20, "pids": 256}
            assert dispatches["free"].get("resources") is None
        finally:
            await agent.close()
