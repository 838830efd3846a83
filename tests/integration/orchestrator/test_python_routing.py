"""`job(python=…)` routing at the orchestrator, on SQLite and PostgreSQL: the job's `runs_on` gains
`kici:python:<version>`, only an agent advertising that label takes it, and the dispatch names the version.
The `kici:python:*` labels are facts an agent reports about itself: they need not be in its token's label
scope (like `kici:os:*`), while other `kici:` labels stay refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kici.orchestrator.db.database import Database

from .dispatch_harness import SimAgent, exact, serve_orchestrator, workflow


async def test_python_job_goes_only_to_an_agent_with_that_interpreter(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        # token scope: only "linux"; the kici:python labels are self-reported facts
        old = SimAgent(orch, "py311", ["linux", "kici:python:3.11", "kici:python:3.11.2"], token_labels=["linux"])
        new = SimAgent(orch, "py312", ["linux", "kici:python:3.12", "kici:python:3.12.1"], token_labels=["linux"])
        try:
            ack = await old.connect()
            assert ack["labels"] == ["linux", "kici:python:3.11", "kici:python:3.11.2"]
            created = await orch.create_run(workflow([
                {"name": "test", "runsOn": exact("linux"), "python": "3.12", "pythonVenv": True},
            ]))
            job = (await orch.jobs(created.run_id))["test"]
            assert [{k: v for k, v in m.items() if v is not None} for m in job.runs_on] == [
                {"kind": "exact", "value": "linux"}, {"kind": "exact", "value": "kici:python:3.12"},
            ]
            await asyncio.sleep(0.5)  # several drain passes and polls: the 3.11 agent must not get it
            assert old.received("job.dispatch") == []
            assert (await orch.jobs(created.run_id))["test"].status == "queued"
            new.auto = "success"
            await new.connect()
            await orch.wait_run(created.run_id, "success")
            [dispatch] = new.received("job.dispatch")
            assert dispatch["python"] == "3.12" and dispatch["python_venv"] is True
            assert old.received("job.dispatch") == []
        finally:
            await old.close()
            await new.close()


async def test_a_patch_version_routes_to_that_patch_only(database: Database, tmp_path: Path) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "py312", ["kici:python:3.12", "kici:python:3.12.1"], token_labels=[])
        agent.auto = "success"
        try:
            await agent.connect()
            wrong = await orch.create_run(workflow([{"name": "t", "python": "3.12.7"}], name="wrong"))
            right = await orch.create_run(workflow([{"name": "t", "python": "3.12.1"}], name="right"))
            await orch.wait_run(right.run_id, "success")
            assert (await orch.jobs(wrong.run_id))["t"].status == "queued"
            [dispatch] = agent.received("job.dispatch")
            assert dispatch["python"] == "3.12.1" and dispatch["python_venv"] is False
        finally:
            await agent.close()


@pytest.mark.parametrize("label", ["kici:pythonx:3.12", "kici:python:", "kici:python:3 12"])
async def test_other_reserved_labels_are_still_refused(database: Database, tmp_path: Path, label: str) -> None:
    async with serve_orchestrator(database, tmp_path) as orch:
        agent = SimAgent(orch, "bad", [label], token_labels=[])
        with pytest.raises(AssertionError, match=r"auth\.failure"):
            await agent.connect()
        await agent.close()
