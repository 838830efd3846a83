"""The runner as child subreaper: orphaned descendants are re-parented to it instead of to init.

That keeps processes which detach (`setsid`, double fork, `nohup … &`) inside the runner's tree, where
cancel, timeouts and the end-of-job sweep find them. The runner must then reap the orphans it adopts.

Reaping is done only at safe points (between steps and at the end of the job), and only for zombies that
are not the runner's own commands: a blanket `waitpid(-1)` would steal the exit status of a subprocess a
step is waiting on (Python then reports exit code 0 for it). Between steps the runner reaps zombies that
are outside its own process group (adopted orphans come from commands started in their own session) and
that it is not tracking; at the end of the job, once everything is killed, it reaps all of them.
"""

from __future__ import annotations

import os
import sys
import threading

from kici.runner import proctree

PR_SET_CHILD_SUBREAPER = 36

lock = threading.Lock()
"""Held while spawning a tracked command and while reaping, so a reap never races a registration."""
owned: set[int] = set()
"""Pids of the runner's own commands (waited for by their caller): never reaped here."""


def become_subreaper() -> bool:
    """prctl(PR_SET_CHILD_SUBREAPER, 1); False where unsupported (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans() -> int:
    """Reap zombie children that are adopted orphans (see module docstring); returns how many."""
    me = os.getpid()
    my_pgid = os.getpgrp()
    count = 0
    with lock:
        for info in proctree.children(me):
            if info.state != "Z" or info.pid in owned or info.pgid == my_pgid:
                continue
            count += _reap(info.pid)
    return count


def reap_all() -> int:
    """Reap every zombie child (end of job: nothing is waiting any more)."""
    count = 0
    with lock:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            count += 1
    return count


def _reap(pid: int) -> int:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0
    return 1 if done else 0
