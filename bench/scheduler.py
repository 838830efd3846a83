"""Scheduler benchmark: CPU of a real orchestrator process with 1,000 registered schedules.

Per database (SQLite file, and a fresh PostgreSQL database): an orchestrator with no agents is started
and its CPU time (user + system, /proc) is measured over a window with no schedules (the idle baseline:
dispatcher polling, sweeps); then a git source is added whose lock file has N workflows with one
`schedule()` each — daily crons spread evenly over the day (`M H * * *`, UTC), so that ~N/1440 of them
fire per minute, as a real fleet of nightly jobs would (each fire resolves the branch head with git and
creates a run, which waits in the queue: no agents) — and the CPU is measured over the same window again. The
scheduler's cost is the difference, reported as a percentage of one core. Also reported: how long
`source add` took to register the N schedules, and the slots fired during the window.

    .venv/bin/python bench/scheduler.py                  # both databases, 1,000 schedules, 60 s windows
    .venv/bin/python bench/scheduler.py --quick          # a short pass (the test suite runs this)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import (  # the sibling benchmark's orchestrator helpers
    ADMIN_TOKEN,
    Orchestrator,
    cpu_reference,
    git,
    on_each_database,
)

from kici.engine import lockfile as lf


def _daily(index: int, count: int) -> str:
    """Schedule `index` of `count`, spread evenly over the day (1,000 schedules: ~0.7 due per minute)."""
    minute_of_day = index * 1440 // count
    return f"{minute_of_day % 60} {minute_of_day // 60} * * *"


def make_repo(root: Path, schedules: int) -> str:
    """A repository whose lock file has `schedules` workflows, each with one daily schedule."""
    workflows = [
        lf.Workflow(
            name=f"nightly{i}", source=lf.SourceRef(file=f".kici/workflows/n{i}.py", export=f"#nightly{i}"),
            content_hash=hashlib.sha256(str(i).encode()).hexdigest(), compile_schema_version=1,
            triggers=[lf.ScheduleTrigger(cron_expression=_daily(i, schedules), timezone="UTC")],
            jobs=[lf.Job(name="job", steps=[lf.Step(name="true")])],
        )
        for i in range(schedules)
    ]
    (root / ".kici").mkdir(parents=True)
    (root / ".kici" / "kici.lock.json").write_text(lf.render_lock_file(lf.build_lock_file(workflows)))
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "bench")
    return git(root, "rev-parse", "HEAD")


async def metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    for line in (await client.get(f"{url}/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def window(orch: Orchestrator, client: httpx.AsyncClient, seconds: float) -> dict[str, Any]:
    ticks0 = await metric(client, orch.url, "kici_scheduler_ticks_total")
    fired0 = await metric(client, orch.url, "kici_schedules_fired_total")
    cpu0, wall0 = orch.cpu_seconds(), time.monotonic()
    await asyncio.sleep(seconds)  # the measurement window: the orchestrator runs on its own meanwhile
    cpu, wall = orch.cpu_seconds() - cpu0, time.monotonic() - wall0
    return {
        "seconds": round(wall, 2),
        "cpu_s": round(cpu, 3),
        "cpu_percent_of_core": round(100 * cpu / wall, 3),
        "scheduler_ticks": int(await metric(client, orch.url, "kici_scheduler_ticks_total") - ticks0),
        "slots_fired": int(await metric(client, orch.url, "kici_schedules_fired_total") - fired0),
    }


async def bench_one(database_url: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    repo = work / "repo"
    repo.mkdir()
    make_repo(repo, args.schedules)
    (work / "data").mkdir()
    orch = Orchestrator(database_url, work / "data")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:
            await orch.wait_ready(client)
            await asyncio.sleep(2)  # let start-up work (first sweeps, imports) settle before measuring
            idle = await window(orch, client, args.seconds)
            started = time.perf_counter()
            response = await client.post(f"{orch.url}/api/v1/admin/sources", json={
                "kind": "git", "name": "bench", "config": {"url": str(repo)},
                "secrets": {"webhook_secret": "s"},
            })
            register_s = time.perf_counter() - started
            response.raise_for_status()
            listed = (await client.get(f"{orch.url}/api/v1/admin/schedules")).json()
            if len(listed) != args.schedules:
                raise RuntimeError(f"{len(listed)} schedules registered, expected {args.schedules}")
            await asyncio.sleep(2)
            loaded = await window(orch, client, args.seconds)
    finally:
        orch.stop()
    return {
        "schedules": args.schedules,
        "source_add_with_registration_s": round(register_s, 3),
        "idle_no_schedules": idle,
        "with_schedules": loaded,
        "scheduler_cpu_percent_of_core": round(loaded["cpu_percent_of_core"] - idle["cpu_percent_of_core"], 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference()},
        "date": time.strftime("%Y-%m-%d"),
        "scheduler_interval_ms": 1000,
    }
    result.update(await on_each_database(args, "kici-bench-sched", bench_one))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measurement window")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "KICI_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--quick", action="store_true", help="a short pass: 50 schedules, 3 s windows")
    args = parser.parse_args()
    if args.quick:
        args.schedules, args.seconds = 50, 3.0
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
