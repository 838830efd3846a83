"""The per-workflow `contentHash`: the workflow file plus every local module under `.kici/` it imports.

The compiler writes it into the lock file and the runner recomputes it on the checked-out commit (the
drift gate), so this module is the one definition both use. It is I/O-free: callers pass a `read`
function returning a file's bytes (or None when the file does not exist).

Local imports are found statically (`import x`, `from x import y`, relative imports) and resolved the way
the runner imports workflows: first against `.kici/workflows/`, then against `.kici/`. Imports that do
not resolve to a file there (the standard library, installed packages) are not part of the hash.
Dynamic imports (`importlib.import_module(name_in_a_variable)`) cannot be seen and are not hashed.
"""

from __future__ import annotations

import ast
import hashlib
import posixpath
from collections.abc import Callable, Iterator

Reader = Callable[[str], bytes | None]


def normalize_source(data: bytes) -> bytes:
    """CRLF and lone CR become LF, so a checkout with other line endings hashes the same."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def workflow_content_hash(entry: str, read: Reader, kici_dir: str = ".kici", prefix: int = 1) -> str:
    """sha256 of `"<prefix>:" + entry source` then, for each local module it imports (transitively,
    sorted by path), `"\\0" + path + "\\0" + source`. Paths are POSIX, relative to the repository root."""
    entry = posixpath.normpath(entry)
    source = read(entry)
    if source is None:
        raise FileNotFoundError(entry)
    digest = hashlib.sha256(f"{prefix}:".encode())
    digest.update(normalize_source(source))
    for path in sorted(local_imports(entry, read, kici_dir)):
        data = read(path)
        if data is None:  # pragma: no cover - local_imports only returns files that exist
            continue
        digest.update(b"\0" + path.encode() + b"\0")
        digest.update(normalize_source(data))
    return digest.hexdigest()


def local_imports(entry: str, read: Reader, kici_dir: str = ".kici") -> set[str]:
    """Every file under `kici_dir` that `entry` imports, directly or through other local modules."""
    roots = (posixpath.join(kici_dir, "workflows"), kici_dir)
    seen: set[str] = set()
    pending = [posixpath.normpath(entry)]
    while pending:
        current = pending.pop()
        data = read(current)
        if data is None:
            continue
        try:
            tree = ast.parse(normalize_source(data), filename=current)
        except (SyntaxError, ValueError):
            continue  # the compiler reports syntax errors when it imports the file
        for found in _resolve_imports(tree, current, roots, read):
            if found not in seen and found != entry:
                seen.add(found)
                pending.append(found)
    return seen


def _resolve_imports(tree: ast.AST, current: str, roots: tuple[str, ...], read: Reader) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _module_files(alias.name.split("."), roots, read)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = posixpath.dirname(current)
                for _ in range(node.level - 1):
                    base = posixpath.dirname(base)
                parts = node.module.split(".") if node.module else []
                search: tuple[str, ...] = (base,)
            else:
                parts = (node.module or "").split(".")
                search = roots
            yield from _module_files(parts, search, read)
            # `from pkg import mod` may import a submodule
            for alias in node.names:
                if alias.name != "*":
                    yield from _module_files([*parts, alias.name], search, read, packages=False)


def _module_files(parts: list[str], roots: tuple[str, ...], read: Reader, packages: bool = True) -> Iterator[str]:
    """Files that importing dotted `parts` from the first matching root executes (the module itself and,
    when `packages`, the `__init__.py` of each package on the way). Nothing when it is not local."""
    parts = [p for p in parts if p]
    if not parts:
        return
    for root in roots:
        prefix = posixpath.join(root, *parts)
        module = prefix + ".py" if read(prefix + ".py") is not None else posixpath.join(prefix, "__init__.py")
        if read(module) is None:
            continue
        if packages:
            for depth in range(1, len(parts)):
                init = posixpath.join(root, *parts[:depth], "__init__.py")
                if read(init) is not None:
                    yield init
        yield module
        return
