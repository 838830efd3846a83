"""The event grammar of `kici preview` / `kici run local`: `push`, `pr:open`, `kici_event:deploy`, …"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kici.engine.events import Event

PR_ACTIONS = {"open": "opened", "sync": "synchronize", "close": "closed", "reopen": "reopened"}


_SIMPLE_ACTION = {
    "comment": "created", "review": "submitted", "review_comment": "created", "release": "published",
    "star": "created", "watch": "started", "workflow_run": "completed",
}


class EventSpecError(ValueError):
    pass


@dataclass(frozen=True)
class EventOptions:
    branch: str | None = None
    source_branch: str | None = None
    tag: str | None = None
    files: list[str] | None = None
    repo: str | None = None
    sha: str | None = None
    inputs: dict[str, str] | None = None
    payload: dict[str, Any] | None = None


def build_event(spec: str, opts: EventOptions, repo_dir: Path) -> Event:
    """Turn `pr:open` + options into an Event, filling the branch, repo, sha and changed files from git."""
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    payload = dict(opts.payload or {})
    git = _Git(repo_dir)
    branch = opts.branch or git.current_branch() or "main"
    sha = opts.sha or git.head_sha()
    repo = opts.repo or git.repo_slug()
    files = opts.files if opts.files is not None else git.changed_files()
    common: dict[str, Any] = {"sha": sha, "repo": repo, "payload": payload, "inputs": dict(opts.inputs or {})}
    if kind == "push":
        _no_arg(kind, rest)
        return Event(type="push", name="push", branch=branch, target_branch=branch, ref=f"refs/heads/{branch}",
                     changed_files=files, **common)
    if kind == "tag":
        tag = opts.tag or rest or "v0.0.0-local"
        return Event(type="tag", name="push", tag=tag, ref=f"refs/tags/{tag}", **common)
    if kind == "pr":
        action = PR_ACTIONS.get(rest or "open", rest or "opened")
        target = opts.branch or "main"
        source = opts.source_branch or git.current_branch() or "feature"
        return Event(type="pr", name="pull_request", action=action, target_branch=target, source_branch=source,
                     branch=source, source_repo=repo, changed_files=files, **common)
    if kind == "dispatch":
        return Event(type="dispatch", name=rest or None, branch=branch, target_branch=branch, **common)
    if kind == "schedule":
        return Event(type="schedule", name=rest or None, branch=branch, target_branch=branch, **common)
    if kind in _SIMPLE_ACTION or kind in ("fork",):
        action = rest or _SIMPLE_ACTION.get(kind)
        if kind == "comment":
            payload.setdefault("comment", {"body": ""})
            payload.setdefault("issue", {"number": 1})
        return Event(type=kind, name=kind if kind != "comment" else "issue_comment", action=action,  # type: ignore[arg-type]
                     branch=branch, **common)
    if kind in ("create", "delete"):
        ref_type = rest or "branch"
        if ref_type not in ("branch", "tag"):
            raise EventSpecError(f"{kind}: expected {kind}:branch or {kind}:tag, not {spec!r}")
        payload.setdefault("ref_type", ref_type)
        payload.setdefault("ref", opts.tag if ref_type == "tag" and opts.tag else branch)
        return Event(type=kind, name=kind, **common)  # type: ignore[arg-type]
    if kind == "status":
        payload.setdefault("state", rest or "success")
        payload.setdefault("context", "ci")
        return Event(type="status", name="status", **common)
    if kind == "kici_event":
        if not rest:
            raise EventSpecError("kici_event needs a name: kici_event:NAME")
        return Event(type="kici_event", name=rest, branch=branch, **common)
    if kind in ("workflow_complete", "job_complete"):
        return Event(type=kind, status=rest or "success", branch=branch, **common)  # type: ignore[arg-type]
    if kind == "generic_webhook":
        source, _, name = rest.partition(":")
        if not source:
            raise EventSpecError("generic_webhook needs a source: generic_webhook:SOURCE[:EVENT]")
        return Event(type="generic_webhook", source=source, name=name or None, **common)
    if kind == "webhook":
        name, _, action = rest.partition(":")
        if not name:
            raise EventSpecError("webhook needs an event name: webhook:NAME[:ACTION]")
        return Event(type="webhook", name=name, action=action or None, branch=branch, **common)
    raise EventSpecError(f"unknown event {spec!r}; try push, tag, pr:open, dispatch, schedule, kici_event:NAME")


def _no_arg(kind: str, rest: str) -> None:
    if rest:
        raise EventSpecError(f"{kind} takes no ':…' part (use --branch)")


def parse_pairs(values: tuple[str, ...] | list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise EventSpecError(f"{what} {item!r} must look like KEY=VALUE")
        out[key.strip()] = value
    return out


def load_payload(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EventSpecError(f"--payload {path}: {exc}") from None
    if not isinstance(data, dict):
        raise EventSpecError(f"--payload {path}: must contain a JSON object")
    return data


class _Git:
    """What the event needs from the working tree, in as few git processes as possible (this is on the
    path of every `kici run local`)."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir
        self._status: tuple[str | None, str | None, list[str]] | None = None

    def _run(self, *args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=self.repo_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    def _read_status(self) -> tuple[str | None, str | None, list[str]]:
        """(branch, HEAD sha, uncommitted changes incl. untracked files) from one `git status`."""
        if self._status is None:
            out = self._run("status", "--porcelain=v2", "--branch", "--untracked-files=all", "-z")
            branch = sha = None
            files: set[str] = set()
            entries = (out or "").split("\0")
            i = 0
            while i < len(entries):
                entry = entries[i]
                if entry.startswith("# branch.oid "):
                    oid = entry[len("# branch.oid "):]
                    sha = None if oid == "(initial)" else oid
                elif entry.startswith("# branch.head "):
                    head = entry[len("# branch.head "):]
                    branch = None if head == "(detached)" else head
                elif entry.startswith(("1 ", "u ")):
                    files.add(entry.split(" ", 8 if entry[0] == "1" else 10)[-1])
                elif entry.startswith("2 "):
                    files.add(entry.split(" ", 9)[-1])
                    files.add(entries[i + 1] if i + 1 < len(entries) else "")
                    i += 1  # the rename's original path follows
                elif entry.startswith("? "):
                    files.add(entry[2:])
                i += 1
            files.discard("")
            self._status = (branch, sha, sorted(files))
        return self._status

    def current_branch(self) -> str | None:
        return self._read_status()[0]

    def head_sha(self) -> str | None:
        return self._read_status()[1]

    def repo_slug(self) -> str | None:
        url = (self._run("config", "--get", "remote.origin.url") or "").strip()
        if not url:
            return None
        m = re.search(r"[:/]([^/:]+/[^/]+?)(?:\.git)?/?$", url)
        return m.group(1) if m else None

    def changed_files(self) -> list[str]:
        """Uncommitted changes (staged, unstaged, untracked); with none, the files of the last commit."""
        files = self._read_status()[2]
        if files:
            return files
        last = self._run("diff-tree", "-z", "--no-commit-id", "--name-only", "-r", "--root", "HEAD")
        return sorted(set(last.split("\0")) - {""}) if last else []
