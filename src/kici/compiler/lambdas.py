"""Turning a `lambda event: ...` object back into its source text for the lock file."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from typing import Any


def lambda_source(fn: Callable[..., Any]) -> str | None:
    """The normalised source (`ast.unparse`) of the lambda `fn`, or None if it is not a lambda whose
    source can be found (a `def` function, a builtin, a lambda built by `eval`)."""
    code = getattr(fn, "__code__", None)
    if code is None or code.co_name != "<lambda>":
        return None
    try:
        lines, _ = inspect.findsource(fn)
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse("".join(lines))
    except SyntaxError:
        return None
    candidates = [
        node for node in ast.walk(tree) if isinstance(node, ast.Lambda) and node.lineno == code.co_firstlineno
    ]
    for node in candidates:
        if len(candidates) == 1 or _same_code(node, code):
            return ast.unparse(node)
    return None


def _same_code(node: ast.Lambda, code: Any) -> bool:
    try:
        compiled = compile(ast.Expression(body=node), "<lambda>", "eval")
    except (SyntaxError, ValueError):
        return False
    inner = next((c for c in compiled.co_consts if inspect.iscode(c)), None)
    return inner is not None and inner.co_code == code.co_code and inner.co_names == code.co_names
