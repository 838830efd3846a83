"""`kici-admin runs logs --follow`, `runs watch` and `runs rerun` against a live orchestrator whose job is
being run by a simulated agent (the CLI in a real subprocess, the API over real HTTP)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from kici.orchestrator.db.database import Database
from tests.conftest import kici_env

from .dispatch_harness import Orchestrator, SimAgent, serve_orchestrator, until, workflow


async def start_admin(orch: Orchestrator, *args: str) -> asyncio.subprocess.Process:
    env = kici_env({"KICI_ADMIN_URL": orch.base_url, "KICI_ADMIN_TOKEN": orch.admin_token})
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kici.admin", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_follow_and_watch_a_live_run(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}, {"name": "test", "needs": [{"name": "build"}]}]))
        follow = await start_admin(orch, "runs", "logs", created.run_id, "--follow")
        watch = await start_admin(orch, "runs", "watch", created.run_id)
        try:
            for index, name in enumerate(["build", "test"]):
                dispatches = await agent.wait_for("job.dispatch", index + 1)
                dispatch = dispatches[index]
                assert dispatch["job"] == name
                ids = {"run_id": created.run_id, "job_id": dispatch["job_id"]}
                await agent.status(dispatch, "running")
                for seq in range(3):
                    await agent.send({"type": "log.chunk", **ids, "step_index": 0, "lines": [f"{name} line {seq}"],
                                      "timestamp": 1.0, "seq": seq})
                    await asyncio.sleep(0.3)  # the CLI polls in between: it sees the log grow
                await agent.status(dispatch, "success")
            await orch.wait_run(created.run_id, "success")
            code, out, err = await finish(follow)
            assert code == 0, err
            lines = [line for line in out.splitlines() if "line" in line]
            assert lines == [f"{job:<5} | {job} line {i}" for job in ("build", "test") for i in range(3)], out
            code, out, err = await finish(watch)
            assert code == 0, err
            assert "build line 2" in out and "test line 0" in out and "success" in out.splitlines()[-1]
        finally:
            for proc in (follow, watch):
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def test_watch_exits_1_for_a_failed_run_and_rerun_starts_another(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch, SimAgent(orch, "a1", []) as agent:
        agent.auto = "failed"
        await agent.connect()
        created = await orch.create_run(workflow([{"name": "build"}]))
        await orch.wait_run(created.run_id, "failed")
        code, out, _ = await finish(await start_admin(orch, "runs", "watch", created.run_id))
        assert code == 1 and "failed" in out.splitlines()[-1]
        agent.auto = "success"
        code, out, err = await finish(await start_admin(orch, "runs", "rerun", created.run_id, "--json"))
        assert code == 0, err
        rerun = json.loads(out)["run"]
        assert rerun["original_run_id"] == created.run_id
        await orch.wait_run(rerun["id"], "success")

        async def two_dispatches() -> bool:
            return len(agent.received("job.dispatch")) == 2

        await until(two_dispatches, what="the rerun's dispatch")
