"""Job logs: appended chunk by chunk as agents stream them, read back page by page (and followed).

Interface: `LogStorage` (append, read, delete_run). `FilesystemLogStorage` keeps one file per job at
`<root>/<run id>/<job id>.ndjson`, one JSON object per received chunk:
`{"seq": 3, "step": 0, "n": 101, "lines": [...]}` where `n` is the number of the chunk's first line (1-based).
A read cursor is a byte offset at a chunk boundary, so following a live log costs one `seek` per poll,
whatever the log's size.

Chunks carry the agent's per-job `seq`: a chunk replayed after a reconnect (seq not above the last one
stored) is dropped, so it is stored once. The storage remembers the last seq and line count of each job it
wrote recently, and recovers them from the file's last record after a restart.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydantic import BaseModel

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_READ_LINES = 5000
TAIL_PROBE_BYTES = 64 * 1024
FLUSH_INTERVAL_S = 0.1
"""Appends are buffered and flushed at most this often (and before every read of the job's log)."""


class LogLineOut(BaseModel):
    n: int
    """1-based line number within the job's log."""
    step: int
    """Step index; -1 for job setup output (clone, drift check) outside any step."""
    line: str


class LogPage(BaseModel):
    lines: list[LogLineOut]
    next: int
    """Cursor for the next read (pass it as `after`)."""
    at_end: bool
    """No more stored lines after `next` right now."""


class LogStorage(Protocol):
    async def append(self, run_id: str, job_id: str, step_index: int, lines: Sequence[str], seq: int | None) -> bool:
        """Store one chunk; False when `seq` was already stored (a replay)."""
        ...

    async def read(self, run_id: str, job_id: str, *, after: int = 0, limit: int = 1000) -> LogPage:
        """Lines after cursor `after` (0 = the beginning), at most about `limit` (whole chunks)."""
        ...

    async def delete_run(self, run_id: str) -> None:
        ...


@dataclass
class _JobLog:
    path: Path
    last_seq: int = -1
    lines: int = 0
    handle: BinaryIO | None = field(default=None, repr=False)
    flushed: float = 0.0


def _check_id(kind: str, value: str) -> str:
    # ids become path components: refuse anything that could climb out of the log root
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"not a usable {kind} id: {value[:80]!r}")
    return value


class FilesystemLogStorage:
    """Logs under `root` (the orchestrator's `<data dir>/logs`). Writes are small appends done inline; the
    open files of the most recently written jobs are kept open."""

    def __init__(self, root: Path, *, open_files: int = 256) -> None:
        self.root = root
        self._jobs: OrderedDict[str, _JobLog] = OrderedDict()
        self._open_files = open_files
        self._lock = asyncio.Lock()

    def _path(self, run_id: str, job_id: str) -> Path:
        return self.root / _check_id("run", run_id) / f"{_check_id('job', job_id)}.ndjson"

    def _state(self, run_id: str, job_id: str) -> _JobLog:
        state = self._jobs.get(job_id)
        if state is not None:
            self._jobs.move_to_end(job_id)
            return state
        path = self._path(run_id, job_id)
        state = _JobLog(path)
        last = _last_record(path)
        if last is not None:
            state.last_seq = int(last.get("seq", -1))
            state.lines = int(last.get("n", 1)) - 1 + len(last.get("lines", []))
        self._jobs[job_id] = state
        while len(self._jobs) > self._open_files:
            _, old = self._jobs.popitem(last=False)
            _close(old)
        return state

    async def append(self, run_id: str, job_id: str, step_index: int, lines: Sequence[str], seq: int | None) -> bool:
        if not lines:
            return True
        async with self._lock:
            state = self._state(run_id, job_id)
            if seq is not None:
                if seq <= state.last_seq:
                    return False
                state.last_seq = seq
            else:
                state.last_seq += 1
            record = {"seq": state.last_seq, "step": step_index, "n": state.lines + 1, "lines": list(lines)}
            data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            if state.handle is None:
                state.path.parent.mkdir(parents=True, exist_ok=True)
                state.handle = open(state.path, "ab")  # noqa: SIM115 - kept open across appends
            state.handle.write(data)
            now = time.monotonic()
            if now - state.flushed >= FLUSH_INTERVAL_S:  # a write syscall per chunk costs more than the rest
                state.handle.flush()
                state.flushed = now
            state.lines += len(lines)
            return True

    async def read(self, run_id: str, job_id: str, *, after: int = 0, limit: int = 1000) -> LogPage:
        limit = max(1, min(limit, MAX_READ_LINES))
        path = self._path(run_id, job_id)
        state = self._jobs.get(job_id)
        if state is not None and state.handle is not None:
            state.handle.flush()  # what this process appended is readable at once
        out: list[LogLineOut] = []
        cursor = max(0, after)
        try:
            with open(path, "rb") as handle:
                handle.seek(cursor)
                while len(out) < limit:
                    raw = handle.readline()
                    if not raw.endswith(b"\n"):
                        break  # end of file, or a chunk still being written: read it next time
                    cursor += len(raw)
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        continue  # a record torn by a crash mid-write: skip it rather than fail the reader
                    first = int(record["n"])
                    step = int(record["step"])
                    out.extend(
                        LogLineOut(n=first + i, step=step, line=str(text)) for i, text in enumerate(record["lines"])
                    )
                at_end = handle.read(1) == b""
        except FileNotFoundError:
            return LogPage(lines=[], next=cursor, at_end=True)
        return LogPage(lines=out, next=cursor, at_end=at_end)

    async def delete_run(self, run_id: str) -> None:
        async with self._lock:
            for job_id, state in list(self._jobs.items()):
                if state.path.parent.name == run_id:
                    _close(state)
                    del self._jobs[job_id]
            directory = self.root / _check_id("run", run_id)
            if directory.is_dir():
                for child in directory.iterdir():
                    child.unlink(missing_ok=True)
                directory.rmdir()

    def close(self) -> None:
        for state in self._jobs.values():
            _close(state)
        self._jobs.clear()


def _close(state: _JobLog) -> None:
    if state.handle is not None:
        state.handle.close()
        state.handle = None


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of a log file (None when there is none)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    with open(path, "rb") as handle:
        probe = TAIL_PROBE_BYTES
        while True:
            start = max(0, size - probe)
            handle.seek(start)
            tail = handle.read()
            complete = tail[: tail.rfind(b"\n") + 1] if b"\n" in tail else b""
            records = complete.splitlines()
            if len(records) >= 2 or start == 0:
                break
            probe *= 4  # one huge chunk: widen the window
        if not records:
            return None
        last = json.loads(records[-1])
        return last if isinstance(last, dict) else None


def default_log_root(data_dir: Path) -> Path:
    return data_dir / "logs"


__all__ = ["FilesystemLogStorage", "LogLineOut", "LogPage", "LogStorage", "default_log_root"]
