"""KiCI end to end with real processes: commit → hook → orchestrator → agent → steps → logs → result, on
SQLite and PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx

from kici.runner import proctree

from .conftest import WORKFLOW_HEADER, System, wait_for

PASSING = WORKFLOW_HEADER + '''

@step
def greet(ctx: Context) -> dict[str, str]:
    ctx.log.info("hello from a python step")
    return {"greeting": "hi"}


build = job("build", steps=[greet, step("shell", "echo built $KICI_JOB && echo second line")])


@step
def check(ctx: Context) -> None:
    ctx.log.info(f"build said {ctx.outputs_of('build')['greet']['greeting']}")
    ctx.sh("echo tested")


test = job("test", needs=[build], steps=[check])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[build, test])
'''

FAILING = WORKFLOW_HEADER + '''

build = job("build", steps=[step("fail", "echo about to fail && exit 3")])
deploy = job("deploy", needs=[build], steps=[step("never", "echo must not run")])
report = job("report", needs=[need(build, when="always")], steps=[step("report", "echo reporting")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[build, deploy, report])
'''


def test_push_runs_to_success_with_logs(system: System) -> None:
    system.start_orchestrator()
    system.register_source()
    system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": PASSING}, "add ci")
    run = system.wait_run(sha, "success", "failed")
    assert run["status"] == "success", system.diagnostics()
    jobs = system.jobs(run["id"])
    assert {name: j["status"] for name, j in jobs.items()} == {"build": "success", "test": "success"}
    assert jobs["build"]["agent"] == "a1"
    build_log = system.log_lines(run["id"], "build")
    assert any("hello from a python step" in line for line in build_log), build_log
    assert any("built build" in line for line in build_log) and any("second line" in line for line in build_log)
    test_log = system.log_lines(run["id"], "test")
    assert any("tested" in line for line in test_log)
    assert any("build said hi" in line for line in test_log), test_log  # outputs passed through the orchestrator
    follow = system.kici_admin("runs", "logs", run["id"], "--follow")
    assert follow.returncode == 0 and "second line" in follow.stdout and "tested" in follow.stdout


def test_failing_step_skips_dependents_and_runs_always_jobs(system: System) -> None:
    system.start_orchestrator()
    system.register_source()
    system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": FAILING}, "failing ci")
    run = system.wait_run(sha, "failed", "success")
    assert run["status"] == "failed"
    jobs = system.jobs(run["id"])
    assert {name: j["status"] for name, j in jobs.items()} == {
        "build": "failed", "deploy": "skipped", "report": "success"}
    assert any("about to fail" in line for line in system.log_lines(run["id"], "build"))
    assert any("reporting" in line for line in system.log_lines(run["id"], "report"))
    assert "job build" in (run["failure_reason"] or "")


def test_cancel_mid_step_leaves_no_process(system: System, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    slow = WORKFLOW_HEADER + f'''

work = job("work", steps=[step("sleep", "sleep 300 & echo $! >> {pids}; setsid sleep 300 & echo $! >> {pids}; wait")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[work])
'''
    system.start_orchestrator()
    system.register_source()
    system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": slow}, "slow")
    run = system.wait_run(sha, "running")
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, what="the step's processes")
    started = [int(p) for p in pids.read_text().split()]
    assert all(proctree.alive(pid) for pid in started)
    cancelled = system.kici_admin("runs", "cancel", run["id"], "--force")
    assert cancelled.returncode == 0, cancelled.stderr
    final = system.wait_run(sha, "cancelled", "failed", within=60)
    assert final["status"] == "cancelled"
    assert system.jobs(run["id"])["work"]["status"] == "cancelled"
    wait_for(lambda: not any(proctree.alive(pid) for pid in started), within=15, what="the step's processes to die")


def test_agents_with_different_labels_get_only_their_jobs(system: System) -> None:
    routed = WORKFLOW_HEADER + '''

linux = job("on-linux", runs_on="linux", steps=[step("where", "echo linux job")])
gpu = job("on-gpu", runs_on="gpu", steps=[step("where", "echo gpu job")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[linux, gpu])
'''
    system.start_orchestrator()
    system.register_source()
    system.start_agent("linux-box", labels="linux")
    system.start_agent("gpu-box", labels="gpu")
    sha = system.commit({".kici/workflows/ci.py": routed}, "routed")
    run = system.wait_run(sha, "success", "failed")
    assert run["status"] == "success", system.diagnostics()
    jobs = system.jobs(run["id"])
    assert jobs["on-linux"]["agent"] == "linux-box" and jobs["on-gpu"]["agent"] == "gpu-box"


def test_killed_agent_job_ends_stale_and_run_completes(system: System) -> None:
    slow = WORKFLOW_HEADER + '''

work = job("work", steps=[step("sleep", "echo working; sleep 300")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[work])
'''
    # heartbeats every second (the agent's setting), presumed lost after 2 s of silence
    system.start_orchestrator(KICI_JOB_HEARTBEAT_INTERVAL_MS="1000", KICI_STALE_DETECTOR_THRESHOLD_MULTIPLIER="2",
                              KICI_AGENT_MAX_RECONNECT_DELAY_MS="1000")
    system.register_source()
    agent = system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": slow}, "slow")
    run = system.wait_run(sha, "running")
    wait_for(lambda: system.jobs(run["id"])["work"]["status"] == "running", what="the job to run")
    agent.stop(signal.SIGKILL)
    killed = time.monotonic()
    final = system.wait_run(sha, "failed", within=30)
    assert time.monotonic() - killed < 15
    job = system.jobs(run["id"])["work"]
    assert job["status"] in ("timed_out_stale", "failed"), job
    assert final["failure_reason"]


def test_orchestrator_restart_mid_job_completes_exactly_once(system: System, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    waits = WORKFLOW_HEADER + f'''

work = job("work", steps=[step("wait", "echo run >> {marker}; for i in $(seq 1 100); do sleep 0.1; done; echo done")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[work])
'''
    orchestrator = system.start_orchestrator()
    system.register_source()
    system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": waits}, "waits")
    run = system.wait_run(sha, "running")
    wait_for(marker.exists, what="the step to start")
    assert system.stop_orchestrator(orchestrator) == 0
    system.start_orchestrator()
    final = system.wait_run(sha, "success", "failed", within=60)
    assert final["status"] == "success", system.diagnostics()
    assert marker.read_text().count("run") == 1  # the step ran once
    assert len([r for r in system.runs() if r["sha"] == sha]) == 1
    assert any("done" in line for line in system.log_lines(run["id"], "work"))


def test_redelivered_webhook_after_restart_creates_no_second_run(system: System) -> None:
    orchestrator = system.start_orchestrator()
    system.register_source()
    system.start_agent("a1")
    sha = system.commit({".kici/workflows/ci.py": PASSING}, "add ci")
    system.wait_run(sha, "success")
    assert system.stop_orchestrator(orchestrator) == 0
    system.start_orchestrator()
    hook = system.repo / ".git" / "hooks" / "post-commit"
    subprocess.run([str(hook)], cwd=system.repo, check=True, capture_output=True, timeout=30)
    # the hook has returned, so its request was answered — as a duplicate (the new process's metrics say so)
    metrics = httpx.get(f"{system.url}/metrics", timeout=10).text
    assert 'kici_webhooks_received_total{outcome="duplicate",provider="git"} 1.0' in metrics, metrics
    assert len([r for r in system.runs() if r["sha"] == sha]) == 1


def test_orchestrator_killed_repeatedly_loses_no_job(system: System, tmp_path: Path) -> None:
    """kill -9 of the only orchestrator, three times while twelve short jobs run on two agents: every job
    ends `success` and each step ran exactly once. Before results were confirmed as stored, a result that
    reached an orchestrator killed before it committed was lost, and the job then failed as "the agent
    reconnected without this job"."""
    marks = tmp_path / "marks"
    marks.mkdir()
    quick = WORKFLOW_HEADER + f'''

work = job("work", matrix={{"i": list(range(12))}},
           steps=[step("mark", 'echo ran >> "{marks}/$KICI_JOB"; sleep 1.5; echo done')])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[work])
'''
    orchestrator = system.start_orchestrator()
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="2")
    system.start_agent("a2", KICI_MAX_CONCURRENCY="2")
    sha = system.commit({".kici/workflows/ci.py": quick}, "twelve jobs")
    system.wait_run(sha, "running")
    started = 0
    for _ in range(3):  # a kill each time more jobs have started (while some have yet to)
        if started == 12:
            break
        wait_for(lambda n=started: len(list(marks.iterdir())) > n, within=60, what="more jobs to start")
        started = len(list(marks.iterdir()))
        orchestrator.proc.send_signal(signal.SIGKILL)
        orchestrator.proc.wait(timeout=10)
        orchestrator = system.start_orchestrator()
        wait_for(lambda: sum(a["connected"] for a in system.admin("GET", "/agents").json()) == 2, within=30,
                 what="both agents to reconnect")
    final = system.wait_run(sha, "success", "failed", within=120)
    jobs = system.jobs(final["id"])
    assert final["status"] == "success", {n: (j["status"], j.get("error")) for n, j in jobs.items()}
    assert len(jobs) == 12
    ran = {p.name: p.read_text().count("ran") for p in marks.iterdir()}
    assert len(ran) == 12 and set(ran.values()) == {1}, ran
