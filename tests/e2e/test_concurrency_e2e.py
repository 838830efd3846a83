"""Workflow concurrency with real processes: a second push to a branch supersedes the run in progress
(`cancel_in_progress`), whose step is stopped on the real agent, and then runs itself; on SQLite and
PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from .conftest import WORKFLOW_HEADER, System, wait_for


def test_second_push_supersedes_the_run_in_progress(system: System, tmp_path: Path) -> None:
    hold = tmp_path / "hold"  # while it exists, the step waits (sleeps in short rounds)
    hold.write_text("")
    workflow = WORKFLOW_HEADER + f'''
from kici import Concurrency

work = job("work", steps=[step("maybe wait", "while [ -e {hold} ]; do sleep 0.2; done; echo finished")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[work],
              concurrency=Concurrency(group=lambda event: "ci-" + event.branch, cancel_in_progress=True))
'''
    system.start_orchestrator()
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="2")
    first_sha = system.commit({".kici/workflows/ci.py": workflow}, "first")
    first = system.wait_run(first_sha, "running")
    wait_for(lambda: system.jobs(first["id"])["work"]["status"] == "running", what="the first job to run")

    second_sha = system.commit({"README.md": "second\n"}, "second")
    system.wait_run(first_sha, "cancelled", "failed", "success", within=60)
    hold.unlink()  # the second run's step would wait too: let it finish
    second = system.wait_run(second_sha, "success", "failed", "cancelled", within=60)
    assert second["status"] == "success", system.diagnostics()

    old = system.admin("GET", f"/runs/{first['id']}").json()
    assert old["status"] == "cancelled"
    assert old["failure_reason"] == f"superseded by run {second['id']} (concurrency: ci-main)"
    assert old["cancelled_by"] == f"run {second['id']}"
    assert old["jobs"][0]["status"] == "cancelled"
    # one at a time: the second run's job started only after the first one's had ended
    new = system.admin("GET", f"/runs/{second['id']}").json()
    assert new["jobs"][0]["started_at"] >= old["jobs"][0]["finished_at"]
