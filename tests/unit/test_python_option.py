"""`job(python=…, python_venv=…)` at compile time: "3", "3.12" and "3.12.7" accepted and written to the lock
file; anything else (a float, junk, Python 2, a venv without `python=`) refused with a clear error. And
`effective_runs_on`, which adds the routing label at run creation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kici.compiler.errors import CompileFailed
from kici.compiler.project import Project, compile_project
from kici.engine.labels import effective_runs_on
from kici.engine.lockfile import LabelMatcher, LockFile

HEADER = "from kici import *\n"


def _compile(tmp_path: Path, options: str) -> LockFile:
    (tmp_path / ".kici/workflows").mkdir(parents=True, exist_ok=True)
    (tmp_path / ".kici/workflows/wf.py").write_text(
        HEADER + f'ci = workflow("ci", on=push(), jobs=[job("j", run="true", {options})])\n'
    )
    return compile_project(Project(root=tmp_path, kici_dir=tmp_path / ".kici"))


@pytest.mark.parametrize("version", ["3", "3.12", "3.12.7", "3.9", "3.13.0"])
def test_python_versions_accepted(tmp_path: Path, version: str) -> None:
    result = _compile(tmp_path, f"python={version!r}, python_venv=True")
    [wf] = result.workflows
    [lock_job] = wf.jobs
    assert lock_job.python == version and lock_job.python_venv is True
    assert lock_job.runs_on == []  # routing is added per run, not written into the lock file


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("python=3.10", "python=3.1 must be a Python 3 version as a string"),
        ("python='3.x'", "python='3.x' must be a Python 3 version as a string"),
        ("python='2.7'", "python='2.7' must be a Python 3 version"),
        ("python='3.12.7.1'", "must be a Python 3 version"),
        ("python='py3.12'", "must be a Python 3 version"),
        ("python=''", "must be a Python 3 version"),
        ("python_venv=True", "python_venv=True needs python="),
        ("python='3.12', python_venv='yes'", "python_venv='yes' must be True or False"),
    ],
)
def test_bad_python_options_refused(tmp_path: Path, options: str, message: str) -> None:
    with pytest.raises(CompileFailed) as failed:
        _compile(tmp_path, options)
    errors = [str(e) for e in failed.value.errors]
    assert any(message in e and "job 'j'" in e for e in errors), errors


def test_effective_runs_on_adds_the_python_label_once() -> None:
    linux = LabelMatcher(kind="exact", value="linux")
    assert effective_runs_on([linux], None) == [linux]
    assert effective_runs_on(None, "3.12") == [LabelMatcher(kind="exact", value="kici:python:3.12")]
    already = LabelMatcher(kind="exact", value="kici:python:3.12")
    assert effective_runs_on([linux, already], "3.12") == [linux, already]
