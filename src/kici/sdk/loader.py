"""Importing workflow modules: used by the compiler (discovery) and the runner (execution) alike.

A workflow file `.kici/workflows/ci.py` is imported as its own module with `.kici/workflows/` and
`.kici/` on `sys.path`, so it can import sibling helpers (`import common`) and helper packages
(`from lib import deploy`). Every module global that is a `Workflow` (or a list/tuple of them) is a
workflow; its export reference is `#name` (or `#name[i]`).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType

from kici.sdk.definitions import Workflow


class WorkflowImportError(Exception):
    """Importing a workflow file failed; `details` holds the last frames of the traceback."""

    def __init__(self, file: str, details: str) -> None:
        self.file = file
        self.details = details
        super().__init__(f"{file}: failed to import\n{details}")


_EXPORT = re.compile(r"^#(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\[(?P<index>\d+)\])?$")


def module_name_for(file: str) -> str:
    stem = re.sub(r"\W", "_", Path(file).stem)
    return f"kici_workflow_{stem}"


def import_paths(workspace: Path, kici_dir: str = ".kici") -> list[str]:
    root = workspace / kici_dir
    return [str(root / "workflows"), str(root)]


def load_module(workspace: Path, file: str, kici_dir: str = ".kici") -> ModuleType:
    """Import `workspace/file` (a path relative to the workspace) and return the module."""
    path = (workspace / file).resolve()
    for entry in reversed(import_paths(workspace, kici_dir)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    name = module_name_for(file)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkflowImportError(file, f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise WorkflowImportError(file, _short_traceback(exc, path)) from None
    return module


def _short_traceback(exc: BaseException, path: Path) -> str:
    """The frames from the workflow file onwards (the loader's own frames say nothing useful)."""
    frames = traceback.extract_tb(exc.__traceback__)
    start = next((i for i, f in enumerate(frames) if Path(f.filename).resolve() == path), 0)
    if isinstance(exc, SyntaxError) and exc.filename:
        start = len(frames)
    lines = traceback.format_list(frames[start:][-6:])
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


def find_workflows(module: ModuleType) -> list[tuple[str, Workflow]]:
    """(`#export`, workflow) for every module-level Workflow, in definition order."""
    found: list[tuple[str, Workflow]] = []
    for name, value in vars(module).items():
        if name.startswith("__"):
            continue
        if isinstance(value, Workflow):
            found.append((f"#{name}", value))
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, Workflow):
                    found.append((f"#{name}[{i}]", item))
    return found


def resolve_export(module: ModuleType, export: str) -> Workflow:
    m = _EXPORT.match(export)
    if not m:
        raise LookupError(f"bad export reference {export!r}")
    value = getattr(module, m["name"], None)
    if m["index"] is not None:
        index = int(m["index"])
        value = value[index] if isinstance(value, list | tuple) and index < len(value) else None
    if not isinstance(value, Workflow):
        raise LookupError(f"{export} is not a workflow in {module.__name__}")
    return value
