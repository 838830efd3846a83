"""The import statements a module runs: shared by the architecture tests (which packages import which,
and the orchestrator's import graph)."""

from __future__ import annotations

import ast
from collections.abc import Iterator


def runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every `import` / `from … import` in `tree`, at any depth (function-level ones too), leaving out the
    bodies of `if TYPE_CHECKING:` blocks (their `else:` branches run, so they count)."""
    if isinstance(tree, ast.If) and isinstance(tree.test, ast.Name) and tree.test.id == "TYPE_CHECKING":
        for child in tree.orelse:
            yield from runtime_imports(child)
        return
    if isinstance(tree, ast.Import | ast.ImportFrom):
        yield tree
    for child in ast.iter_child_nodes(tree):
        yield from runtime_imports(child)
