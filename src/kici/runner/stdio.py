"""Line splitting, and the capture of the runner's own fds 1 and 2 into `LogLine`s.

Anything the runner process writes to stdout/stderr — `print()` in a step, a C library writing to fd 1,
a subprocess a step starts without capturing its output — goes through pipes read by two threads and
becomes log lines of the *current* step (`SETUP_STEP_INDEX` outside steps). At each step boundary the
runner calls `sync()`: it flushes Python's buffers and pushes a marker through both pipes, waiting until
the readers have seen it, so everything written before the boundary is attributed to the step that wrote
it. (A background process that keeps writing after its step ended shows up in whichever step is current.)
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

MAX_LINE = 64 * 1024
"""Longer lines are cut into pieces of this many bytes (masking works per piece)."""

_SYNC = b"\x00\x00kici-runner-sync\x00\x00\n"

EmitLines = Callable[[list[str]], None]


class LineSplitter:
    """Feeds bytes, calls `emit` with the complete lines of each chunk (decoded, without line endings)."""

    __slots__ = ("_buf", "_emit")

    def __init__(self, emit: EmitLines) -> None:
        self._buf = b""
        self._emit = emit

    def feed(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if b"\n" not in buf:
            self._buf = buf
        else:
            *complete, self._buf = buf.split(b"\n")
            self._emit([_decode(raw) for raw in complete])
        if len(self._buf) >= MAX_LINE:
            rest = self._buf
            pieces = [rest[i : i + MAX_LINE] for i in range(0, len(rest) - len(rest) % MAX_LINE, MAX_LINE)]
            self._buf = rest[len(pieces) * MAX_LINE :]
            self._emit([_decode(p) for p in pieces])

    def flush(self) -> None:
        if self._buf:
            self._emit([_decode(self._buf)])
            self._buf = b""


def _decode(raw: bytes) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw.decode("utf-8", "replace")


class StdioCapture:
    """Redirects fds 1 and 2 into pipes whose lines go to `emit(step_index, stream, line)`."""

    def __init__(self, emit: Callable[[int, str, list[str]], None], step_index: int) -> None:
        self._emit = emit
        self.step_index = step_index
        self._cond = threading.Condition()
        self._seen = {"stdout": 0, "stderr": 0}
        self._sent = 0
        self._sync_lock = threading.Lock()
        self._write_fds: dict[str, int] = {}
        for old in (sys.stdout, sys.stderr):
            try:
                if old is not None:
                    old.flush()
            except (OSError, ValueError):
                pass
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            self._write_fds[stream] = fd
            threading.Thread(target=self._read, args=(r, stream), name=f"kici-{stream}", daemon=True).start()
        # Fresh, line-buffered text streams over the new fds 1 and 2, so `print` in a step shows up at once.
        # (The old objects may have been opened over a seekable file, which a pipe is not.)
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)  # noqa: SIM115

    def _read(self, fd: int, stream: str) -> None:
        splitter = LineSplitter(lambda lines: self._emit(self.step_index, stream, lines))
        pending = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            except OSError:
                return
            if not data:
                splitter.flush()
                return
            data = pending + data
            pending = b""
            while True:
                at = data.find(_SYNC)
                if at < 0:
                    break
                splitter.feed(data[:at])
                splitter.flush()
                data = data[at + len(_SYNC) :]
                with self._cond:
                    self._seen[stream] += 1
                    self._cond.notify_all()
            # keep a possible partial marker for the next read
            keep = _partial_suffix(data, _SYNC)
            if keep:
                pending = data[-keep:]
                data = data[:-keep]
            splitter.feed(data)

    def sync(self, timeout: float = 2.0) -> bool:
        """Make sure everything written so far has been emitted."""
        with self._sync_lock:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            self._sent += 1
            target = self._sent
            for fd in self._write_fds.values():
                try:
                    os.write(fd, _SYNC)
                except OSError:
                    return False
            with self._cond:
                return self._cond.wait_for(
                    lambda: all(count >= target for count in self._seen.values()), timeout=timeout
                )

    def switch(self, step_index: int) -> None:
        """Sync, then attribute further output to `step_index`."""
        if step_index != self.step_index:
            self.sync()
            self.step_index = step_index


def _partial_suffix(data: bytes, marker: bytes) -> int:
    """Length of the longest suffix of `data` that is a proper prefix of `marker`."""
    if not data or data[-1:] not in marker:
        return 0
    for n in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:n]):
            return n
    return 0
