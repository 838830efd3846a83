"""Workflow concurrency groups for `kici run local`, across processes on one machine.

A group is a set of lock files (`max` slots) under a per-user runtime directory, keyed by the repository
and the group name. A run holds its slot from before its first job until it ends. With
`cancel_in_progress=True` a new run sends SIGTERM to the run holding the slot (which cancels its jobs the
way Ctrl-C does) and takes it over; otherwise it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kici.engine.events import Event
from kici.engine.inline_expr import InlineExprError, resolve_str
from kici.engine.lockfile import Workflow


@dataclass(frozen=True)
class GroupRequest:
    group: str
    cancel_in_progress: bool
    max: int
    workflows: tuple[str, ...]


def requested_groups(workflows: list[Workflow], event: Event) -> list[GroupRequest]:
    """The distinct groups the matched workflows ask for (one slot per group for the whole local run)."""
    found: dict[str, GroupRequest] = {}
    for wf in workflows:
        conc = wf.concurrency
        if conc is None or conc.group is None:
            continue
        try:
            group = resolve_str(conc.group, event)
        except InlineExprError as exc:
            raise ValueError(f"workflow {wf.name!r}: concurrency group: {exc}") from None
        if not group:
            continue
        prev = found.get(group)
        names = (*prev.workflows, wf.name) if prev else (wf.name,)
        found[group] = GroupRequest(group, bool(conc.cancel_in_progress), conc.max or 1, names)
    return list(found.values())


def lock_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(base) / f"kici-{os.getuid()}" / "concurrency"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


class GroupSlots:
    """Holds one slot of each requested group until `release()`."""

    def __init__(self, repo_root: Path, directory: Path | None = None) -> None:
        self.repo_key = hashlib.sha256(str(repo_root.resolve()).encode()).hexdigest()[:16]
        self.directory = directory or lock_dir()
        self.held: list[IO[str]] = []

    def _paths(self, request: GroupRequest) -> list[Path]:
        key = hashlib.sha256(request.group.encode()).hexdigest()[:16]
        return [self.directory / f"{self.repo_key}-{key}.{i}.lock" for i in range(max(1, request.max))]

    def try_acquire(self, request: GroupRequest) -> bool:
        """Take a free slot of the group if there is one."""
        for path in self._paths(request):
            handle = open(path, "a+")  # noqa: SIM115 - kept open while the slot is held
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            self.held.append(handle)
            return True
        return False

    def _contend(self, request: GroupRequest, notify: Callable[[str], None], state: dict[str, Any]) -> None:
        """While waiting: say so once, or (cancel_in_progress) SIGTERM each holder once."""
        holders = [pid for pid in (_holder(p) for p in self._paths(request)) if pid is not None]
        if request.cancel_in_progress:
            signalled: set[int] = state.setdefault("signalled", set())
            for pid in holders:
                if pid not in signalled:
                    notify(f"concurrency group {request.group!r}: cancelling the run in progress (pid {pid})")
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
                    signalled.add(pid)
        elif not state.get("announced"):
            who = ", ".join(str(p) for p in holders) or "another run"
            notify(f"concurrency group {request.group!r}: waiting for the run in progress (pid {who})")
            state["announced"] = True

    def acquire(self, request: GroupRequest, notify: Callable[[str], None],
                should_stop: Callable[[], bool] = lambda: False, poll: float = 0.1) -> bool:
        """Take a slot (waiting or cancelling the holder); False if `should_stop()` became true first."""
        state: dict[str, Any] = {}
        while not self.try_acquire(request):
            if should_stop():
                return False
            self._contend(request, notify, state)
            time.sleep(poll)
        return True

    async def acquire_async(self, request: GroupRequest, notify: Callable[[str], None], poll: float = 0.1) -> None:
        """`acquire` for an event loop: cancelling the task stops the wait."""
        state: dict[str, Any] = {}
        while not self.try_acquire(request):
            self._contend(request, notify, state)
            await asyncio.sleep(poll)

    def release(self) -> None:
        for handle in self.held:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self.held.clear()


def _holder(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
