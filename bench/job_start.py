"""Per-job fixed cost of starting a runner: spawned (`python -m kici.runner` per job) against forked from
the runner forkserver (`kici.runner.forkserver`), both driven through `RunnerProcess` as the agent drives
them, one job at a time, with the e2e bench's trivial job (one shell step running `true`).

CPU per job covers every process: this process (the parent's side: pipes, protocol parsing, masking), the
runners and everything they start (`RUSAGE_CHILDREN` for spawned runners; for forked ones the server's own
time plus its reaped children's, `utime + stime + cutime + cstime` from /proc), divided by the jobs.
Also reported: wall time per job (spec handed → runner exited) and its median.

Prints one JSON object.

    .venv/bin/python bench/job_start.py            # 200 jobs per mode, 3 alternating series
    .venv/bin/python bench/job_start.py --quick    # 20 jobs per mode, 1 series
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import cpu_reference

from kici.engine.events import Event
from kici.engine.runner_protocol import JobResult, JobSpec
from kici.runner.client import RunnerProcess, safe_base_env
from kici.runner.forkclient import ForkServer, start_runner

WORKFLOW = """\
from kici import job, push, step, workflow

quick = workflow("quick", on=[push(branches=["main"])], jobs=[job("true", steps=[step("true", "true")])])
"""


def spec(workspace: Path) -> JobSpec:
    return JobSpec(workspace=str(workspace), workflow_file=".kici/workflows/bench.py", export="#quick",
                   workflow="quick", job="true", display_name="true",
                   event=Event(type="push", branch="main", target_branch="main"), env=safe_base_env())


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu(pid: int) -> float:
    """A live process's own CPU plus its reaped children's, in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rfind(b")") + 2:].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


async def one_job(workspace: Path, server: ForkServer | None) -> float:
    started = time.perf_counter()
    runner = await (start_runner(server, spec(workspace)) if server is not None
                    else RunnerProcess.start(spec(workspace)))
    result: JobResult | None = None
    async for message in runner.messages():
        if isinstance(message, JobResult):
            result = message
    await runner.wait()
    if result is None or result.status != "success":
        raise RuntimeError(f"job failed: {result}")
    return time.perf_counter() - started


async def series(workspace: Path, mode: str, jobs: int, server: ForkServer | None) -> dict[str, Any]:
    await one_job(workspace, server)  # warm-up: file system caches, the server's first fork
    assert server is None or server.pid is not None
    cpu0 = own_cpu() + children_cpu() + (tree_cpu(server.pid) if server is not None and server.pid else 0.0)
    walls = [await one_job(workspace, server) for _ in range(jobs)]
    assert server is None or server.pid is not None
    cpu1 = own_cpu() + children_cpu() + (tree_cpu(server.pid) if server is not None and server.pid else 0.0)
    return {
        "mode": mode,
        "jobs": jobs,
        "cpu_per_job_ms": round((cpu1 - cpu0) / jobs * 1000, 1),
        "wall_median_ms": round(statistics.median(walls) * 1000, 1),
        "wall_mean_ms": round(statistics.fmean(walls) * 1000, 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "series": [],
    }
    work = Path(tempfile.mkdtemp(prefix="kici-bench-job-start-"))
    server = ForkServer()
    try:
        workspace = work / "ws"
        (workspace / ".kici" / "workflows").mkdir(parents=True)
        (workspace / ".kici" / "workflows" / "bench.py").write_text(textwrap.dedent(WORKFLOW))
        await server.start()
        for _ in range(args.series):
            for mode in ("spawn", "fork"):
                result["series"].append(await series(workspace, mode, args.jobs, server if mode == "fork" else None))
        result["machine"]["host_cpu_reference_after_s"] = cpu_reference()
    finally:
        await server.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--series", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.series = 20, 1
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
