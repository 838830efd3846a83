"""A job's `grace_period` (lock file) travels with its dispatch to the agent and is what the runner waits
between SIGTERM and SIGKILL of the job's commands on a cancel, instead of the default (5 s); real
processes end to end, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from .conftest import WORKFLOW_HEADER, System, wait_for

# The step ignores SIGTERM (noting each one) and keeps going, noting the time every 50 ms, until SIGKILL
# ends it: its last note is (within 50 ms) when it died. Pure Python, no child processes: the kill
# sends SIGTERM to anything the step forks during the grace period too.
STUBBORN = """\
import os, pathlib, signal, sys, time

marks, name = pathlib.Path(sys.argv[1]), sys.argv[2]


def on_term(*_: object) -> None:
    with open(marks / f"{name}.term", "a") as f:
        f.write(f"{time.time()}\\n")


signal.signal(signal.SIGTERM, on_term)
print("started", flush=True)
while True:  # written aside and renamed: a SIGKILL never leaves a half-written note
    (marks / f"{name}.alive.tmp").write_text(str(time.time()))
    os.replace(marks / f"{name}.alive.tmp", marks / f"{name}.alive")
    time.sleep(0.05)
"""


def test_grace_period_used_for_cancel(system: System, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    workflow = WORKFLOW_HEADER + f'''

quick = job("quick", grace_period=1, steps=[step("stubborn", "python3 stubborn.py {marks} quick")])
slow = job("slow", steps=[step("stubborn", "python3 stubborn.py {marks} slow")])

ci = workflow("ci", on=[push(branches=["main"])], jobs=[quick, slow])
'''
    system.start_orchestrator()
    system.register_source()
    system.start_agent("a1", KICI_MAX_CONCURRENCY="2")
    sha = system.commit({".kici/workflows/ci.py": workflow, "stubborn.py": STUBBORN}, "stubborn steps")
    run = system.wait_run(sha, "running")
    lock = (system.repo / ".kici" / "kici.lock.json").read_text()
    assert '"gracePeriod": 1000' in lock

    def both_started() -> bool:
        return all(any("started" in line for line in system.log_lines(run["id"], name)) for name in ("quick", "slow"))

    wait_for(both_started, within=60, what="both stubborn steps to start")
    cancelled = system.kici_admin("runs", "cancel", run["id"])  # not forced: the grace period applies
    assert cancelled.returncode == 0, cancelled.stderr
    final = system.wait_run(sha, "cancelled", "failed", "success", within=60)
    assert final["status"] == "cancelled", system.diagnostics()
    jobs = system.jobs(run["id"])

    def kill_delay(name: str) -> float:
        """Seconds from the first SIGTERM the step trapped to its last sign of life (its SIGKILL)."""
        assert jobs[name]["status"] == "cancelled", jobs[name]
        termed = float((marks / f"{name}.term").read_text().split()[0])
        last_alive = float((marks / f"{name}.alive").read_text().strip())
        return last_alive - termed

    quick_delay, slow_delay = kill_delay("quick"), kill_delay("slow")
    # 1 s of grace (plus the moment a kill and a status report take) against the default 5 s
    assert 0.9 <= quick_delay < 4.0, (quick_delay, slow_delay)
    assert slow_delay >= 4.8, (quick_delay, slow_delay)
