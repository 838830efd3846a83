"""Trigger builders: what a workflow's `on=` takes.

These objects hold the author's intent (strings, compiled regexes, typed inputs); the compiler validates
them and writes the lock-file form. Patterns are picomatch globs when given as `str` and regular
expressions when given as `re.Pattern` (`re.compile(r"^release/v\\d+$")`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kici.sdk.inputs import Input

Pattern = str | re.Pattern[str]
Patterns = Pattern | Sequence[Pattern] | None


def _patterns(value: Patterns) -> tuple[Pattern, ...]:
    if value is None:
        return ()
    if isinstance(value, str | re.Pattern):
        return (value,)
    return tuple(value)


def _strings(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class Trigger:
    """One trigger: `kind` is the lock-file `_type`; `options` the author's keyword arguments."""

    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v not in (None, ()))
        return f"{self.kind}({opts})"


def push(
    branches: Patterns = None,
    *,
    tags: Patterns = None,
    paths: str | Sequence[str] | None = None,
    repos: str | Sequence[str] | None = None,
) -> Trigger:
    """A push to a branch. With `tags=`, pushing a matching tag triggers too (compiled as a tag trigger)."""
    return Trigger(
        "push",
        {
            "branches": _patterns(branches),
            "tags": _patterns(tags),
            "paths": _strings(paths),
            "repos": _strings(repos) if repos is not None else None,
        },
    )


def pr(
    *,
    events: str | Sequence[str] | None = None,
    target: Patterns = None,
    source: Patterns = None,
    paths: str | Sequence[str] | None = None,
    repos: str | Sequence[str] | None = None,
) -> Trigger:
    """A pull request. Default events: opened, synchronize, reopened, closed."""
    return Trigger(
        "pr",
        {
            "events": _strings(events) if events is not None else None,
            "target": _patterns(target),
            "source": _patterns(source),
            "paths": _strings(paths),
            "repos": _strings(repos) if repos is not None else None,
        },
    )


def tag(patterns: Patterns = None) -> Trigger:
    """A tag push (`v*`)."""
    return Trigger("tag", {"patterns": _patterns(patterns)})


def schedule(cron: str, *, timezone: str = "UTC", inputs: Mapping[str, Any] | None = None) -> Trigger:
    """A cron schedule (fires only once the workflow is on the default branch)."""
    return Trigger("schedule", {"cron": cron, "timezone": timezone, "inputs": dict(inputs or {}) or None})


def dispatch(
    types: str | Sequence[str] | None = None, *, inputs: Mapping[str, Input] | None = None
) -> Trigger:
    """A manual / API dispatch, optionally with typed inputs (`kici.inputs.string(...)`, …)."""
    return Trigger("dispatch", {"types": _strings(types), "inputs": dict(inputs) if inputs else None})


def comment(
    actions: str | Sequence[str] | None = None,
    *,
    source: Literal["pr", "issue"] | None = None,
    body: Pattern | None = None,
) -> Trigger:
    """An issue or PR comment (`source="pr"` for PR comments only), optionally matching its body."""
    return Trigger("comment", {"actions": _strings(actions), "source": source, "body": body})


def review(actions: str | Sequence[str] | None = None, *, states: str | Sequence[str] | None = None) -> Trigger:
    return Trigger("review", {"actions": _strings(actions), "states": _strings(states)})


def review_comment(actions: str | Sequence[str] | None = None) -> Trigger:
    return Trigger("review_comment", {"actions": _strings(actions)})


def release(actions: str | Sequence[str] | None = None) -> Trigger:
    return Trigger("release", {"actions": _strings(actions)})


def star(actions: str | Sequence[str] | None = None) -> Trigger:
    return Trigger("star", {"actions": _strings(actions)})


def watch(actions: str | Sequence[str] | None = None) -> Trigger:
    return Trigger("watch", {"actions": _strings(actions)})


def fork() -> Trigger:
    return Trigger("fork", {})


def create(
    ref_types: str | Sequence[str] | None = None, *, patterns: Patterns = None
) -> Trigger:
    """A branch or tag created (`ref_types="tag"`)."""
    return Trigger("create", {"ref_types": _strings(ref_types), "patterns": _patterns(patterns)})


def delete(
    ref_types: str | Sequence[str] | None = None, *, patterns: Patterns = None
) -> Trigger:
    return Trigger("delete", {"ref_types": _strings(ref_types), "patterns": _patterns(patterns)})


def status(
    contexts: str | Sequence[str] | None = None, *, states: str | Sequence[str] | None = None
) -> Trigger:
    """A commit status (GitHub `status` event)."""
    return Trigger("status", {"contexts": _strings(contexts), "states": _strings(states)})


def workflow_run(
    actions: str | Sequence[str] | None = None,
    *,
    workflows: str | Sequence[str] | None = None,
    conclusions: str | Sequence[str] | None = None,
) -> Trigger:
    return Trigger(
        "workflow_run",
        {"actions": _strings(actions), "workflows": _strings(workflows), "conclusions": _strings(conclusions)},
    )


def webhook(events: str | Sequence[str] | None = None, *, actions: str | Sequence[str] | None = None) -> Trigger:
    """Catch-all: any provider event by its raw name (GitHub's `X-GitHub-Event`)."""
    return Trigger("webhook", {"events": _strings(events), "actions": _strings(actions)})


def kici_event(
    name: str,
    *,
    match: Mapping[str, Any] | None = None,
    not_: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Trigger:
    """An event emitted by another workflow's step (`ctx.emit`). `match` maps JSONPaths to values."""
    return Trigger("kici_event", {"name": name, "match": match, "not": not_, "source": source})


def generic_webhook(
    source: str,
    *,
    events: str | Sequence[str] | None = None,
    match: Mapping[str, Any] | None = None,
    not_: Mapping[str, Any] | None = None,
    path: str | None = None,
) -> Trigger:
    """A webhook posted to a generic source of the orchestrator."""
    return Trigger(
        "generic_webhook",
        {
            "source": source,
            "events": _strings(events) if events is not None else None,
            "match": match,
            "not": not_,
            "path": path,
        },
    )


def workflow_complete(
    name: str | None = None,
    *,
    status: str | Sequence[str] | None = None,
    source: str | None = None,
) -> Trigger:
    """Another workflow finished (optionally with one of `status`)."""
    return Trigger(
        "workflow_complete",
        {"name": name, "status": _strings(status) if status is not None else None, "source": source},
    )


def job_complete(
    workflow: str | None = None,
    job: str | None = None,
    *,
    status: str | Sequence[str] | None = None,
    source: str | None = None,
) -> Trigger:
    return Trigger(
        "job_complete",
        {
            "workflow": workflow,
            "job": job,
            "status": _strings(status) if status is not None else None,
            "source": source,
        },
    )
