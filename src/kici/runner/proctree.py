"""Finding and killing a process tree through /proc (Linux), shared by the runner and the agent.

A process is identified by its pid *and* its start time (field 22 of `/proc/<pid>/stat`), so a pid that
the kernel recycles for an unrelated process while we are working is never signalled. Zombies count as
gone: they cannot run, and reaping them is their parent's business.

`kill_tree` walks parent links, so it finds processes that left the root's process group or session
(`setsid`) as long as they are still below the root. A process that double-forks is re-parented to the
nearest child subreaper: run the root as a subreaper (the runner does) to keep such processes in the tree.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

_POLL = 0.02


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start: int
    """Start time in clock ticks after boot; with the pid it identifies the process."""

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcInfo | None:
    """The process's /proc stat, or None when it does not exist (any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    # `comm` is in parentheses and may itself contain spaces and parentheses: split at the last `)`.
    end = data.rfind(b")")
    if end < 0:
        return None
    fields = data[end + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            state=fields[0].decode("ascii", "replace"),
            start=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    info = read_stat(pid)
    return info.start if info else None


def snapshot() -> dict[int, ProcInfo]:
    """Every process currently visible in /proc."""
    procs: dict[int, ProcInfo] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if name.isdigit():
            info = read_stat(int(name))
            if info is not None:
                procs[info.pid] = info
    return procs


def _child_pids(pid: int) -> list[int] | None:
    """Pids of `pid`'s children from `/proc/<pid>/task/<tid>/children` (each thread's own); None when the
    kernel has no such files (CONFIG_PROC_CHILDREN), [] when the process is gone."""
    global _CHILDREN_FILES
    if _CHILDREN_FILES is None:
        _CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")
    if not _CHILDREN_FILES:
        return None
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return found


_CHILDREN_FILES: bool | None = None


def subtree(roots: Iterable[int]) -> dict[int, ProcInfo]:
    """The processes `roots` and everything below them, read by following each process's children
    rather than reading every process on the machine (a job's tree is a few processes, a busy host has
    hundreds). Falls back to `snapshot()` where the kernel does not list children."""
    procs: dict[int, ProcInfo] = {}
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in procs:
            continue
        info = read_stat(pid)
        if info is None:
            continue
        below = _child_pids(pid)
        if below is None:
            return snapshot()
        procs[pid] = info
        stack.extend(below)
    return procs


def _children_map(procs: dict[int, ProcInfo]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    return children


def _walk(roots: set[int], procs: dict[int, ProcInfo]) -> list[int]:
    children = _children_map(procs)
    seen: set[int] = set()
    order: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        for child in children.get(pid, ()):
            if child not in seen and child not in roots:
                seen.add(child)
                order.append(child)
                stack.append(child)
    return order


def descendants(pid: int, procs: dict[int, ProcInfo] | None = None) -> list[int]:
    """Pids of every process below `pid` (children, grandchildren, …), zombies included."""
    return _walk({pid}, procs if procs is not None else subtree([pid]))


def children(pid: int, procs: dict[int, ProcInfo] | None = None) -> list[ProcInfo]:
    """Direct children of `pid`."""
    if procs is None:
        pids = _child_pids(pid)
        if pids is not None:
            return [info for child in pids if (info := read_stat(child)) is not None and info.ppid == pid]
        procs = snapshot()
    return [info for info in procs.values() if info.ppid == pid]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Tree:
    """The processes of one tree, remembered by (pid, start time) across rescans."""

    def __init__(self, roots: Iterable[int], include_root: bool) -> None:
        self.me = os.getpid()
        self.my_pgid = os.getpgrp()
        self.known: dict[int, int] = {}
        self.groups: set[int] = set()
        self.roots: dict[int, int] = {}
        for root in roots:
            info = read_stat(root)
            if info is None:
                continue
            self.roots[root] = info.start
            if include_root and root != self.me:
                self.known[root] = info.start
                if info.pgid == root and root != self.my_pgid:
                    self.groups.add(root)

    def scan(self) -> dict[int, ProcInfo]:
        """Refresh: add every process now below a root or below any process already known."""
        procs = subtree([*self.known, *self.roots])
        roots = {
            p
            for p, start in (*self.known.items(), *self.roots.items())
            if (i := procs.get(p)) is not None and i.start == start
        }
        for pid in _walk(roots, procs):
            info = procs[pid]
            if pid == self.me or pid in self.known:
                continue
            self.known[pid] = info.start
            if info.pgid == pid and pid != self.my_pgid:
                self.groups.add(pid)  # a group led by a member of the tree (a command's own session)
        return procs

    def alive(self, procs: dict[int, ProcInfo]) -> list[int]:
        out = []
        for pid, start in self.known.items():
            info = procs.get(pid)
            if info is not None and info.start == start and info.alive:
                out.append(pid)
        return out

    def signal(self, sig: int, procs: dict[int, ProcInfo]) -> None:
        for pid in self.alive(procs):
            _signal(pid, sig)
        for pgid in self.groups:
            leader = procs.get(pgid)
            # Only signal a group whose leader is still the process we saw (or gone: the group may live on).
            if leader is not None and self.known.get(pgid) not in (None, leader.start):
                continue
            if pgid in (self.my_pgid, 0, 1):
                continue
            _signal_group(pgid, sig)


def kill_tree(pid: int, *, grace: float, include_root: bool = True) -> None:
    """Stop `pid` and everything below it; see `kill_trees`."""
    kill_trees([pid], grace=grace, include_root=include_root)


def kill_trees(pids: Iterable[int], *, grace: float, include_root: bool = True) -> None:
    """Stop each of `pids` and everything below them (and the process groups they lead).

    SIGTERM (plus SIGCONT, so stopped processes see it) to every process of the tree and its process
    group(s); wait up to `grace` seconds, rescanning so that processes forked meanwhile get SIGTERM too;
    then freeze what remains with SIGSTOP (so nothing can fork any more), rescan, and SIGKILL it all.
    Returns once every process of the tree is gone or a zombie (or after a few seconds of trying).
    With `include_root=False` the root itself is spared (the runner uses this on its own pid).
    Never signals the calling process or its process group.
    """
    tree = _Tree(pids, include_root)
    procs = tree.scan()
    if not tree.alive(procs):
        return
    if grace > 0:
        tree.signal(signal.SIGTERM, procs)
        tree.signal(signal.SIGCONT, procs)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(_POLL)
            before = set(tree.known)
            procs = tree.scan()
            if not tree.alive(procs):
                return
            if set(tree.known) - before:  # forked meanwhile: they get the same chance to exit cleanly
                tree.signal(signal.SIGTERM, procs)
                tree.signal(signal.SIGCONT, procs)
    deadline = time.monotonic() + 5.0
    while True:
        procs = tree.scan()
        if not tree.alive(procs):
            return
        tree.signal(signal.SIGSTOP, procs)
        procs = tree.scan()  # anything forked between the scan and the SIGSTOP
        tree.signal(signal.SIGSTOP, procs)
        tree.signal(signal.SIGKILL, procs)
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            procs = tree.scan()
            if not tree.alive(procs):
                return
            time.sleep(_POLL / 2)
        if time.monotonic() > deadline:
            return


def alive(pid: int, start: int | None = None) -> bool:
    """Whether the process exists and is not a zombie (and, given `start`, is still the same process)."""
    info = read_stat(pid)
    return info is not None and info.alive and (start is None or info.start == start)
