"""Job logs any orchestrator can serve: chunks in the database while a job runs, sealed into segment blobs.

Write path (the orchestrator the job's agent is connected to):
1. `append` takes a chunk as the agent sent it (its per-job `seq`, its step, its lines), numbers its lines
   and buffers it in memory; a chunk whose seq is already stored (a replay after a reconnect) is dropped.
2. Buffered chunks are written to the `log_chunks` table in batches: every `WRITE_INTERVAL_S`, and by
   `flush()`, which the agent session awaits before answering `delivery.sync`. The agent forgets a chunk
   only after that answer, so a chunk an orchestrator acknowledged is in the database, and one it had not
   yet written when it died is sent again by the agent (to whichever orchestrator it reconnects to).
3. A job's chunks are sealed into a segment — one blob of NDJSON records
   `{"seq": 3, "step": 0, "n": 101, "lines": [...]}` under `logs/<run id>/<job id>/<first seq>-<last seq>.ndjson`,
   plus a `log_segments` row, the row written and the chunks deleted in one transaction — when they reach
   `KICI_LOG_SEGMENT_BYTES`, when the job ends, and (by a sweep on every orchestrator, so a node that died
   leaves nothing behind) when they are older than `KICI_LOG_SEGMENT_MAX_AGE`. Sealing is idempotent and
   two sealers cannot both win: a segment is recorded only if the job's segments did not change since its
   chunks were read, and the primary key (job, first seq) settles a race past that check.

Read path (any orchestrator): a job's log is its segments plus its chunks, in line order, read in one
statement (one snapshot). A cursor is an opaque integer: pass back the `next` of the previous page
(0 = the beginning). Segments are immutable, so parsed ones are cached.

Following: `wait_for_data(job_id, timeout)` returns when new chunks of the job were stored, or after
`timeout` (then the follower reads again: its poll). Chunks this orchestrator writes wake followers here
at once; chunks another node writes wake them through the cluster bus (`on_written` → `job-log`, see
`kici.orchestrator.storage.log_wakeups`; the receiving node calls `notify_appended`), the poll covering a
lost message. A follower takes `watch(job_id)` before reading, and passes it to `wait_for_data`, so lines
stored between its read and its wait wake it too.

Logs written before this storage existed (one file per job under `<data dir>/logs/<run>/<job>.ndjson`, the
same records) are imported as segments: all of them in the background at start-up, and a job's file at
once when its log is read before that.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import io
import json
import re
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from kici.engine import aio
from kici.orchestrator.db.database import Database, describe_error
from kici.orchestrator.db.schema import utcnow
from kici.orchestrator.logs import log_event
from kici.orchestrator.storage.blobs import BlobNotFound, BlobStore, read_all
from kici.orchestrator.store import logs as store

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_READ_LINES = 5000
MAX_READ_PIECES = 500
WRITE_INTERVAL_S = 0.05
"""How long appended chunks wait to be written with others (one transaction per batch)."""
POLL_INTERVAL_S = 1.0
"""`wait_for_data`'s default timeout: how long a follower waits before reading again anyway (the fallback
for a wake-up that did not come; `KICI_LOG_FOLLOW_POLL_MS` where the settings are at hand)."""
MAX_PENDING_ROWS = 5000
"""Chunks buffered unwritten before `append` waits for the write (back-pressure on a fast agent)."""
SEGMENT_CACHE = 16
DEFAULT_SEGMENT_BYTES = 1024 * 1024
DEFAULT_SEGMENT_MAX_AGE_S = 300.0


class LogLineOut(BaseModel):
    n: int
    """1-based line number within the job's log."""
    step: int
    """Step index; -1 for job setup output (clone, drift check) outside any step."""
    line: str


class LogPage(BaseModel):
    lines: list[LogLineOut]
    next: int
    """Opaque cursor for the next read (pass it as `after`)."""
    at_end: bool
    """No more stored lines after `next` right now."""


@dataclass
class _JobState:
    run_id: str
    last_seq: int
    lines: int
    unsealed_bytes: int = 0


@dataclass(frozen=True)
class _Segment:
    """A parsed segment: its records' first line numbers (for bisecting) and the records."""

    starts: list[int]
    records: list[tuple[int, int, list[str]]]
    """(first line number, step, lines)."""


def _check_id(kind: str, value: str) -> str:
    # ids become blob key segments and legacy file names: refuse anything else
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"not a usable {kind} id: {value[:80]!r}")
    return value


def segment_key(run_id: str, job_id: str, first_seq: int, last_seq: int) -> str:
    return f"logs/{run_id}/{job_id}/{first_seq:010d}-{last_seq:010d}.ndjson"


def _record(seq: int, step: int, first_line: int, lines_json: str) -> str:
    return f'{{"seq":{seq},"step":{step},"n":{first_line},"lines":{lines_json}}}\n'


class LogStore:
    """Job logs on the database and the blob store. `start()` runs its background writer and sealer;
    `close()` writes what is buffered and stops them."""

    def __init__(
        self,
        database: Database,
        blobs: BlobStore,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        segment_max_age_s: float = DEFAULT_SEGMENT_MAX_AGE_S,
        legacy_root: Path | None = None,
        known_jobs: int = 4096,
    ) -> None:
        self.db = database
        self.blobs = blobs
        self.segment_bytes = segment_bytes
        self.segment_max_age_s = segment_max_age_s
        self.legacy_root = legacy_root
        self._known_jobs = known_jobs
        self._jobs: OrderedDict[str, _JobState] = OrderedDict()
        self._pending: list[dict[str, Any]] = []
        self._write_lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._seal_wanted: dict[str, str] = {}
        """job id → run id: jobs to seal once their chunks are written."""
        self._seal_kick = asyncio.Event()
        self._waiters: dict[str, asyncio.Event] = {}
        self.waiting = 0
        """Followers waiting in `wait_for_data` now (the `kici_log_followers_waiting` gauge)."""
        self.on_written: Callable[[Sequence[str]], None] | None = None
        """Told the jobs whose chunks each write committed, and each job that ended (the cluster's log
        wake-ups)."""
        self._segments: OrderedDict[str, _Segment] = OrderedDict()
        self._tasks: list[asyncio.Task[None]] = []
        self._import_lock = asyncio.Lock()
        self.error: str | None = None
        """The last background write error, reported to the next `append`."""

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._writer(), name="kici-log-writer"),
            asyncio.create_task(self._sealer(), name="kici-log-sealer"),
            asyncio.create_task(self._sweeper(), name="kici-log-sweeper"),
        ]
        if self.legacy_root is not None:
            self._tasks.append(asyncio.create_task(self._import_all_legacy(), name="kici-log-import"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        try:
            await self.flush()
        except OSError as exc:
            log_event("logs.final_write_failed", level="error", error=str(exc))

    # -- writing ------------------------------------------------------------------------------------

    async def append(self, run_id: str, job_id: str, step_index: int, lines: Sequence[str], seq: int | None) -> bool:
        """Buffer one chunk; False when `seq` was already stored (a replay). Raises `OSError` when an
        earlier background write failed (the chunks stay buffered and are written again)."""
        if not lines:
            return True
        state = self._jobs.get(job_id)
        if state is None:
            state = await self._load(_check_id("run", run_id), _check_id("job", job_id))
        else:
            self._jobs.move_to_end(job_id)
        if seq is not None:
            if seq <= state.last_seq:
                return False
            state.last_seq = seq
        else:
            state.last_seq += 1
        text = json.dumps(list(lines), ensure_ascii=False, separators=(",", ":"))
        self._pending.append({
            "job_id": job_id, "seq": state.last_seq, "run_id": state.run_id, "first_line": state.lines + 1,
            "line_count": len(lines), "step": step_index, "lines": text, "created_at": utcnow(),
        })
        state.lines += len(lines)
        state.unsealed_bytes += len(text)
        if state.unsealed_bytes >= self.segment_bytes:
            state.unsealed_bytes = 0
            self._seal_wanted[job_id] = state.run_id
            self._seal_kick.set()
        self._kick.set()
        if len(self._pending) >= MAX_PENDING_ROWS:
            await self.flush()
        if self.error is not None:
            error, self.error = self.error, None
            raise OSError(f"writing job logs failed: {error}")
        return True

    async def _load(self, run_id: str, job_id: str) -> _JobState:
        """The job's numbering from the database (a job first seen here, or forgotten): what this process
        still buffers is written first, so the database is the whole truth."""
        async with self._load_lock:
            state = self._jobs.get(job_id)
            if state is not None:
                return state
            await self.flush()
            await self._import_legacy_job(run_id, job_id)
            async with self.db.read() as conn:
                last_seq, lines = await store.job_end(conn, job_id)
            state = _JobState(run_id, last_seq, lines)
            self._jobs[job_id] = state
            while len(self._jobs) > self._known_jobs:
                self._jobs.popitem(last=False)
            return state

    async def flush(self) -> None:
        """Return once every chunk appended before the call is in the database (durable: it survives
        this process being killed); `OSError` when it could not be written (the chunks stay buffered)."""
        async with self._write_lock:
            rows, self._pending = self._pending, []
            if not rows:
                return
            try:
                async with self.db.transaction() as conn:
                    await store.insert_chunks(conn, rows)
            except Exception as exc:
                self._pending[:0] = rows
                raise OSError(f"storing {len(rows)} job log chunks failed: {describe_error(exc)}") from exc
        jobs = sorted({row["job_id"] for row in rows})
        for job_id in jobs:
            self.notify_appended(job_id)
        if self.on_written is not None:
            self.on_written(jobs)

    async def forget(self, job_ids: Sequence[str]) -> None:
        """Drop what this process remembers of these jobs' numbering (an agent re-registered with them: it
        may have sent chunks to another orchestrator meanwhile); the next chunk reloads it."""
        if not any(job_id in self._jobs for job_id in job_ids):
            return
        await self.flush()
        for job_id in job_ids:
            self._jobs.pop(job_id, None)

    def finish(self, run_id: str, job_id: str) -> None:
        """The job ended (its status is committed): seal its chunks now and forget its numbering. Its
        followers, here and on the other nodes, are woken: their log is complete now."""
        self._jobs.pop(job_id, None)
        self._seal_wanted[job_id] = run_id
        self._seal_kick.set()
        self.notify_appended(job_id)
        if self.on_written is not None:
            self.on_written([job_id])

    async def _writer(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            await asyncio.sleep(WRITE_INTERVAL_S)
            try:
                await self.flush()
            except OSError as exc:
                self.error = str(exc)
                log_event("logs.write_failed", level="error", error=str(exc))
                await asyncio.sleep(1.0)
                self._kick.set()

    # -- sealing ------------------------------------------------------------------------------------

    async def _sealer(self) -> None:
        while True:
            await self._seal_kick.wait()
            self._seal_kick.clear()
            wanted, self._seal_wanted = self._seal_wanted, {}
            try:
                await self.flush()
            except OSError:
                self._seal_wanted.update(wanted)  # the writer reports it; seal once written
                await asyncio.sleep(1.0)
                self._seal_kick.set()
                continue
            for job_id, run_id in wanted.items():
                await self._seal_logged(run_id, job_id)

    async def _sweeper(self) -> None:
        interval = min(60.0, max(1.0, self.segment_max_age_s / 4))
        while True:
            await asyncio.sleep(interval)
            await self.seal_old()

    async def seal_old(self) -> int:
        """Seal the chunks of every job holding one older than the maximum age (whichever orchestrator
        received them): the number of jobs sealed."""
        cutoff = utcnow() - dt.timedelta(seconds=self.segment_max_age_s)
        try:
            async with self.db.read() as conn:
                jobs = await store.jobs_with_old_chunks(conn, cutoff)
        except Exception as exc:
            log_event("logs.seal_sweep_failed", level="warning", error=describe_error(exc))
            return 0
        for run_id, job_id in jobs:
            await self._seal_logged(run_id, job_id)
        return len(jobs)

    async def _seal_logged(self, run_id: str, job_id: str) -> None:
        try:
            await self.seal(run_id, job_id)
        except Exception as exc:  # the chunks stay readable in the database; the age sweep tries again
            log_event("logs.seal_failed", level="warning", run_id=run_id, job_id=job_id,
                      error=f"{type(exc).__name__}: {exc}")

    async def seal(self, run_id: str, job_id: str) -> int:
        """Move the job's chunks in the database into segment blobs (each at most about
        `segment_bytes`); the number of segments written."""
        async with self.db.read() as conn:
            previous, chunks = await store.chunks_to_seal(conn, job_id)
        written = 0
        start = 0
        while start < len(chunks):
            end, size = start, 0
            while end < len(chunks) and (end == start or size + len(chunks[end].lines) <= self.segment_bytes):
                size += len(chunks[end].lines)
                end += 1
            group, start = chunks[start:end], end
            data = "".join(_record(c.seq, c.step, c.first_line, c.lines) for c in group).encode("utf-8")
            first, last = group[0], group[-1]
            key = segment_key(run_id, job_id, first.seq, last.seq)
            await self.blobs.put(key, io.BytesIO(data))
            segment = store.SegmentRow(
                job_id=job_id, first_seq=first.seq, last_seq=last.seq, run_id=run_id, first_line=first.first_line,
                line_count=last.first_line + last.line_count - first.first_line, byte_size=len(data), blob_key=key,
                created_at=utcnow(),
            )
            try:
                async with self.db.transaction() as conn:
                    recorded = await store.insert_segment(conn, segment, previous_last_seq=previous)
            except IntegrityError:
                recorded = False
            if not recorded:  # another orchestrator sealed them first; its segment holds these lines
                return written
            written += 1
            previous = last.seq
        return written

    # -- reading ------------------------------------------------------------------------------------

    async def _flush_quietly(self) -> None:
        """What this process appended before a read is visible to it (a failure is the writer's to report)."""
        if self._pending:
            with contextlib.suppress(OSError):
                await self.flush()

    async def _pieces(self, run_id: str, job_id: str, after: int, limit: int) -> list[store.LogPiece]:
        _check_id("run", run_id)
        _check_id("job", job_id)
        await self._flush_quietly()
        async with self.db.read() as conn:
            pieces = await store.pieces_after(conn, job_id, after, limit)
        if not pieces and await self._import_legacy_job(run_id, job_id):
            async with self.db.read() as conn:
                pieces = await store.pieces_after(conn, job_id, after, limit)
        return pieces

    async def read(self, run_id: str, job_id: str, *, after: int = 0, limit: int = 1000) -> LogPage:
        """Lines after cursor `after` (0 = the beginning), at most `limit` (whole chunks)."""
        limit = max(1, min(limit, MAX_READ_LINES))
        after = max(0, after)
        rows = min(limit, MAX_READ_PIECES)
        pieces = await self._pieces(run_id, job_id, after, rows + 1)
        more = len(pieces) > rows
        out: list[LogLineOut] = []
        end = after
        for piece in pieces[:rows]:
            if len(out) >= limit:
                more = True
                break
            if piece.blob_key is not None:
                segment = await self._segment(piece.blob_key)
                start = max(0, bisect.bisect_right(segment.starts, after) - 1)
                for first, step, lines in segment.records[start:]:
                    if len(out) >= limit:
                        break
                    out.extend(LogLineOut(n=first + i, step=step, line=text)
                               for i, text in enumerate(lines) if first + i > after)
            else:
                assert piece.lines is not None and piece.step is not None
                lines = json.loads(piece.lines)
                out.extend(LogLineOut(n=piece.first_line + i, step=piece.step, line=str(text))
                           for i, text in enumerate(lines) if piece.first_line + i > after)
            end = piece.first_line + piece.line_count - 1
        cursor = out[-1].n if out else after
        return LogPage(lines=out, next=cursor, at_end=not more and cursor >= end)

    async def _segment(self, key: str) -> _Segment:
        found = self._segments.get(key)
        if found is not None:
            self._segments.move_to_end(key)
            return found
        try:
            data = await read_all(await self.blobs.open(key))
        except BlobNotFound:
            raise OSError(f"log segment {key} is missing from the blob store") from None
        records: list[tuple[int, int, list[str]]] = []
        for raw in data.splitlines():
            try:
                record = json.loads(raw)
                records.append((int(record["n"]), int(record["step"]), [str(x) for x in record["lines"]]))
            except (ValueError, KeyError, TypeError):
                continue  # a record torn in a legacy file: skip it rather than fail the reader
        segment = _Segment([r[0] for r in records], records)
        self._segments[key] = segment
        while len(self._segments) > SEGMENT_CACHE:
            self._segments.popitem(last=False)
        return segment

    async def tail(self, run_id: str, job_id: str, *, lines: int = 50) -> list[LogLineOut]:
        """The job's last `lines` lines (as stored: masked by the agent)."""
        total = await self.line_count(run_id, job_id)
        last: deque[LogLineOut] = deque(maxlen=max(1, lines))
        cursor = max(0, total - lines)
        while True:
            page = await self.read(run_id, job_id, after=cursor, limit=MAX_READ_LINES)
            last.extend(page.lines)
            if page.at_end or not page.lines:
                return list(last)
            cursor = page.next

    async def line_count(self, run_id: str, job_id: str) -> int:
        """Lines stored so far (0 when none)."""
        pieces = await self._pieces(run_id, job_id, 0, 1)  # imports a legacy file first, if any
        if not pieces:
            return 0
        async with self.db.read() as conn:
            return await store.line_total(conn, job_id)

    async def seek_line(self, run_id: str, job_id: str, n: int) -> int:
        """A cursor from which `read` returns line `n` first."""
        return max(0, n - 1)

    async def search(self, run_id: str, job_id: str, needle: str, *, limit: int = 200) -> tuple[list[LogLineOut], bool]:
        """Lines containing `needle` (case-insensitive), first `limit`; and whether there were more."""
        folded = needle.casefold()
        out: list[LogLineOut] = []
        cursor = 0
        while True:
            page = await self.read(run_id, job_id, after=cursor, limit=MAX_READ_LINES)
            for line in page.lines:
                if folded in line.line.casefold():
                    if len(out) >= limit:
                        return out, True
                    out.append(line)
            if page.at_end or not page.lines:
                return out, False
            cursor = page.next

    # -- following ----------------------------------------------------------------------------------

    def watch(self, job_id: str) -> asyncio.Event:
        """What `wait_for_data` waits on: take it before reading, so chunks stored after the read and
        before the wait are not missed (it is set by the next `notify_appended` of the job)."""
        event = self._waiters.get(job_id)
        if event is None:
            event = self._waiters[job_id] = asyncio.Event()
        return event

    async def wait_for_data(self, job_id: str, timeout: float = POLL_INTERVAL_S,
                            event: asyncio.Event | None = None) -> bool:
        """Wait until new chunks of the job were stored (`notify_appended`: by this process, or by another
        node through the cluster bus) since `event` was taken with `watch` (default: now), at most
        `timeout` seconds; True when woken, False on the timeout (then read again anyway)."""
        if event is None:
            event = self.watch(job_id)
        self.waiting += 1
        try:
            await aio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        return True

    def notify_appended(self, job_id: str) -> None:
        """New chunks of the job are in the database: wake its followers in this process. Called after
        each local write, and by the cluster bus's `job-log` handler for another node's writes."""
        event = self._waiters.pop(job_id, None)
        if event is not None:
            event.set()

    # -- deleting -----------------------------------------------------------------------------------

    async def delete_run(self, run_id: str) -> None:
        """Delete a run's chunks, segments (rows and blobs) and any legacy log files."""
        _check_id("run", run_id)
        await self._flush_quietly()
        for job_id, state in list(self._jobs.items()):
            if state.run_id == run_id:
                del self._jobs[job_id]
        async with self.db.transaction() as conn:
            await store.delete_run_logs(conn, run_id)
        await self.blobs.delete_prefix(f"logs/{run_id}/")
        for key in [k for k in self._segments if k.startswith(f"logs/{run_id}/")]:
            del self._segments[key]
        if self.legacy_root is not None:
            await asyncio.to_thread(_remove_dir, self.legacy_root / run_id)

    # -- logs written before segments (one file per job) ----------------------------------------------

    async def _import_all_legacy(self) -> None:
        root = self.legacy_root
        assert root is not None
        files = await asyncio.to_thread(_legacy_files, root)
        if not files:
            return
        imported = 0
        for run_id, job_id in files:
            try:
                if await self._import_legacy_job(run_id, job_id):
                    imported += 1
            except Exception as exc:  # left in place: read (and imported) on demand, retried at next start
                log_event("logs.import_failed", level="warning", run_id=run_id, job_id=job_id,
                          error=f"{type(exc).__name__}: {exc}")
        log_event("logs.imported", jobs=imported, root=str(root))

    async def _import_legacy_job(self, run_id: str, job_id: str) -> bool:
        """Import the job's legacy log file as segments, then delete it: True when there was one."""
        if self.legacy_root is None:
            return False
        path = self.legacy_root / run_id / f"{job_id}.ndjson"
        if not await asyncio.to_thread(path.is_file):
            return False
        async with self._import_lock:
            if not await asyncio.to_thread(path.is_file):
                return True  # imported while we waited
            groups = await asyncio.to_thread(_legacy_segments, path, self.segment_bytes)
            segments: list[store.SegmentRow] = []
            for data, first_seq, last_seq, first_line, line_count in groups:
                key = segment_key(run_id, job_id, first_seq, last_seq)
                await self.blobs.put(key, io.BytesIO(data))
                segments.append(store.SegmentRow(
                    job_id=job_id, first_seq=first_seq, last_seq=last_seq, run_id=run_id, first_line=first_line,
                    line_count=line_count, byte_size=len(data), blob_key=key, created_at=utcnow(),
                ))
            async with self.db.transaction() as conn:
                if not await store.job_has_rows(conn, job_id):  # not imported by another orchestrator
                    previous = -1
                    for segment in segments:
                        await store.insert_segment(conn, segment, previous_last_seq=previous)
                        previous = segment.last_seq
            await asyncio.to_thread(_remove_file, path)
        log_event("logs.legacy_imported", run_id=run_id, job_id=job_id, segments=len(segments))
        return True


def _legacy_files(root: Path) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if not root.is_dir():
        return found
    for run_dir in sorted(root.iterdir()):
        if not run_dir.is_dir() or not _ID.fullmatch(run_dir.name):
            continue
        for path in sorted(run_dir.glob("*.ndjson")):
            if _ID.fullmatch(path.stem):
                found.append((run_dir.name, path.stem))
    return found


def _legacy_segments(path: Path, segment_bytes: int) -> list[tuple[bytes, int, int, int, int]]:
    """The file's records cut into segments: (data, first seq, last seq, first line, line count). Torn
    records (a crash mid-write) are left out; seqs keep increasing, as the segments table requires."""
    out: list[tuple[bytes, int, int, int, int]] = []
    buffer: list[bytes] = []
    first_seq = last_seq = first_line = count = size = 0
    previous_seq = -1
    with open(path, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
                seq, n, lines = int(record["seq"]), int(record["n"]), record["lines"]
                int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            if seq <= previous_seq or not isinstance(lines, list):
                continue
            previous_seq = seq
            if buffer and size + len(raw) > segment_bytes:
                out.append((b"".join(buffer), first_seq, last_seq, first_line, count))
                buffer = []
            if not buffer:
                first_seq, first_line, count, size = seq, n, 0, 0
            buffer.append(raw)
            size += len(raw)
            last_seq = seq
            count = n + len(lines) - first_line
    if buffer:
        out.append((b"".join(buffer), first_seq, last_seq, first_line, count))
    return out


def _remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: other jobs' files are still there
        path.parent.rmdir()


def _remove_dir(directory: Path) -> None:
    if directory.is_dir():
        for child in directory.iterdir():
            child.unlink(missing_ok=True)
        directory.rmdir()


def default_log_root(data_dir: Path) -> Path:
    """Where logs were kept before segments (`<data dir>/logs`): imported at start-up."""
    return data_dir / "logs"


__all__ = ["LogLineOut", "LogPage", "LogStore", "default_log_root", "segment_key"]
