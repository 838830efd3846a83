"""Compiling a repository's `.kici/` into `.kici/kici.lock.json`."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kici.compiler.errors import Collector, CompileError, CompileFailed
from kici.compiler.jobs import convert_workflow
from kici.engine import lockfile as lf
from kici.engine.content_hash import workflow_content_hash
from kici.sdk.loader import WorkflowImportError, find_workflows, load_module

LOCK_NAME = "kici.lock.json"


@dataclass(frozen=True)
class Project:
    """Where a project's files are: `root` is the repository root, `kici_dir` its `.kici` folder."""

    root: Path
    kici_dir: Path

    @classmethod
    def locate(cls, kici_dir: str | Path | None = None, cwd: Path | None = None) -> Project:
        """`--kici-dir` if given, else the nearest `.kici` folder at or above the working directory."""
        base = (cwd or Path.cwd()).resolve()
        if kici_dir is not None:
            path = (base / kici_dir).resolve()
            return cls(root=path.parent, kici_dir=path)
        for folder in (base, *base.parents):
            if (folder / ".kici").is_dir():
                return cls(root=folder, kici_dir=folder / ".kici")
        return cls(root=base, kici_dir=base / ".kici")

    @property
    def lock_path(self) -> Path:
        return self.kici_dir / LOCK_NAME

    @property
    def kici_rel(self) -> str:
        return self.kici_dir.relative_to(self.root).as_posix()

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def workflow_files(self) -> list[Path]:
        folder = self.kici_dir / "workflows"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.py") if p.is_file() and not p.name.startswith("_"))

    def read(self, rel: str) -> bytes | None:
        path = self.root / rel
        try:
            return path.read_bytes() if path.is_file() else None
        except OSError:
            return None


def compile_project(project: Project) -> lf.LockFile:
    """Import every workflow file, validate, and build the lock file; raise CompileFailed on errors."""
    errors: list[CompileError] = []
    files = project.workflow_files()
    if not files:
        raise CompileFailed([CompileError(project.rel(project.kici_dir) if project.kici_dir.exists()
                                          else str(project.kici_dir), "no workflow files in workflows/ "
                                          "(expected .kici/workflows/*.py; run `kici init` to create one)")])
    workflows: list[lf.Workflow] = []
    names: dict[str, str] = {}
    with _isolated_imports():
        for path in files:
            rel = project.rel(path)
            try:
                module = load_module(project.root, rel, project.kici_rel)
            except WorkflowImportError as exc:
                errors.append(CompileError(rel, f"import failed:\n{exc.details}"))
                continue
            found = find_workflows(module)
            if not found:
                continue
            content_hash = workflow_content_hash(rel, project.read, project.kici_rel, lf.COMPILE_SCHEMA_VERSION)
            for export, wf in found:
                where = Collector(errors, rel, wf.name)
                if not isinstance(wf.name, str) or not wf.name.strip():
                    where.error("a workflow needs a non-empty name")
                    continue
                if wf.name in names:
                    where.error(f"duplicate workflow name {wf.name!r} (also in {names[wf.name]})")
                    continue
                names[wf.name] = rel
                try:
                    workflows.append(convert_workflow(wf, rel, export, content_hash, where))
                except Exception as exc:  # a validation gap must still read as a compile error
                    where.error(f"cannot compile: {type(exc).__name__}: {exc}")
    if errors:
        raise CompileFailed(errors)
    if not workflows:
        raise CompileFailed([CompileError(project.rel(project.kici_dir), "no workflows found: define a "
                                          "module-level `name = workflow(...)` in .kici/workflows/*.py")])
    return lf.build_lock_file(workflows)


class _isolated_imports:
    """Workflow modules and their helpers are removed from `sys.modules`/`sys.path` afterwards, so a
    second compile in the same process (tests, `--watch`) sees fresh code."""

    def __enter__(self) -> None:
        self.modules = set(sys.modules)
        self.path = list(sys.path)
        # compiling must not leave __pycache__ folders in the user's .kici/
        self.dont_write_bytecode = sys.dont_write_bytecode
        sys.dont_write_bytecode = True

    def __exit__(self, *exc: object) -> None:
        for name in set(sys.modules) - self.modules:
            del sys.modules[name]
        sys.path[:] = self.path
        sys.dont_write_bytecode = self.dont_write_bytecode


@dataclass(frozen=True)
class CompileResult:
    lock: lf.LockFile
    text: str
    changed: bool


def write_lock(project: Project) -> CompileResult:
    lock = compile_project(project)
    text = lf.render_lock_file(lock)
    current = project.read(project.rel(project.lock_path)) if project.lock_path.exists() else None
    changed = current != text.encode("utf-8")
    if changed:
        tmp = project.lock_path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(project.lock_path)
    return CompileResult(lock, text, changed)


def check_lock(project: Project) -> tuple[bool, str]:
    """(up to date, reason). Compiles in memory and compares with the file on disk; never writes."""
    lock = compile_project(project)
    text = lf.render_lock_file(lock)
    if not project.lock_path.exists():
        return False, f"{project.rel(project.lock_path)} is missing; run `kici compile`"
    if project.lock_path.read_bytes() != text.encode("utf-8"):
        return False, f"{project.rel(project.lock_path)} is out of date; run `kici compile`"
    return True, f"{project.rel(project.lock_path)} is up to date"
