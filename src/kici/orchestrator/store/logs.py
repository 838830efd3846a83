"""Job log rows: `log_chunks` (chunks received from agents, not yet sealed) and `log_segments` (sealed runs
of chunks whose content is a blob). The content and the rules live in `kici.orchestrator.storage.logs`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import log_chunks, log_segments

__all__ = [
    "ChunkRow",
    "LogPiece",
    "SegmentRow",
    "all_pieces",
    "chunks_to_seal",
    "delete_run_logs",
    "insert_chunks",
    "insert_segment",
    "job_end",
    "job_has_rows",
    "jobs_with_old_chunks",
    "line_total",
    "pieces_after",
    "segment_keys",
]


class ChunkRow(NamedTuple):
    """A stored chunk, as sealing reads it (a plain tuple: a segment is thousands of them)."""

    seq: int
    first_line: int
    line_count: int
    step: int
    lines: str
    """A JSON array of strings, as stored."""


class SegmentRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    job_id: str
    first_seq: int
    last_seq: int
    run_id: str
    first_line: int
    line_count: int
    byte_size: int
    blob_key: str
    created_at: dt.datetime


class LogPiece(BaseModel):
    """A chunk (`lines` set) or a segment (`blob_key` set), in line order."""

    model_config = ConfigDict(frozen=True)

    first_line: int
    line_count: int
    step: int | None = None
    lines: str | None = None
    blob_key: str | None = None


async def insert_chunks(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Store chunks; one already stored (same job and seq, from another orchestrator or a replay) is kept."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        statement: Any = pg_insert(log_chunks).on_conflict_do_nothing(index_elements=["job_id", "seq"])
    else:
        statement = sqlite_insert(log_chunks).on_conflict_do_nothing(index_elements=["job_id", "seq"])
    await conn.execute(statement, list(rows))


async def job_end(conn: AsyncConnection, job_id: str) -> tuple[int, int]:
    """(last seq, line count) stored for the job, chunks and segments together; (-1, 0) when none."""
    chunk = (await conn.execute(
        sa.select(log_chunks.c.seq, log_chunks.c.first_line + log_chunks.c.line_count - 1)
        .where(log_chunks.c.job_id == job_id).order_by(log_chunks.c.seq.desc()).limit(1)
    )).first()
    segment = (await conn.execute(
        sa.select(log_segments.c.last_seq, log_segments.c.first_line + log_segments.c.line_count - 1)
        .where(log_segments.c.job_id == job_id).order_by(log_segments.c.first_seq.desc()).limit(1)
    )).first()
    found = [(int(r[0]), int(r[1])) for r in (chunk, segment) if r is not None]
    return max(found) if found else (-1, 0)


async def job_has_rows(conn: AsyncConnection, job_id: str) -> bool:
    for table in (log_segments, log_chunks):
        if (await conn.execute(sa.select(sa.literal(1)).where(table.c.job_id == job_id).limit(1))).first():
            return True
    return False


def _pieces_query(job_id: str, after: int) -> sa.CompoundSelect[Any]:
    # One statement (one snapshot on PostgreSQL too): a seal moving chunks into a segment between two
    # statements could otherwise hide those lines from this read.
    chunks = sa.select(
        log_chunks.c.first_line, log_chunks.c.line_count, log_chunks.c.step, log_chunks.c.lines,
        sa.cast(sa.null(), sa.Text).label("blob_key"),
    ).where(log_chunks.c.job_id == job_id, log_chunks.c.first_line + log_chunks.c.line_count > after)
    segments = sa.select(
        log_segments.c.first_line, log_segments.c.line_count, sa.cast(sa.null(), sa.Integer).label("step"),
        sa.cast(sa.null(), sa.Text).label("lines"), log_segments.c.blob_key,
    ).where(log_segments.c.job_id == job_id, log_segments.c.first_line + log_segments.c.line_count > after)
    return sa.union_all(chunks, segments)


async def pieces_after(conn: AsyncConnection, job_id: str, after: int, limit: int) -> list[LogPiece]:
    """The first `limit` chunks and segments holding lines after line `after`, in line order."""
    union = _pieces_query(job_id, after).subquery()
    rows = await conn.execute(sa.select(union).order_by(union.c.first_line).limit(limit))
    return [LogPiece.model_validate(dict(row._mapping)) for row in rows]


async def all_pieces(conn: AsyncConnection, job_id: str) -> list[LogPiece]:
    return await pieces_after(conn, job_id, 0, 1_000_000_000)


async def line_total(conn: AsyncConnection, job_id: str) -> int:
    return (await job_end(conn, job_id))[1]


async def chunks_to_seal(conn: AsyncConnection, job_id: str) -> tuple[int, list[ChunkRow]]:
    """The last seq already sealed (-1: none) and the chunks after it, in seq order."""
    sealed = (await conn.execute(
        sa.select(sa.func.max(log_segments.c.last_seq)).where(log_segments.c.job_id == job_id)
    )).scalar_one_or_none()
    last = -1 if sealed is None else int(sealed)
    rows = await conn.execute(
        sa.select(log_chunks.c.seq, log_chunks.c.first_line, log_chunks.c.line_count, log_chunks.c.step,
                  log_chunks.c.lines)
        .where(log_chunks.c.job_id == job_id, log_chunks.c.seq > last).order_by(log_chunks.c.seq)
    )
    return last, [ChunkRow(*row) for row in rows]


async def insert_segment(conn: AsyncConnection, segment: SegmentRow, *, previous_last_seq: int) -> bool:
    """Record a sealed segment and delete the chunks it holds, in the caller's transaction. False (nothing
    written) when the job's segments changed since `previous_last_seq` was read: another orchestrator
    sealed them first. The primary key (job, first seq) settles two sealers racing past this check."""
    sealed = (await conn.execute(
        sa.select(sa.func.max(log_segments.c.last_seq)).where(log_segments.c.job_id == segment.job_id)
    )).scalar_one_or_none()
    if (-1 if sealed is None else int(sealed)) != previous_last_seq:
        return False
    await conn.execute(log_segments.insert().values(**segment.model_dump()))
    await conn.execute(log_chunks.delete().where(
        log_chunks.c.job_id == segment.job_id, log_chunks.c.seq >= segment.first_seq,
        log_chunks.c.seq <= segment.last_seq,
    ))
    return True


async def jobs_with_old_chunks(conn: AsyncConnection, before: dt.datetime, limit: int = 100) -> list[tuple[str, str]]:
    """(run id, job id) of jobs holding a chunk received before `before` (to be sealed by any orchestrator)."""
    rows = await conn.execute(
        sa.select(log_chunks.c.run_id, log_chunks.c.job_id).where(log_chunks.c.created_at < before)
        .group_by(log_chunks.c.run_id, log_chunks.c.job_id).limit(limit)
    )
    return [(str(r[0]), str(r[1])) for r in rows]


async def segment_keys(conn: AsyncConnection, run_id: str) -> list[str]:
    rows = await conn.execute(sa.select(log_segments.c.blob_key).where(log_segments.c.run_id == run_id))
    return [str(r[0]) for r in rows]


async def delete_run_logs(conn: AsyncConnection, run_id: str) -> int:
    """Delete a run's chunk and segment rows; the number of rows deleted."""
    chunks = await conn.execute(log_chunks.delete().where(log_chunks.c.run_id == run_id))
    segments = await conn.execute(log_segments.delete().where(log_segments.c.run_id == run_id))
    return int(chunks.rowcount or 0) + int(segments.rowcount or 0)
