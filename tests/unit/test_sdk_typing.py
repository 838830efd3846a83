"""Workflow files are ordinary Python: they type-check under mypy --strict and compile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kici.compiler.errors import CompileFailed
from kici.compiler.project import Project, compile_project

HERE = Path(__file__).resolve().parent
TYPED = HERE.parent / "fixtures" / "workflows" / "typed_ci.py"
TEMPLATE = HERE.parents[1] / "src" / "kici" / "cli" / "templates" / "ci.py"


def test_workflow_files_type_check_strictly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
         str(TYPED), str(TEMPLATE)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_typed_workflow_compiles_except_for_unsupported_options(tmp_path: Path) -> None:
    """The typed workflow uses every part of the SDK, including options nothing enforces yet: those are
    refused by name (tests/unit/test_sdk_options.py), the rest compiles once they are taken out."""
    (tmp_path / ".kici/workflows").mkdir(parents=True)
    source = TYPED.read_text()
    (tmp_path / ".kici/workflows/ci.py").write_text(source)
    with pytest.raises(CompileFailed) as failed:
        compile_project(Project(root=tmp_path, kici_dir=tmp_path / ".kici"))
    assert sorted(e.message.split(" is not supported yet")[0] for e in failed.value.errors) == ["`kici_event()`"]
    for unsupported in (' kici_event("x", match={"$.a": 1}),',):
        assert unsupported in source
        source = source.replace(unsupported, "")
    (tmp_path / ".kici/workflows/ci.py").write_text(source)
    lock = compile_project(Project(root=tmp_path, kici_dir=tmp_path / ".kici"))
    wf = lock.workflows[0]
    assert [j.name for j in wf.jobs] == ["test", "deploy", "off"]
    assert [t.type for t in wf.triggers] == ["push", "tag", "pr", "tag", "schedule", "dispatch"]
