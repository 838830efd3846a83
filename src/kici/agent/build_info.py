"""Which KiCI code this agent runs: its version and a hash of its installed sources, so an operator
comparing a drift error or `/health` across agents (and with a developer's `kici compile`) can tell
identical builds from builds that only share a version number."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import kici


@functools.cache
def kici_build_hash() -> str:
    """sha256 over the relative paths and contents of the installed `kici` package's Python sources,
    first 16 hex digits. Computed once per process (~100 small files)."""
    root = Path(kici.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "templates" in path.parts or "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes().replace(b"\r\n", b"\n"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
