"""Workflow files are ordinary Python: they type-check under mypy --strict and compile."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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


def test_typed_workflow_compiles(tmp_path: Path) -> None:
    (tmp_path / ".kici/workflows").mkdir(parents=True)
    shutil.copy(TYPED, tmp_path / ".kici/workflows/ci.py")
    lock = compile_project(Project(root=tmp_path, kici_dir=tmp_path / ".kici"))
    wf = lock.workflows[0]
    assert [j.name for j in wf.jobs] == ["test", "deploy", "off"]
    assert [t.type for t in wf.triggers] == ["push", "tag", "pr", "tag", "schedule", "kici_event", "dispatch"]
