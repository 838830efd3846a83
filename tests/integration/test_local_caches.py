"""`kici run local` with `job(cache=…)`: the keys are resolved on the job's copy of the working tree like on an
agent (a `hash_files` glob matching nothing fails that job), and the run says it neither restores nor saves
caches — no silent no-op."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import run_kici

Repo = Callable[..., Path]

WORKFLOW = '''\
from kici import Cache, hash_files, job, push, step, workflow

ok = job("ok", steps=[step("s", "echo RAN")], cache=Cache(key="deps-" + hash_files("deps.txt"), paths=[".venv"]))
missing = job("missing", steps=[step("s", "echo SHOULD-NOT-RUN")],
              cache=Cache(key="k-" + hash_files("nothing*.lock"), paths=["x"]))
ci = workflow("ci", on=[push(branches=["main"])], jobs=[ok, missing])
'''


def test_run_local_resolves_cache_keys_and_says_it_keeps_none(repo_factory: Repo) -> None:
    repo = repo_factory({".kici/workflows/ci.py": WORKFLOW, "deps.txt": "click\n"})
    assert run_kici("compile", cwd=repo).returncode == 0
    out = run_kici("run", "local", "push", "--branch", "main", "--json", "--keep-going", cwd=repo, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    jobs = {j["name"]: j for j in json.loads(out.stdout)["workflows"][0]["jobs"]}
    assert jobs["ok"]["status"] == "success" and jobs["missing"]["status"] == "failed", out.stdout + out.stderr
    assert "hash_files: 'nothing*.lock' matches no file in the checkout" in jobs["missing"]["error"]
    digest = hashlib.sha256(b"deps.txt\x006\x00click\n").hexdigest()
    assert f"caches not restored or saved by a local run (they live on an orchestrator): deps-{digest}" \
        in out.stdout + out.stderr
    assert "SHOULD-NOT-RUN" not in out.stdout + out.stderr
