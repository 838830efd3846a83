"""Deployment environments with real processes, on SQLite and PostgreSQL: a workflow declaring
`environment=` (compiled by `kici compile`), environments made with `kici-admin environment create`, a
real agent whose step sees the environment's variables after its wait timer, and a branch the
environment refuses failing the job before any step."""

from __future__ import annotations

import time
from pathlib import Path

from .conftest import WORKFLOW_HEADER, System

WORKFLOW = WORKFLOW_HEADER + '''
deploy = job("deploy", environment="production",
             steps=[step("show", 'echo "target=$DEPLOY_TARGET level=$LOG_LEVEL"')])

ci = workflow("ci", on=[push()], jobs=[deploy])
'''


def test_variables_reach_the_step_after_the_wait_timer(system: System, tmp_path: Path) -> None:
    system.start_orchestrator()
    system.register_source()
    created = system.kici_admin("environment", "create", "production", "--branch", "main", "--wait-timer", "2s",
                                "--var", "DEPLOY_TARGET=prod-eu", "--var", "LOG_LEVEL=warn")
    assert created.returncode == 0, created.stderr
    system.start_agent("a1")

    started = time.monotonic()
    sha = system.commit({".kici/workflows/ci.py": WORKFLOW}, "deploy")
    run = system.wait_run(sha, "pending", "running", "success", "failed")
    waiting = system.jobs(run["id"])["deploy"]
    if waiting["status"] == "waiting":  # unless the machine was slower than the timer
        assert waiting["wait_reason"].startswith("environment: production, wait timer until "), waiting
    run = system.wait_run(sha, "success", "failed", within=60)
    assert run["status"] == "success", system.diagnostics()
    assert time.monotonic() - started >= 2
    assert "target=prod-eu level=warn" in system.log_lines(run["id"], "deploy")

    # a branch the environment does not allow: the job fails before any step, with the reason
    system.kici_admin("environment", "set-policy", "production", "--branch", "release/*")
    sha = system.commit({"README.md": "again\n"}, "not from a release branch")
    run = system.wait_run(sha, "failed", "success", within=60)
    job = system.jobs(run["id"])["deploy"]
    assert job["status"] == "failed" and job["error"] == "branch 'main' is not allowed for environment 'production'"
    assert job["started_at"] is None
