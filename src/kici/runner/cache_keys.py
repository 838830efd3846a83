"""Resolving cache key templates (`kici.sdk.caching`) for one job at run time: `hash_files` over the checkout,
the platform, the job's Python version and its matrix values. Used by the agent (job caches, `ctx.cache`)
and by `kici run local`.

`hash_files(*globs)`: the files any glob matches (KiCI's glob rules, `.git` never looked into), sorted by
path; SHA-256 over each one's path, a NUL, its length, a NUL and its content. Every glob must match at
least one file: a glob matching nothing is an error naming it (a typo would otherwise give a key that never
changes). A matched symlink counts by its target's content and must stay inside the workspace.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kici.engine.glob import compile_glob
from kici.sdk.caching import HASH_FILES, KeyTemplateError, key_problem, normalize_path, parse_key

__all__ = ["CacheKeyError", "KeyContext", "hash_files", "matched_files", "normalize_path", "resolve_key"]

_CHUNK = 1024 * 1024


class CacheKeyError(ValueError):
    """A key that cannot be resolved for this job: the message names the template and the reason."""


@dataclass
class KeyContext:
    workspace: Path
    matrix: Mapping[str, Any] | None = None
    python: str | None = None
    """The full version of the job's `python=` interpreter, when it has one."""
    os_name: str = field(default_factory=lambda: sys.platform)
    arch: str = field(default_factory=lambda: platform.machine() or "unknown")
    _hashes: dict[tuple[str, ...], str] = field(default_factory=dict)


def resolve_key(template: str, ctx: KeyContext) -> str:
    try:
        parts = parse_key(template)
    except KeyTemplateError as exc:
        raise CacheKeyError(f"cache key {template!r}: {exc}") from None
    out: list[str] = []
    for part in parts:
        if part.kind == "text":
            out.append(part.text)
        elif part.kind == "os":
            out.append(ctx.os_name)
        elif part.kind == "arch":
            out.append(ctx.arch)
        elif part.kind == "python":
            if ctx.python is None:
                raise CacheKeyError(f"cache key {template!r}: {{{{python}}}} needs the job's python=")
            out.append(ctx.python)
        elif part.kind == "matrix":
            if not ctx.matrix or part.text not in ctx.matrix:
                raise CacheKeyError(f"cache key {template!r}: this job has no matrix value {part.text!r}")
            value = ctx.matrix[part.text]
            out.append(value if isinstance(value, str) else json.dumps(value, separators=(",", ":")))
        elif part.kind == HASH_FILES:
            if part.globs not in ctx._hashes:
                ctx._hashes[part.globs] = hash_files(ctx.workspace, part.globs)
            out.append(ctx._hashes[part.globs])
    key = "".join(out)
    problem = key_problem(key)
    if problem is not None:
        raise CacheKeyError(f"cache key {template!r} resolves to an unusable key: {problem}")
    return key


def matched_files(workspace: Path, globs: Sequence[str]) -> list[str]:
    """Workspace-relative paths of the files the globs match, sorted; `CacheKeyError` when a glob matches
    nothing or a match is a symlink leaving the workspace."""
    root = workspace.resolve()
    patterns = [(g, compile_glob(g, "path")) for g in globs]
    hits: dict[str, int] = {g: 0 for g in globs}
    chosen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            matching = [g for g, rx in patterns if rx.match(rel)]
            if not matching:
                continue
            for g in matching:
                hits[g] += 1
            target = (root / rel).resolve()
            if root not in target.parents:
                raise CacheKeyError(f"hash_files: {rel!r} is a symlink leaving the workspace")
            if target.is_file():
                chosen.add(rel)
    missing = [g for g, n in hits.items() if n == 0]
    if missing:
        raise CacheKeyError(
            "hash_files: " + ", ".join(repr(g) for g in missing)
            + (" matches" if len(missing) == 1 else " match") + " no file in the checkout"
        )
    return sorted(chosen)


def hash_files(workspace: Path, globs: Sequence[str]) -> str:
    digest = hashlib.sha256()
    root = workspace.resolve()
    for rel in matched_files(workspace, globs):
        path = root / rel
        try:
            size = path.stat().st_size
            digest.update(f"{rel}\0{size}\0".encode())
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise CacheKeyError(f"hash_files: cannot read {rel!r}: {exc.strerror or exc}") from None
    return digest.hexdigest()
