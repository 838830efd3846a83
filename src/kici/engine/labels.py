"""Label matching: which agents may run a job.

A job's `runs_on` is a list of matchers that must *all* be satisfied by the agent's labels; its
`exclude` matchers must *none* be; and every taint of the agent (a label the agent's token made
mandatory) must be asked for by name in `runs_on`, so tainted agents only take jobs meant for them.

Exact matchers compare case-sensitively (`Linux` is not `linux`): labels are identifiers, and the
queue's SQL containment test (`agent_labels @> runs_on_labels`) is case-sensitive too. The labels the
agent adds itself are all lowercase. Regex matchers (globs are compiled to regexes by the compiler) must
match a whole label.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache

from kici.engine.lockfile import LabelMatcher

RESERVED_PREFIX = "kici:"
MAX_LABEL_LENGTH = 255

_FLAG_BITS: dict[str, re.RegexFlag] = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE}
# JS flags that change nothing for a whole-string test of one label: g(lobal), y (sticky), u(nicode,
# always on in Python 3), d (indices).
_IGNORED_FLAGS = frozenset("gyud")


@lru_cache(maxsize=1024)
def compile_label_regex(source: str, flags: str | None = None) -> re.Pattern[str]:
    """Compile a lock-file regex matcher once; ValueError for a bad pattern or an unsupported flag."""
    bits = re.RegexFlag(0)
    for flag in flags or "":
        if flag in _FLAG_BITS:
            bits |= _FLAG_BITS[flag]
        elif flag not in _IGNORED_FLAGS:
            raise ValueError(f"label regex /{source}/{flags}: unsupported flag {flag!r}")
    try:
        return re.compile(source, bits)
    except re.error as exc:
        raise ValueError(f"label regex /{source}/: {exc}") from None


def matcher_matches(matcher: LabelMatcher, label: str) -> bool:
    if matcher.kind == "exact":
        if matcher.value is None:
            raise ValueError("exact label matcher has no value")
        return label == matcher.value
    if matcher.source is None:
        raise ValueError("regex label matcher has no source")
    return compile_label_regex(matcher.source, matcher.flags).fullmatch(label) is not None


def validate_matcher(matcher: LabelMatcher) -> None:
    """Raise ValueError if `matcher` could never be evaluated (missing value/source, bad regex)."""
    matcher_matches(matcher, "")


def job_matches_agent(
    runs_on: Sequence[LabelMatcher],
    exclude: Sequence[LabelMatcher] | None,
    agent_labels: Collection[str],
    agent_taints: Collection[str] = (),
) -> bool:
    """Whether an agent with these labels and taints may run the job. Empty `runs_on` = any agent."""
    for matcher in runs_on:
        if not any(matcher_matches(matcher, label) for label in agent_labels):
            return False
    for matcher in exclude or ():
        if any(matcher_matches(matcher, label) for label in agent_labels):
            return False
    if agent_taints:
        requested = {m.value for m in runs_on if m.kind == "exact"}
        if not all(taint in requested for taint in agent_taints):
            return False
    return True


def conflicting_labels(runs_on: Sequence[LabelMatcher], exclude: Sequence[LabelMatcher] | None) -> list[str]:
    """Labels a job both requires (exact `runs_on` values) and excludes (by any exclude matcher).

    Such a job can never be dispatched, so the compiler rejects it.
    """
    conflicts: list[str] = []
    for matcher in runs_on:
        if matcher.kind != "exact" or matcher.value is None or matcher.value in conflicts:
            continue
        if any(matcher_matches(ex, matcher.value) for ex in exclude or ()):
            conflicts.append(matcher.value)
    return conflicts


def validate_user_labels(labels: Iterable[str]) -> list[str]:
    """Clean operator-given labels (e.g. `KICI_LABELS`): strip, drop duplicates, keep order.

    ValueError, naming the label, for an empty label, one with whitespace or a comma inside, one longer
    than `MAX_LABEL_LENGTH`, or one in the reserved `kici:` namespace (any case), which only the agent
    itself may claim.
    """
    out: list[str] = []
    for raw in labels:
        label = raw.strip()
        if not label:
            raise ValueError("empty agent label (check for stray commas in the label list)")
        if label.lower().startswith(RESERVED_PREFIX):
            raise ValueError(
                f"agent label {label!r} uses the reserved {RESERVED_PREFIX!r} prefix; "
                "those labels are added by the agent itself"
            )
        if any(ch.isspace() or ch == "," for ch in label):
            raise ValueError(f"agent label {label!r} must not contain whitespace or commas")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"agent label {label[:40]!r}… is longer than {MAX_LABEL_LENGTH} characters")
        if label not in out:
            out.append(label)
    return out


_OS_ALIASES: dict[str, tuple[str, ...]] = {
    "linux": ("linux",),
    "darwin": ("darwin", "macos"),
    "macos": ("darwin", "macos"),
    "windows": ("windows", "win32"),
    "win32": ("windows", "win32"),
}
_ARCH_ALIASES: dict[str, tuple[str, ...]] = {
    "x86_64": ("x64", "amd64"),
    "amd64": ("x64", "amd64"),
    "x64": ("x64", "amd64"),
    "aarch64": ("arm64",),
    "arm64": ("arm64",),
}


def auto_labels(os_name: str, arch: str, hostname: str) -> list[str]:
    """The labels every agent reports about itself (`platform.system()`, `platform.machine()`, host).

    OS and architecture get the common aliases as well, so `kici:arch:x64` and `kici:arch:amd64` both
    route to an x86-64 machine, and `kici:os:darwin` and `kici:os:macos` to a Mac.
    """
    labels: list[str] = []
    os_key = os_name.strip().lower()
    if os_key:
        labels += [f"{RESERVED_PREFIX}os:{o}" for o in _OS_ALIASES.get(os_key, (os_key,))]
    arch_key = arch.strip().lower()
    if arch_key:
        labels += [f"{RESERVED_PREFIX}arch:{a}" for a in _ARCH_ALIASES.get(arch_key, (arch_key,))]
    host = hostname.strip().lower()
    if host:
        labels.append(f"{RESERVED_PREFIX}host:{host}")
    return labels


PYTHON_LABEL_PREFIX = f"{RESERVED_PREFIX}python:"
"""`kici:python:3.12` / `kici:python:3.12.7`: an agent has that interpreter (`kici.runner.toolchains`)."""


def effective_runs_on(runs_on: Sequence[LabelMatcher] | None, python: str | None) -> list[LabelMatcher]:
    """A job's `runs_on` plus, for a job with `python=`, the exact matcher `kici:python:<version>`: only
    agents that have that interpreter take it."""
    matchers = list(runs_on or [])
    if python:
        label = PYTHON_LABEL_PREFIX + python
        if not any(m.kind == "exact" and m.value == label for m in matchers):
            matchers.append(LabelMatcher(kind="exact", value=label))
    return matchers
