"""Wall time of the authoring loop: `kici run local` of a one-step `true` workflow, and `kici compile`
of a repository with 50 workflows. Real processes, real git repositories in a temp dir.

    .venv/bin/python bench/local_run.py [--runs N]

Prints one JSON object with the median, p95 and min of each (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@kici.invalid", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@kici.invalid", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
KICI = [sys.executable, "-m", "kici"]

TRIVIAL = """\
from kici import job, push, step, workflow

ci = workflow("ci", on=push(), jobs=[job("j", steps=[step("true", "true")])])
"""

MANY = """\
from kici import job, need, pr, push, step, workflow

lint = job("lint", steps=[step("ruff", "ruff check .")], runs_on="linux")
test = job("test", needs=[lint], matrix={{"py": ["3.11", "3.12"]}}, steps=[step("pytest", "pytest -q")])
report = job("report", needs=[need(test, when="always")], run="true")
wf{i} = workflow("wf{i}", on=[push(branches=["main", "release/*"], paths=["svc{i}/**"]),
                            pr(target="main", paths=["svc{i}/**", "!docs/**"])],
                 jobs=[lint, test, report])
"""


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
    e.update(GIT_ENV)
    return e


def make_repo(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "bench"]):
        subprocess.run(["git", *args], cwd=root, check=True, env=env(), capture_output=True)
    return root


def timed(args: list[str], cwd: Path, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([*KICI, *args], cwd=cwd, env=env(), capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"kici {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))], 3),
        "min_s": round(ordered[0], 3),
        "runs": len(ordered),
    }


def cpu_reference() -> float:
    """Seconds for a fixed pure-Python loop: this host's speed varies over time (shared machine), so
    results are recorded with it (the same loop took 0.31-0.50 s on the dev machine on one day)."""
    start = time.perf_counter()
    sum(i * i for i in range(3_000_000))
    return round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kici-bench-"))
    try:
        trivial = make_repo(tmp / "trivial", {".kici/workflows/ci.py": TRIVIAL})
        timed(["compile"], trivial, 1)
        many = make_repo(tmp / "many", {f".kici/workflows/wf{i}.py": MANY.format(i=i) for i in range(50)})
        timed(["run", "local", "push", "--branch", "main"], trivial, 2)  # warm the OS caches and .pyc files
        result = {
            "benchmark": "authoring loop",
            "run_local_trivial": summary(timed(["run", "local", "push", "--branch", "main"], trivial, args.runs)),
            "compile_50_workflows": summary(timed(["compile"], many, args.runs)),
            "python": platform.python_version(),
        "host_cpu_reference_s": cpu_reference(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
