"""Steps are first-class in the admin API: `GET runs/{id}` (and `kici-admin runs show ID [--json]`) has every
job with its steps (status, times, duration, error) and outputs, and shows a run or job waiting for its
concurrency group as `waiting (concurrency: <group>)`; real HTTP/WebSocket, a simulated agent, the CLI in a
real subprocess, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kici.orchestrator.db.database import Database

from .dispatch_harness import SimAgent, serve_orchestrator, workflow
from .test_kici_admin_live import finish, start_admin


async def step(agent: SimAgent, dispatch: dict[str, object], index: int, name: str, state: str,
               **extra: object) -> None:
    await agent.send({"type": "step.status", "run_id": dispatch["run_id"], "job_id": dispatch["job_id"],
                      "step_index": index, "step_name": name, "state": state, "timestamp": time.time(), **extra})


async def test_run_detail_has_steps_and_outputs(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        wf = workflow([{"name": "build", "steps": [{"name": "lint"}, {"name": "test"}]}],
                      concurrency={"group": "main-line"})
        created = await orch.create_run(wf)
        waiting = await orch.create_run(wf)
        [dispatch] = await agent.wait_for("job.dispatch")
        await agent.status(dispatch, "running")
        await step(agent, dispatch, 0, "lint", "running")
        await step(agent, dispatch, 0, "lint", "success", duration_ms=812)
        await step(agent, dispatch, 1, "test", "running")
        await step(agent, dispatch, 1, "test", "failed", duration_ms=1500, error="exit code 3")
        await agent.status(dispatch, "failed", error="step test failed", outputs={"lint": {"issues": 0}})
        await orch.wait_run(created.run_id, "failed")

        detail = (await orch.admin("GET", f"/runs/{created.run_id}")).json()
        [job] = detail["jobs"]
        assert job["name"] == "build" and job["status"] == "failed" and job["outputs"] == {"lint": {"issues": 0}}
        steps = job["steps"]
        assert [(s["index"], s["name"], s["status"], s["duration_ms"], s["error"]) for s in steps] == [
            (0, "lint", "success", 812, None), (1, "test", "failed", 1500, "exit code 3")]
        assert all(s["started_at"] and s["finished_at"] for s in steps)
        assert (await orch.admin("GET", f"/runs/{created.run_id}/jobs")).json()[0]["steps"] == steps

        code, out, err = await finish(await start_admin(orch, "runs", "show", created.run_id, "--json"))
        assert code == 0, err
        assert json.loads(out)["jobs"][0]["steps"] == steps
        code, out, err = await finish(await start_admin(orch, "runs", "show", created.run_id))
        assert code == 0, err
        assert "build  failed  on a1  step test failed" in out
        assert "    1. lint  success  0.8s" in out and "    2. test  failed  1.5s  exit code 3" in out
        assert 'outputs: {"lint": {"issues": 0}}' in out

        # the second run was admitted when the first ended; a third waits now and says why
        third = await orch.create_run(wf)
        code, out, err = await finish(await start_admin(orch, "runs", "show", third.run_id))
        assert code == 0, err
        assert "Status:" in out and "waiting (concurrency: main-line)" in out
        code, out, err = await finish(await start_admin(orch, "runs", "list"))
        assert code == 0, err
        [row] = [line for line in out.splitlines() if line.startswith(third.run_id)]
        assert "waiting (concurrency: main-line)" in row
        assert waiting.waiting == "concurrency: main-line"
