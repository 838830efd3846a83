"""The benchmark scripts keep working (their numbers are recorded in docs/benchmarks.md, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import kici_env

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run_bench(*args: str) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=kici_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_matching_bench_runs() -> None:
    result = run_bench(str(BENCH / "matching.py"), "--quick")
    assert result["orchestrator_path"]["workflow_evaluations_per_s_median"] > 0 and result["matched_pairs"] > 0


def test_local_run_bench_runs() -> None:
    result = run_bench(str(BENCH / "local_run.py"), "--runs", "1")
    assert result["run_local_trivial"]["runs"] == 1 and result["compile_50_workflows"]["median_s"] > 0


def test_dispatch_bench_runs() -> None:
    result = run_bench(str(BENCH / "dispatch.py"), "--quick", "--db", "sqlite")
    sqlite = result["sqlite"]
    assert sqlite["latency"]["dispatched"] == sqlite["latency"]["webhooks"] > 0
    assert sqlite["throughput"]["completed_jobs_per_s"] > 0


def test_dispatch_bench_with_declared_secrets_runs() -> None:
    """Every dispatch carries the 20 declared secrets (the bench fails otherwise)."""
    result = run_bench(str(BENCH / "dispatch.py"), "--quick", "--db", "sqlite", "--secrets", "20")
    sqlite = result["sqlite"]
    assert sqlite["secrets_per_job"] == 20 and sqlite["latency"]["dispatched"] == sqlite["latency"]["webhooks"] > 0


def test_report_latency_bench_runs() -> None:
    result = run_bench(str(BENCH / "report_latency.py"), "--seconds", "1")
    assert result["jobs"] == 20 and result["lost"] == 0 and result["latency_ms"]["median"] > 0
def test_dashboard_bench_runs() -> None:
    result = run_bench(str(BENCH / "dashboard.py"), "--quick")
    sqlite = result["sqlite"]
    assert sqlite["runs_page"]["newest"]["samples"] == 3 and sqlite["run_page"]["last_page"]["bytes"] > 0
    assert sqlite["live_log"]["lines"] == sqlite["live_log_chromium"]["lines"] == 10
def test_scheduler_bench_runs() -> None:
    result = run_bench(str(BENCH / "scheduler.py"), "--quick", "--db", "sqlite")
    sqlite = result["sqlite"]
    assert sqlite["schedules"] == 50 and sqlite["with_schedules"]["scheduler_ticks"] > 0


def test_rotate_key_bench_runs() -> None:
    result = run_bench(str(BENCH / "rotate_key.py"), "--quick", "--db", "sqlite")
    sqlite = result["sqlite"]
    assert sqlite["resealed"] == 200 + 2 * 10 and sqlite["rows_per_s"] > 0


def test_agents_scale_bench_runs() -> None:
    """Idle agents, a reconnect storm with in-flight jobs reclaimed, and jobs/s with one node (the bench
    fails when an agent cannot register or a job is not reclaimed)."""
    result = run_bench(str(BENCH / "agents_scale.py"), "--quick", "--db", "sqlite")
    sqlite = result["sqlite"]
    assert sqlite["first_registration"]["agents"] == sqlite["agents"] == 40
    assert sqlite["idle"]["cpu_pct_of_core"] >= 0 and sqlite["idle"]["rss_mb"] > 0
    [storm] = sqlite["storms"]
    assert storm["agents"] == 40 and storm["reclaimed_jobs"] == storm["in_flight_jobs"] == 4
    assert result["nodes_sqlite"]["completed_jobs_per_s"] > 0
