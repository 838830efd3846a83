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
import queue
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydantic import BaseModel

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_READ_LINES = 5000
TAIL_PROBE_BYTES = 64 * 1024
TAIL_READ_BYTES = 512 * 1024


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

    async def flush(self) -> None:
        """Return once every chunk appended before the call is durable (survives this process being
        killed); `OSError` when it could not be written."""
        ...


@dataclass
class _JobLog:
    path: Path
    last_seq: int = -1
    lines: int = 0


def _check_id(kind: str, value: str) -> str:
    # ids become path components: refuse anything that could climb out of the log root
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"not a usable {kind} id: {value[:80]!r}")
    return value


class _Writer:
    """The thread that owns the log files: creating a file costs ~0.7 ms of kernel time on a journaling
    file system and every job has one, so appends are handed over through a queue and the event loop
    never waits on the disk. It keeps the most recently written files open and flushes them whenever its
    queue runs dry; `barrier()` returns once everything queued before it is written and flushed."""

    def __init__(self, open_files: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Path, bytes] | tuple[Path, threading.Event] | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._handles: OrderedDict[Path, BinaryIO] = OrderedDict()
        self._dirty: set[Path] = set()
        self._open_files = open_files
        self._thread = threading.Thread(target=self._run, name="kici-log-writer", daemon=True)
        self._thread.start()
        self.error: str | None = None
        """The last write error (a full disk, say), for the next caller to report."""

    def put(self, path: Path, data: bytes) -> None:
        self._queue.put((path, data))

    def barrier(self, timeout: float = 30.0) -> bool:
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Stop the thread after writing everything queued (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    def forget(self, directory: Path) -> bool:
        """Write what is queued, then close the files under `directory` (done by the writer thread, which
        alone touches the handles)."""
        done = threading.Event()
        self._queue.put((directory, done))
        return done.wait(30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._flush()
                for handle in self._handles.values():
                    handle.close()
                self._handles.clear()
                return
            if isinstance(item, threading.Event):
                self._flush()
                item.set()
                continue
            path, payload = item
            if isinstance(payload, threading.Event):
                self._flush()
                for open_path in [p for p in self._handles if p.parent == path]:
                    self._handles.pop(open_path).close()
                payload.set()
                continue
            try:
                self._handle(path).write(payload)
                self._dirty.add(path)
            except OSError as exc:
                self.error = f"{type(exc).__name__}: {exc}"
            if self._queue.empty():
                self._flush()

    def _handle(self, path: Path) -> BinaryIO:
        handle = self._handles.get(path)
        if handle is not None:
            self._handles.move_to_end(path)
            return handle
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "ab")  # noqa: SIM115 - kept open across appends
        self._handles[path] = handle
        while len(self._handles) > self._open_files:
            old_path, old = self._handles.popitem(last=False)
            old.close()
            self._dirty.discard(old_path)
        return handle

    def _flush(self) -> None:
        for path in list(self._dirty):
            handle = self._handles.get(path)
            if handle is not None:
                try:
                    handle.flush()
                except OSError as exc:
                    self.error = f"{type(exc).__name__}: {exc}"
        self._dirty.clear()


class FilesystemLogStorage:
    """Logs under `root` (the orchestrator's `<data dir>/logs`). Sequence numbers and line counts are kept
    here, on the event loop; the file I/O is the writer thread's (`_Writer`)."""

    def __init__(self, root: Path, *, open_files: int = 256, known_jobs: int = 4096) -> None:
        self.root = root
        self._jobs: OrderedDict[str, _JobLog] = OrderedDict()
        self._known_jobs = known_jobs
        self._writer = _Writer(open_files)
        self._lock = asyncio.Lock()

    def _path(self, run_id: str, job_id: str) -> Path:
        return self.root / _check_id("run", run_id) / f"{_check_id('job', job_id)}.ndjson"

    async def _state(self, run_id: str, job_id: str) -> _JobLog:
        state = self._jobs.get(job_id)
        if state is not None:
            self._jobs.move_to_end(job_id)
            return state
        path = self._path(run_id, job_id)
        state = _JobLog(path)
        if path.exists():  # a job seen before a restart (or forgotten): continue its numbering
            await asyncio.to_thread(self._writer.barrier)
            last = _last_record(path)
            if last is not None:
                state.last_seq = int(last.get("seq", -1))
                state.lines = int(last.get("n", 1)) - 1 + len(last.get("lines", []))
        self._jobs[job_id] = state
        while len(self._jobs) > self._known_jobs:
            self._jobs.popitem(last=False)
        return state

    async def append(self, run_id: str, job_id: str, step_index: int, lines: Sequence[str], seq: int | None) -> bool:
        if not lines:
            return True
        async with self._lock:
            state = await self._state(run_id, job_id)
            if seq is not None:
                if seq <= state.last_seq:
                    return False
                state.last_seq = seq
            else:
                state.last_seq += 1
            record = {"seq": state.last_seq, "step": step_index, "n": state.lines + 1, "lines": list(lines)}
            data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            self._writer.put(state.path, data)
            state.lines += len(lines)
            if self._writer.error is not None:
                error, self._writer.error = self._writer.error, None
                raise OSError(f"writing job logs under {self.root} failed: {error}")
            return True

    async def read(self, run_id: str, job_id: str, *, after: int = 0, limit: int = 1000) -> LogPage:
        limit = max(1, min(limit, MAX_READ_LINES))
        path = self._path(run_id, job_id)
        await asyncio.to_thread(self._writer.barrier)  # what was appended before this read is on disk
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
        except (FileNotFoundError, NotADirectoryError):  # nothing written (yet)
            return LogPage(lines=[], next=cursor, at_end=True)
        return LogPage(lines=out, next=cursor, at_end=at_end)

    async def tail(self, run_id: str, job_id: str, *, lines: int = 50) -> list[LogLineOut]:
        """The job's last `lines` lines (as stored: masked by the agent). Reads only the end of the file:
        a read from an offset inside a record skips that torn record, as after a crash."""
        path = self._path(run_id, job_id)
        await asyncio.to_thread(self._writer.barrier)
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return []
        last: deque[LogLineOut] = deque(maxlen=max(1, lines))
        cursor = max(0, size - TAIL_READ_BYTES)
        while True:
            page = await self.read(run_id, job_id, after=cursor, limit=MAX_READ_LINES)
            last.extend(page.lines)
            if page.at_end or page.next == cursor:
                return list(last)
            cursor = page.next

    async def delete_run(self, run_id: str) -> None:
        async with self._lock:
            directory = self.root / _check_id("run", run_id)
            for job_id, state in list(self._jobs.items()):
                if state.path.parent == directory:
                    del self._jobs[job_id]
            await asyncio.to_thread(self._writer.forget, directory)
            if directory.is_dir():
                for child in directory.iterdir():
                    child.unlink(missing_ok=True)
                directory.rmdir()

    async def flush(self) -> None:
        if not await asyncio.to_thread(self._writer.barrier):
            raise OSError(f"writing job logs under {self.root} did not finish in time")
        if self._writer.error is not None:
            error, self._writer.error = self._writer.error, None
            raise OSError(f"writing job logs under {self.root} failed: {error}")

    def close(self) -> None:
        self._writer.close()

    # -- random access for the dashboard (a 200,000-line log is shown a page at a time) ---------------

    async def line_count(self, run_id: str, job_id: str) -> int:
        """Lines stored so far (0 when none)."""
        path = self._path(run_id, job_id)
        await asyncio.to_thread(self._writer.barrier)
        last = await asyncio.to_thread(_last_record, path)
        return 0 if last is None else int(last.get("n", 1)) - 1 + len(last.get("lines", []))

    async def seek_line(self, run_id: str, job_id: str, n: int) -> int:
        """A cursor (for `read`'s `after`) at the chunk holding line `n`, found by bisecting the file on
        byte offsets (records are in line order), so the cost does not grow with the log's length."""
        path = self._path(run_id, job_id)
        await asyncio.to_thread(self._writer.barrier)
        return await asyncio.to_thread(_seek_line, path, n)

    async def search(self, run_id: str, job_id: str, needle: str, *, limit: int = 200) -> tuple[list[LogLineOut], bool]:
        """Lines containing `needle` (case-insensitive), first `limit`; and whether there were more."""
        path = self._path(run_id, job_id)
        await asyncio.to_thread(self._writer.barrier)
        return await asyncio.to_thread(_search, path, needle.casefold(), limit)


def _record_at(handle: BinaryIO, offset: int) -> tuple[int, dict[str, Any]] | None:
    """The first complete record starting at or after byte `offset`: (its offset, the record)."""
    handle.seek(offset)
    if offset > 0:
        handle.readline()  # the rest of the record `offset` fell into
    while True:
        start = handle.tell()
        raw = handle.readline()
        if not raw.endswith(b"\n"):
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            return start, record


def _seek_line(path: Path, n: int) -> int:
    try:
        size = path.stat().st_size
    except (FileNotFoundError, NotADirectoryError):
        return 0
    with open(path, "rb") as handle:
        low, high = 0, size  # invariant: the chunk holding line n starts at or after `low`'s record
        best = 0
        while low < high:
            mid = (low + high) // 2
            found = _record_at(handle, mid)
            if found is None:
                high = mid
                continue
            start, record = found
            if int(record["n"]) <= n:
                best = start
                low = start + 1
            else:
                high = mid
        return best


def _search(path: Path, needle: str, limit: int) -> tuple[list[LogLineOut], bool]:
    out: list[LogLineOut] = []
    # A cheap byte prefilter on each record, where the needle appears in the JSON as it is (plain ASCII
    # with nothing JSON escapes); other records are decoded and case-folded line by line.
    plain = needle.isascii() and '"' not in needle and "\\" not in needle and all(c >= " " for c in needle)
    needle_bytes = needle.encode("ascii") if plain else None
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                if needle_bytes is not None and raw.isascii() and needle_bytes not in raw.lower():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                first, step = int(record["n"]), int(record["step"])
                for i, text in enumerate(record["lines"]):
                    if needle in str(text).casefold():
                        if len(out) >= limit:
                            return out, True
                        out.append(LogLineOut(n=first + i, step=step, line=str(text)))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return out, False


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
