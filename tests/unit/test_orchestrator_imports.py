"""The orchestrator's import graph (issue 11): shared state lives in `kici.orchestrator.container`, and the
app module — the composition root — is imported only by the entry points; no import cycle among modules.

Rules of the graph, read from the source with `ast`:
- An edge A → B for every `import` / `from … import` in A that names module B of `kici.orchestrator` (for
  `from pkg import name`, B is `pkg.name` when that is a module, else `pkg`). Imports inside functions are
  edges too: a lazy import only postpones a cycle, it does not remove the dependency.
- Imports under `if TYPE_CHECKING:` are not edges: they never run.
- Importing `a.b.c` also runs the `__init__` of `a.b`; that implicit parent edge is not counted, since a
  package's `__init__` importing its own submodules would otherwise always be a "cycle" that Python
  resolves by running the package first.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .ast_imports import runtime_imports

SRC = Path(__file__).resolve().parents[2] / "src"
APP = "kici.orchestrator.app"
ENTRY_POINTS = {APP, "kici.orchestrator.server", "kici.orchestrator.main", "kici.orchestrator.__main__"}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(src: Path) -> dict[str, Path]:
    root = src / "kici" / "orchestrator"
    return {_module_name(p, src): p for p in sorted(root.rglob("*.py")) if "templates" not in p.parts}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _edges(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules `module` imports at run time (see the rules above)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        target = _resolve(name, modules)
        if target is not None and target != module:
            found.add(target)

    for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            continue
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        for alias in node.names:
            submodule = f"{origin}.{alias.name}"
            add(submodule if submodule in modules else origin)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """`kici.orchestrator`'s module-level import graph under the source root `src`."""
    modules = _modules(src)
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                succ = pending.pop()
                if succ not in graph:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, sorted(graph[succ])))
                elif succ in on_stack:
                    low[node] = min(low[node], index[succ])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_only_entry_points_import_the_app_module() -> None:
    graph = import_graph()
    importers = sorted(name for name, targets in graph.items() if APP in targets and name not in ENTRY_POINTS)
    assert not importers, f"import shared state from kici.orchestrator.container, not {APP}: {importers}"


def test_orchestrator_modules_form_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles in kici.orchestrator:\n" + "\n".join(" ⇄ ".join(c) for c in found)


def test_checks_see_cycles_lazy_imports_and_app_importers(tmp_path: Path) -> None:
    """The checks above can fail: a planted package with a lazy-import cycle, a TYPE_CHECKING-only
    import (not an edge) and a module importing the app."""
    root = tmp_path / "kici" / "orchestrator"
    (root / "sub").mkdir(parents=True)
    for name, text in {
        "__init__.py": "",
        "app.py": "from kici.orchestrator.a import thing\n",
        "a.py": "def thing():\n    from kici.orchestrator.sub import b\n    return b\n",
        "sub/__init__.py": "from . import b\n",
        "sub/b.py": "from kici.orchestrator import a\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kici.orchestrator.d import x\n",
        "d.py": "from kici.orchestrator.c import y\nimport kici.orchestrator.app\n",
    }.items():
        (root / name).write_text(text, encoding="utf-8")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["kici.orchestrator.a", "kici.orchestrator.sub.b"]]
    assert graph["kici.orchestrator.sub"] == {"kici.orchestrator.sub.b"}
    assert "kici.orchestrator.d" not in graph["kici.orchestrator.c"]
    assert APP in graph["kici.orchestrator.d"]
