"""Git's ref-name rules (`git check-ref-format`), as a pure function.

Ingest refuses a push whose ref git itself would refuse to create: such a ref can only come from a forged
or broken delivery, and a name like `refs/heads/..` or one with control characters must not reach run
records, log lines, check names or a `git fetch` command line.

The rules (git-check-ref-format(1)), for a full ref name such as `refs/heads/main`:

1. components are separated by `/`; no component may begin with `.` or end with `.lock`;
2. at least one `/` (a one-level name like `HEAD` is refused, as `git check-ref-format` does without
   `--allow-onelevel`);
3. no `..` anywhere;
4. no ASCII control character (below 0x20, or DEL), space, `~`, `^` or `:`;
5. no `?`, `*` or `[` (no `--refspec-pattern` here);
6. it does not begin or end with `/`, and has no `//` (no `--normalize`);
7. it does not end with `.`;
8. no `@{`;
9. it is not the single character `@`;
10. no `\\`;

and, as `git check-ref-format` itself refuses it on its command line (it would be taken for an option,
which is exactly why it must not reach one): it does not begin with `-`.
"""

from __future__ import annotations

_FORBIDDEN = frozenset(" ~^:?*[\\\x7f")


def ref_name_problem(ref: str) -> str | None:
    """Why `ref` is not a valid full ref name, or None when git would accept it."""
    if not ref:
        return "it is empty"
    if ref == "@":
        return "it is '@'"
    if ref.startswith("-"):
        return "it begins with '-'"
    for char in ref:
        if ord(char) < 0x20:
            return f"it contains the control character {char!r}"
        if char in _FORBIDDEN:
            return f"it contains {char!r}"
    if "@{" in ref:
        return "it contains '@{'"
    if ".." in ref:
        return "it contains '..'"
    if ref.startswith("/") or ref.endswith("/"):
        return "it begins or ends with '/'"
    if "//" in ref:
        return "it contains '//'"
    if ref.endswith("."):
        return "it ends with '.'"
    components = ref.split("/")
    if len(components) < 2:
        return "it has a single component (a full ref name looks like refs/heads/NAME)"
    for component in components:
        if component.startswith("."):
            return f"the component {component!r} begins with '.'"
        if component.endswith(".lock"):
            return f"the component {component!r} ends with '.lock'"
    return None


def is_valid_ref_name(ref: str) -> bool:
    return ref_name_problem(ref) is None


def branch_name_problem(branch: str) -> str | None:
    """Why a short branch name (`main`, `feature/x`) is not valid, judged as `refs/heads/<branch>`."""
    if branch.startswith("-"):
        return "it begins with '-'"  # `git check-ref-format --branch` refuses these too
    return ref_name_problem(f"refs/heads/{branch}")


def event_ref_problem(
    *, ref: str | None = None, branches: tuple[str | None, ...] = (), tag: str | None = None
) -> str | None:
    """The filter reason for an event whose full ref, branch names or tag git would refuse:
    `invalid ref name '<name>': <why>`; None when every given name is valid."""
    checks: list[tuple[str, str]] = []
    if ref is not None:
        checks.append((ref, ref))
    checks += [(branch, f"refs/heads/{branch}") for branch in branches if branch is not None]
    if tag is not None:
        checks.append((tag, f"refs/tags/{tag}"))
    for shown, full in checks:
        problem = ref_name_problem(full)
        if problem is not None:
            return f"invalid ref name {shown!r}: {problem}"
    return None
