"""The dependency direction of DESIGN.md §2, checked on the source: engine and sdk are leaves, and so on."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .ast_imports import runtime_imports

SRC = Path(__file__).resolve().parents[2] / "src" / "kici"

ALLOWED: dict[str, set[str]] = {
    "engine": set(),
    "sdk": set(),
    "compiler": {"sdk", "engine"},
    "runner": {"sdk", "engine"},
    "cli": {"compiler", "runner", "engine", "sdk"},
    "agent": {"engine", "runner"},
    "orchestrator": {"engine"},
    "admin": {"engine"},
}


def _runtime_imports(path: Path) -> set[str]:
    """Top-level kici sub-packages imported by `path`, ignoring `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()
    for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kici" and len(parts) > 1:
                    found.add(parts[1])
        elif node.module and not node.level:
            parts = node.module.split(".")
            if parts[0] == "kici":
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # `from kici import step`: the package re-exports the SDK
                    found.add("sdk")
    return found


@pytest.mark.parametrize("package", sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name in ALLOWED))
def test_package_imports_only_what_design_allows(package: str) -> None:
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        if "templates" in path.parts:  # workflow templates are user code, not part of the package
            continue
        for target in _runtime_imports(path) - {package} - ALLOWED[package]:
            bad.append(f"{path.relative_to(SRC)} imports kici.{target}")
    assert not bad, "\n".join(bad)


def test_runner_start_up_does_not_import_service_or_cli_libraries() -> None:
    code = (
        "import sys, kici.runner.__main__ as m\n"
        "heavy = [n for n in ('click', 'rich', 'httpx', 'sqlalchemy', 'fastapi', 'websockets', 'uvicorn')"
        " if n in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
