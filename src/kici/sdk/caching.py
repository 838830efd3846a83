"""Cache keys: `hash_files(*globs)` and the placeholders a key may hold, resolved on the agent at run time.

A key is a template: literal text plus placeholders written `{{name}}` —

- `{{hash_files:[globs]}}`, what `hash_files("requirements*.txt")` returns: the SHA-256 (hex) over the
  paths and contents of the checkout's files the globs match, sorted by path (a glob matching no file
  fails the job, naming the glob);
- `{{os}}` (`linux`, `darwin`), `{{arch}}` (`x86_64`, `aarch64`): the agent's platform;
- `{{python}}`: the version of the interpreter the job's `python=` chose (e.g. `3.12.7`);
- `{{matrix.AXIS}}`: the value of that matrix axis for this matrix child.

So `Cache(key="pip-{{os}}-{{python}}-" + hash_files("requirements*.txt"), paths=[".venv"])` changes
whenever a requirements file, the platform or the interpreter does. The compiler checks the template
(`kici.compiler`); `kici.runner.cache_keys` resolves it.
"""

from __future__ import annotations

import json
import re

HASH_FILES = "hash_files"
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")
"""One placeholder; its body never holds `{` or `}` (`hash_files` escapes them in its JSON)."""
SIMPLE = frozenset({"os", "arch", "python"})
MATRIX_PREFIX = "matrix."


def hash_files(*globs: str) -> str:
    """A placeholder for the SHA-256 of the checkout's files matching `globs` (KiCI's glob rules: `*`
    within a path segment, `**` across segments, dotfiles only when named), computed on the agent when
    the job runs. Use it inside a cache key: `Cache(key="pip-" + hash_files("requirements*.txt"), ...)`."""
    if not globs:
        raise TypeError("hash_files() needs at least one glob, like hash_files('requirements*.txt')")
    for glob in globs:
        if not isinstance(glob, str) or not glob.strip():
            raise TypeError(f"hash_files(): each glob must be a non-empty string, not {glob!r}")
    text = json.dumps(list(globs), separators=(",", ":"), ensure_ascii=True)
    # braces only occur inside the JSON strings here, where \u escapes mean the same characters
    text = text.replace("{", "\\u007b").replace("}", "\\u007d")
    return "{{" + HASH_FILES + ":" + text + "}}"


class KeyTemplateError(ValueError):
    """A cache key template that cannot be resolved (the message says why)."""


class Part:
    """One piece of a parsed key: literal `text`, or a placeholder (`os`, `arch`, `python`, `matrix` with
    its axis, `hash_files` with its globs)."""

    __slots__ = ("globs", "kind", "text")

    def __init__(self, kind: str, text: str = "", globs: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.text = text
        """The literal text, or the matrix axis."""
        self.globs = globs

    def __repr__(self) -> str:
        return f"Part({self.kind!r}, {self.text!r}, {self.globs!r})"


def parse_key(template: str) -> list[Part]:
    """The template's parts, in order; `KeyTemplateError` for an unknown or malformed placeholder."""
    parts: list[Part] = []
    at = 0
    for found in PLACEHOLDER.finditer(template):
        _literal(template[at:found.start()], parts)
        parts.append(_placeholder(found.group(1).strip()))
        at = found.end()
    _literal(template[at:], parts)
    return parts


def _literal(text: str, parts: list[Part]) -> None:
    if "{{" in text or "}}" in text:
        raise KeyTemplateError(f"unbalanced `{{{{` or `}}}}` in {text!r} (placeholders are written {{{{name}}}})")
    if text:
        parts.append(Part("text", text))


def _placeholder(body: str) -> Part:
    if body in SIMPLE:
        return Part(body)
    if body.startswith(MATRIX_PREFIX):
        axis = body[len(MATRIX_PREFIX):]
        if not axis:
            raise KeyTemplateError("{{matrix.}} names no axis: write {{matrix.AXIS}}")
        return Part("matrix", axis)
    if body.startswith(HASH_FILES + ":"):
        try:
            globs = json.loads(body[len(HASH_FILES) + 1:])
        except ValueError:
            globs = None
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g.strip() for g in globs):
            raise KeyTemplateError(f"malformed {{{{{body[:80]}}}}}: build it with kici.hash_files(...)")
        return Part(HASH_FILES, globs=tuple(globs))
    known = "{{os}}, {{arch}}, {{python}}, {{matrix.AXIS}} or kici.hash_files(...)"
    raise KeyTemplateError(f"unknown placeholder {{{{{body[:80]}}}}} (use {known})")


MAX_KEY_LENGTH = 512
"""Longest key once resolved (a `hash_files` digest is 64 characters)."""


def key_problem(key: str) -> str | None:
    """Why a resolved key (or restore-key prefix) cannot be used, or None."""
    if not key:
        return "a cache key cannot be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"cache key {key[:60]!r}… is longer than {MAX_KEY_LENGTH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return f"cache key {key[:100]!r} contains a control character"
    if key != key.strip():
        return f"cache key {key[:100]!r} starts or ends with white space"
    return None


def normalize_path(path: object) -> str:
    """A cache path as stored: relative to the workspace, `/`-separated, without `./` or a trailing `/`.
    Raises `ValueError` saying why for anything else — absolute paths, `~` (jobs get no HOME of their own:
    point tools' caches into the workspace, e.g. `PIP_CACHE_DIR=.cache/pip`), `..`, the whole workspace."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"cache path {path!r} must be a non-empty string")
    if path.startswith("~"):
        raise ValueError(f"cache path {path!r}: `~` is not supported (jobs share the agent user's home); "
                         "use a path in the workspace, e.g. set PIP_CACHE_DIR=.cache/pip and cache .cache/pip")
    if path.startswith("/"):
        raise ValueError(f"cache path {path!r} is absolute; it must be relative to the workspace")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"cache path {path!r} contains a backslash or a control character")
    segments = [s for s in path.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise ValueError(f"cache path {path!r} climbs out of the workspace (`..`)")
    if not segments:
        raise ValueError(f"cache path {path!r} names the whole workspace; name directories in it")
    if segments[0] == ".git":
        raise ValueError(f"cache path {path!r} is inside .git, which the checkout owns")
    return "/".join(segments)
