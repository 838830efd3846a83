"""Checks on regular expressions that workflows put into the lock file.

Lock-file regexes are matched by the orchestrator on every webhook, so a pattern prone to catastrophic
backtracking (`(a+)+$`) would let one repository stall event processing. They are also meant to read the
same in Python and JavaScript, so syntax only one of them understands is refused.
"""

from __future__ import annotations

import re

_PY_ONLY = (
    ("(?P<", "named groups must be written (?<name>...) in both engines; use a plain group"),
    ("(?P=", "named backreferences are Python-only"),
    ("\\Z", "\\Z is Python-only; use $"),
    ("\\A", "\\A is Python-only; use ^"),
    ("(?<=", "lookbehind is not allowed in lock-file regexes"),
    ("(?<!", "lookbehind is not allowed in lock-file regexes"),
    ("(?#", "inline comments are Python-only"),
    ("*+", "possessive quantifiers are Python-only"),
    ("++", "possessive quantifiers are Python-only"),
    ("?+", "possessive quantifiers are Python-only"),
    ("(?>", "atomic groups are Python-only"),
)

_QUANT_AFTER_GROUP = re.compile(r"^(?:[*+]|\{\d*,\d*\}|\{\d{2,}\})")


def regex_problem(source: str) -> str | None:
    """Why `source` is not acceptable as a lock-file regex, or None when it is."""
    try:
        re.compile(source)
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    for token, why in _PY_ONLY:
        if token in source:
            return why
    if _has_nested_quantifier(source):
        return (
            "pattern is prone to catastrophic backtracking (a repeated group that itself contains a "
            "repetition, like (a+)+); rewrite it without nested repetition"
        )
    return None


def _has_nested_quantifier(source: str) -> bool:
    """True if some group that is repeated (`*`, `+`, `{n,}`) itself contains a repetition: star height
    above one, the classic exponential-backtracking shape. Alternations inside a repeated group are
    allowed (`(feat|fix)+` is common and usually safe)."""
    stack: list[dict[str, bool]] = []
    i = 0
    in_class = False
    while i < len(source):
        ch = source[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
            i += 1
            continue
        if ch == "[":
            in_class = True
        elif ch == "(":
            stack.append({"quantified": False})
        elif ch == ")" and stack:
            inner = stack.pop()
            repeated = bool(_QUANT_AFTER_GROUP.match(source[i + 1 :]))
            if repeated and inner["quantified"]:
                return True
            if stack and (inner["quantified"] or repeated):
                stack[-1]["quantified"] = True
        elif stack and (ch in "*+" or (ch == "{" and re.match(r"\{\d*,\d*\}", source[i:]))):
            stack[-1]["quantified"] = True
        i += 1
    return False


_EXTGLOB_REPEAT = re.compile(r"[*+@?!]\(")


def glob_problem(pattern: str) -> str | None:
    """Why a glob is not acceptable in a lock file, or None. Globs compile to regexes, and a repeated
    extglob (`*(…)`, `+(…)`) whose body can itself repeat backtracks exponentially, as nested
    quantifiers do."""
    for m in _EXTGLOB_REPEAT.finditer(pattern):
        if pattern[m.start()] not in "*+":
            continue
        body = _group_body(pattern, m.end() - 1)
        if body is not None and any(ch in body for ch in "*+"):
            return (
                f"glob {pattern!r} repeats an extglob that itself repeats ({pattern[m.start():m.end()]}…); "
                "it can backtrack catastrophically — simplify it"
            )
    return None


def _group_body(text: str, open_index: int) -> str | None:
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None
