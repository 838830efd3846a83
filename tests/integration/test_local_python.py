"""`kici run local` with `job(python=…, python_venv=…)`: a matching interpreter of this machine first on the
step PATH (in a fresh venv when asked), none of KiCI's own interpreter directories; a version this machine
lacks fails that job clearly."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kici.runner import toolchains
from kici.runner.spawn import kici_bin_dirs
from tests.conftest import run_kici

Repo = Callable[..., Path]

PROBE = (
    "python -c 'import sys; print(\"PY=%d.%d.%d\" % sys.version_info[:3]); print(\"PREFIX=\" + sys.prefix)'; "
    'echo "PATH=$PATH"; echo "VENV=${VIRTUAL_ENV:-none}"'
)


async def test_run_local_uses_a_matching_interpreter_or_fails_the_job(repo_factory: Repo) -> None:
    found = await toolchains.detect(log=lambda *a, **k: None)
    others = [i for i in found if i.version[:2] != sys.version_info[:2]]
    if not others:
        pytest.skip("no Python interpreter besides KiCI's own on this machine")
    other = max(others, key=lambda i: i.version)
    workflow = (
        "from kici import job, push, step, workflow\n"
        f"ok = job('ok', steps=[step('probe', {PROBE!r})], python={other.minor!r}, python_venv=True)\n"
        f"missing = job('missing', steps=[step('never', 'echo SHOULD-NOT-RUN')], python='3.99')\n"
        "ci = workflow('ci', on=[push(branches=['main'])], jobs=[ok, missing])\n"
    )
    repo = repo_factory({".kici/workflows/ci.py": workflow})
    assert run_kici("compile", cwd=repo).returncode == 0
    out = run_kici("run", "local", "push", "--branch", "main", "--json", "--keep-going", cwd=repo, timeout=240)
    assert out.returncode == 1, out.stdout + out.stderr
    jobs = {j["name"]: j for j in json.loads(out.stdout)["workflows"][0]["jobs"]}
    assert jobs["ok"]["status"] == "success", out.stderr
    assert jobs["missing"]["status"] == "failed"
    assert jobs["missing"]["error"].startswith("python='3.99': no matching interpreter here (found: ")
    assert "SHOULD-NOT-RUN" not in out.stderr
    lines = [line.split("│ ", 1)[1] for line in out.stderr.splitlines() if line.startswith("[ok] │ ")]
    values = dict(line.split("=", 1) for line in lines if "=" in line)
    assert values["PY"] == other.full
    assert values["PREFIX"] == values["VENV"] and values["VENV"].endswith(".tools/venv")
    path = values["PATH"].split(os.pathsep)
    assert path[0] == os.path.join(values["VENV"], "bin")
    hidden = kici_bin_dirs()
    assert not [e for e in path if os.path.normpath(e) in hidden or os.path.realpath(e) in hidden]


def test_run_local_names_the_resources_it_does_not_enforce(repo_factory: Repo) -> None:
    workflow = (
        "from kici import Resources, job, push, workflow\n"
        "j = job('j', run='echo ran', resources=Resources(memory='1G', pids=100))\n"
        "ci = workflow('ci', on=[push(branches=['main'])], jobs=[j])\n"
    )
    repo = repo_factory({".kici/workflows/ci.py": workflow})
    assert run_kici("compile", cwd=repo).returncode == 0
    out = run_kici("run", "local", "push", "--branch", "main", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[j] │ resources memory=1 GiB pids=100: not enforced by `kici run local` (agents enforce them)" in out.stdout
