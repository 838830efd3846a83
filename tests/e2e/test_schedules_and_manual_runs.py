"""Manual runs and schedules end to end with real processes (orchestrator, agent, `kici-admin`), on SQLite
and PostgreSQL: the typed inputs reach the step as `ctx.inputs`."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tests.integration.orchestrator.schedule_harness import set_next_fire

from .conftest import System

WORKFLOWS = '''\
from kici import Context, dispatch, inputs, job, schedule, step, workflow


@step
def show(ctx: Context) -> None:
    ctx.log.info(f"event={ctx.event.type} inputs={sorted(ctx.inputs.items())}")


deploy = workflow("deploy", on=[dispatch(inputs={
    "count": inputs.number(required=True),
    "mode": inputs.choice(["fast", "slow"], default="fast"),
})], jobs=[job("ship", steps=[show])])
nightly = workflow("nightly", on=[schedule("* * * * *", inputs={"level": "full"})], jobs=[job("suite", steps=[show])])
'''


def test_manual_run_with_inputs_runs_on_an_agent(system: System) -> None:
    system.start_orchestrator()
    sha = system.commit({".kici/workflows/ops.py": WORKFLOWS}, "ops workflows")
    system.register_source()
    system.start_agent("a1")
    bad = system.kici_admin("runs", "start", "deploy", "--source", system.source, "--input", "count=lots")
    assert bad.returncode == 1 and "input 'count' must be a number, not 'lots'" in bad.stderr
    started = system.kici_admin("runs", "start", "deploy", "--source", system.source, "--input", "count=3", "--json")
    assert started.returncode == 0, started.stderr
    created = json.loads(started.stdout)
    run = system.wait_run(sha, "success", "failed", workflow="deploy")
    assert run["id"] == created["id"] and run["status"] == "success", system.diagnostics()
    log = system.log_lines(run["id"], "ship")
    assert any("event=dispatch inputs=[('count', 3), ('mode', 'fast')]" in line for line in log), log
    assert [r["workflow"] for r in system.runs()].count("deploy") == 1


@pytest.mark.slow
def test_schedule_fires_and_runs_on_an_agent(system: System) -> None:
    system.start_orchestrator()
    sha = system.commit({".kici/workflows/ops.py": WORKFLOWS}, "ops workflows")
    system.register_source()  # registers the schedule from the default branch
    listed = system.kici_admin("schedules", "list", "--json")
    assert listed.returncode == 0 and [s["workflow"] for s in json.loads(listed.stdout)] == ["nightly"]
    system.start_agent("a1")
    # the next slot, brought forward rather than waited for at a minute boundary
    set_next_fire(system.database_url, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    run = system.wait_run(sha, "success", "failed", workflow="nightly", within=30)
    assert run["status"] == "success", system.diagnostics()
    log = system.log_lines(run["id"], "suite")
    assert any("event=schedule inputs=[('level', 'full')]" in line for line in log), log
