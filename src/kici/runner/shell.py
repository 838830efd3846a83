"""Running one command for `ctx.sh`: spawn, stream its output line by line, capture it, time it out.

Each command runs in its own session (so its process group can be signalled as a whole) with stdin from
/dev/null. Its stdout and stderr are read in the calling thread; once the command has exited, whatever
is already in the pipes is read, and if a background process it started still holds the pipes open, a
daemon thread keeps streaming that process's output to the same step until it closes them (the end of
job sweep kills such processes). The result holds what was read up to the command's exit.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from kici.runner import proctree, reaper
from kici.runner.stdio import LineSplitter

CAPTURE_LIMIT = 32 * 1024 * 1024
"""Bytes of stdout (and of stderr) kept for the `ShellResult`; the log still gets everything."""

Emit = Callable[[str, list[str]], None]  # (stream, lines)

_drains: set[threading.Thread] = set()
_drains_lock = threading.Lock()


class Aborted(Exception):
    """The command was killed because its step is being cancelled or timed out."""


@dataclass
class Completed:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False


class Tracker(Protocol):
    """Where a command registers while it runs, so cancel/timeout can kill it (`calls.Call` is one)."""

    def register(self, proc: subprocess.Popen[bytes]) -> bool:
        """False when the step is already being stopped: the command must not start."""
        ...

    def unregister(self, proc: subprocess.Popen[bytes]) -> None: ...

    @property
    def aborted(self) -> bool: ...


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str,
    emit: Emit | None,
    tracker: Tracker | None,
    timeout: float | None,
    kill_grace: float,
) -> Completed:
    with reaper.lock:
        if tracker is not None and tracker.aborted:
            raise Aborted()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            return Completed("", f"{argv[0]}: {exc.strerror or exc}", 127)
        reaper.owned.add(proc.pid)
        if tracker is not None and not tracker.register(proc):
            _kill_group(proc.pid)
    try:
        return _communicate(proc, emit, timeout, kill_grace)
    finally:
        try:
            proc.wait()
        finally:
            with reaper.lock:
                reaper.owned.discard(proc.pid)
            if tracker is not None:
                tracker.unregister(proc)


def _communicate(
    proc: subprocess.Popen[bytes], emit: Emit | None, timeout: float | None, kill_grace: float
) -> Completed:
    assert proc.stdout is not None and proc.stderr is not None
    captured: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    sizes = {"stdout": 0, "stderr": 0}

    def on_lines(stream: str) -> Callable[[list[str]], None]:
        return (lambda lines: emit(stream, lines)) if emit is not None else (lambda lines: None)

    splitters = {"stdout": LineSplitter(on_lines("stdout")), "stderr": LineSplitter(on_lines("stderr"))}
    sel = selectors.DefaultSelector()
    streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout if timeout is not None else None
    timed_out = False
    exited = False

    def take(fd: int) -> bool:
        """Read what is available; False at EOF."""
        stream = streams[fd]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                splitters[stream].flush()
                sel.unregister(fd)
                return False
            splitters[stream].feed(data)
            if sizes[stream] < CAPTURE_LIMIT:
                captured[stream].append(data)
                sizes[stream] += len(data)
            if len(data) < 65536:
                return True

    open_fds = set(streams)
    try:
        while True:  # until the command exits (it may close its stdout/stderr long before)
            wait: float | None = None
            if deadline is not None and not timed_out:
                wait = max(0.0, deadline - time.monotonic())
            if pidfd is None and not exited:
                wait = 0.05 if wait is None else min(wait, 0.05)
            for key, _ in sel.select(wait):
                fd = int(key.fd)
                if fd == pidfd:
                    sel.unregister(pidfd)
                    exited = True
                elif fd in open_fds and not take(fd):
                    open_fds.discard(fd)
            if not exited and proc.poll() is not None:
                exited = True
            if exited:
                for fd in list(open_fds):  # what the command wrote before exiting is in the pipes now
                    if not take(fd):
                        open_fds.discard(fd)
                break
            if deadline is not None and not timed_out and time.monotonic() >= deadline:
                timed_out = True
                threading.Thread(
                    target=proctree.kill_tree, args=(proc.pid,), kwargs={"grace": kill_grace}, daemon=True
                ).start()
        files = {proc.stdout.fileno(): proc.stdout, proc.stderr.fileno(): proc.stderr}
        for fd in set(streams) - open_fds:
            files[fd].close()
        if open_fds:
            # Background processes still hold the pipes: keep streaming their output, do not wait.
            for fd in open_fds:
                sel.unregister(fd)
            handed = {fd: (streams[fd], files[fd]) for fd in open_fds}
            thread = threading.Thread(target=_drain, args=(handed, splitters), name="kici-drain", daemon=True)
            with _drains_lock:
                _drains.add(thread)
            thread.start()
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    code = proc.wait()
    return Completed(
        b"".join(captured["stdout"]).decode("utf-8", "replace"),
        b"".join(captured["stderr"]).decode("utf-8", "replace"),
        code,
        timed_out,
    )


def _drain(handed: dict[int, tuple[str, IO[bytes]]], splitters: dict[str, LineSplitter]) -> None:
    sel = selectors.DefaultSelector()
    for fd in handed:
        sel.register(fd, selectors.EVENT_READ)
    remaining = set(handed)
    try:
        while remaining:
            for key, _ in sel.select():
                fd = int(key.fd)
                stream = handed[fd][0]
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    splitters[stream].feed(data)
                else:
                    splitters[stream].flush()
                    sel.unregister(fd)
                    remaining.discard(fd)
    finally:
        sel.close()
        for _, f in handed.values():
            f.close()
        with _drains_lock:
            _drains.discard(threading.current_thread())


def join_drains(timeout: float) -> None:
    """Wait (up to `timeout` seconds) for background output of finished commands to be streamed."""
    deadline = time.monotonic() + timeout
    with _drains_lock:
        threads = list(_drains)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _pidfd(pid: int) -> int | None:
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:
        return None
