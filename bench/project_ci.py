"""A real Python project's CI through KiCI, cold cache against warm: end-to-end time of one push.

At run time the bench downloads a real open-source project's source distribution from PyPI (click 8.1.7 by
default: it carries its test suite and needs only pytest; `pip download --no-deps --no-binary :all:`,
never committed here), commits it into a temp git repository with a KiCI workflow — create a venv when the
cache did not bring one, `pip install` the test requirements (and setuptools, wheel) into it,
`pip install -e .`, pytest — whose job caches `.venv` under a key of
`hash_files("requirements/tests.txt", "setup.cfg")`, and pushes it through a real orchestrator (SQLite,
fs blob store) and a real agent (bench/e2e.py's).

Each round purges the repository's caches, pushes once (cold: miss, install, save) and pushes an
unrelated change (warm: hit, no install); the time of a push is from the webhook posted to the run
finished, as the orchestrator records it. Prints one JSON object with each round and the medians.

    .venv/bin/python bench/project_ci.py               # 3 rounds
    .venv/bin/python bench/project_ci.py --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dispatch import cpu_reference, git, post_push  # the sibling benchmarks' helpers

from e2e import Bench, _ts

WORKFLOW = '''\
from kici import Cache, hash_files, job, push, step, workflow

# the venv comes from the cache when the test requirements did not change; otherwise it is built. A venv
# restored into another job's workspace keeps working through `.venv/bin/python -m …` (its scripts' #!
# lines name the workspace it was made in)
make_venv = step("venv", "test -x .venv/bin/python || (python3 -m venv .venv && "
                         ".venv/bin/python -m pip install -q -r requirements/tests.txt setuptools wheel)")
install = step("install", ".venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .")
tests = step("pytest", ".venv/bin/python -m pytest -q -p no:cacheprovider tests")

test = job(
    "test",
    steps=[make_venv, install, tests],
    env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    cache=Cache(key="venv-{{os}}-{{arch}}-" + hash_files("requirements/tests.txt", "setup.cfg"),
                paths=[".venv"], restore_keys=["venv-{{os}}-{{arch}}-"]),
)

ci = workflow("ci", on=[push(branches=["main"])], jobs=[test])
'''


def fetch_sdist(project: str, version: str, into: Path) -> Path:
    """Download the project's sdist from PyPI with pip (and its configuration) and unpack it."""
    into.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    f"{project}=={version}", "-d", str(into)], check=True)
    [archive] = list(into.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    [tree] = [p for p in into.iterdir() if p.is_dir()]
    return tree


def make_repo(tree: Path, repo: Path) -> str:
    shutil.copytree(tree, repo)
    (repo / ".kici" / "workflows").mkdir(parents=True)
    (repo / ".kici" / "workflows" / "ci.py").write_text(WORKFLOW)
    (repo / ".gitignore").write_text(".venv/\n.cache/\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KICI_")}
    subprocess.run([sys.executable, "-m", "kici", "compile"], cwd=repo, check=True, capture_output=True, env=env)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "project with a KiCI workflow")
    return git(repo, "rev-parse", "HEAD")


class ProjectBench(Bench):
    async def push(self, sha: str, expect: str) -> dict[str, Any]:
        """One push through to its finished run: the end-to-end seconds, each step's, the cache lines."""
        delivery = f"ci-{uuid.uuid4().hex[:10]}"
        t0 = time.time()
        await post_push(self.client, self.hook, "main", sha, delivery)
        run = await self.wait_finished((await self.run_of(delivery))["id"], within=900)
        [job] = await self.admin("GET", f"/runs/{run['id']}/jobs")
        lines = await self.lines(run["id"], job["id"])
        if run["status"] != "success":
            raise RuntimeError(f"run {run['id']} ended {run['status']}:\n" + "\n".join(lines[-40:]))
        cache = [line for line in lines if line.startswith("[cache]")]
        if not any(expect in line for line in cache):
            raise RuntimeError(f"expected {expect!r} in the job's cache lines, got {cache}")
        steps = await self._timed_steps(job["id"])
        return {
            "end_to_end_s": round(_ts(run["finished_at"]) - t0, 2),
            "steps_s": steps,
            "cache": cache,
        }

    async def lines(self, run_id: str, job_id: str) -> list[str]:
        out: list[str] = []
        after = 0
        while True:
            page = await self.admin("GET", f"/runs/{run_id}/jobs/{job_id}/logs", params={"after": after, "limit": 5000})
            out += [x["line"] for x in page["lines"]]
            if page["complete"] or not page["lines"]:
                return out
            after = page["next"]

    async def _timed_steps(self, job_id: str) -> dict[str, float]:
        import sqlite3

        with sqlite3.connect(self.work / "kici.db") as db:
            rows = db.execute("SELECT name, started_at, finished_at FROM steps WHERE job_id = ? ORDER BY step_index",
                              (job_id,)).fetchall()
        return {name: round(_ts(b) - _ts(a), 2) for name, a, b in rows if a and b}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "host_cpu_reference_s": cpu_reference(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "project": f"{args.project}=={args.version} (sdist from PyPI, its own test suite)",
        "database": "sqlite (embedded default)", "storage": "fs",
    }
    work = Path(tempfile.mkdtemp(prefix="kici-bench-project-"))
    args.lines = 0  # bench/e2e.py's agent option, unused here
    bench = ProjectBench(work, args)
    try:
        tree = fetch_sdist(args.project, args.version, work / "download")
        sha = make_repo(tree, bench.repo)
        await bench.start(agents=1)
        rounds = []
        for i in range(args.rounds):
            for found in await bench.admin("GET", "/caches"):
                await bench.admin("DELETE", "/caches", params={"repo": found["repo"]})
            cold = await bench.push(sha, "cache miss")
            (bench.repo / "KICI_BENCH.txt").write_text(f"round {i}\n")  # a change that leaves the key alone
            git(bench.repo, "add", "-A")
            git(bench.repo, "commit", "-q", "-m", f"round {i}")
            sha = git(bench.repo, "rev-parse", "HEAD")
            warm = await bench.push(sha, "cache hit")
            rounds.append({"cold": cold, "warm": warm,
                           "speedup": round(cold["end_to_end_s"] / warm["end_to_end_s"], 2)})
        cold_s = [r["cold"]["end_to_end_s"] for r in rounds]
        warm_s = [r["warm"]["end_to_end_s"] for r in rounds]
        result["rounds"] = rounds
        result["median"] = {"cold_s": statistics.median(cold_s), "warm_s": statistics.median(warm_s),
                            "speedup": round(statistics.median(cold_s) / statistics.median(warm_s), 2)}
    finally:
        await bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default="click")
    parser.add_argument("--version", default="8.1.7")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
