"""The reporting outbox: what is owed to GitHub (check runs) and to notification URLs, and its delivery
state.

Rows are written by the run store in the SAME transaction as the state change that causes them (a run
created, a job started or finished, a run finished), so a report can be late but never lost or invented.
The reporting worker (`kici.orchestrator.reporting.worker`) sends them.

Ordering and claims, across any number of orchestrators:
- Rows share an `ordering_key` (`check_run:<job id>`, `notify:<run id>:<url>`). Only the key's *head* — its
  oldest pending row — may be sent; the rows after it wait, so a key's reports arrive in order.
- A worker claims a key by a conditional UPDATE of its head (`claimed_until` in the past → now + lease).
  Only the head is ever claimed, so two workers can never own one key; a crashed worker's lease runs out.
- Check runs compact: the worker sends the job's state at send time, which covers every pending row of
  the key, and marks them all sent. Notifications are sent one row at a time.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.orchestrator.db.schema import ReportKind, ReportStatus, new_id, report_outbox, utcnow

CHECK_QUEUED = "queued"
CHECK_IN_PROGRESS = "in_progress"
CHECK_COMPLETED = "completed"
RUN_FINISHED = "run.finished"
JOB_FINISHED = "job.finished"


class ReportRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    org_id: str
    kind: str
    ordering_key: str
    run_id: str
    job_id: str | None
    event: str
    target: str | None
    delivery_id: str
    status: str
    attempts: int
    next_attempt_at: dt.datetime
    claimed_until: dt.datetime | None
    claimed_by: str | None
    first_failed_at: dt.datetime | None
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None


# -- the rows a state change owes (pure) -------------------------------------------------------------


def check_run_key(job_id: str) -> str:
    return f"check_run:{job_id}"


def notify_key(run_id: str, url: str) -> str:
    return f"notify:{run_id}:{url}"


def _row(org_id: str, kind: ReportKind, key: str, run_id: str, job_id: str | None, event: str,
         target: str | None, now: dt.datetime) -> dict[str, Any]:
    return {
        "org_id": org_id, "kind": kind.value, "ordering_key": key, "run_id": run_id, "job_id": job_id,
        "event": event, "target": target, "delivery_id": new_id(), "status": ReportStatus.PENDING.value,
        "attempts": 0, "next_attempt_at": now, "created_at": now,
    }


def job_rows(
    reporting: Mapping[str, Any] | None, org_id: str, run_id: str, job_ids: Iterable[str], event: str,
    *, now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """The rows owed when jobs are created (`queued`), start (`in_progress`) or finish (`completed`):
    a check-run update for a run reported to GitHub, and `job.finished` for each notification URL that
    wants job events."""
    if not reporting:
        return []
    now = now or utcnow()
    rows: list[dict[str, Any]] = []
    github = bool(reporting.get("github"))
    listeners = [n["url"] for n in reporting.get("notify") or () if n.get("job_events")]
    for job_id in job_ids:
        if github:
            rows.append(_row(org_id, ReportKind.CHECK_RUN, check_run_key(job_id), run_id, job_id, event, None, now))
        if event == CHECK_COMPLETED:
            for url in listeners:
                rows.append(_row(org_id, ReportKind.NOTIFICATION, notify_key(run_id, url), run_id, job_id,
                                 JOB_FINISHED, url, now))
    return rows


def failed_run_rows(
    reporting: Mapping[str, Any] | None, org_id: str, run_id: str, *, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """A run that failed before it had jobs (a corrupt lock file): one check run for the run itself (so
    the author sees it on the commit), and `run.finished` for each notification URL."""
    if not reporting:
        return []
    now = now or utcnow()
    rows = []
    if reporting.get("github"):
        rows.append(_row(org_id, ReportKind.CHECK_RUN, f"check_run:run:{run_id}", run_id, None, CHECK_COMPLETED,
                         None, now))
    return rows + run_finished_rows(reporting, org_id, run_id, now=now)


def run_finished_rows(
    reporting: Mapping[str, Any] | None, org_id: str, run_id: str, *, now: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """`run.finished` for each notification URL."""
    if not reporting:
        return []
    now = now or utcnow()
    return [
        _row(org_id, ReportKind.NOTIFICATION, notify_key(run_id, n["url"]), run_id, None, RUN_FINISHED, n["url"], now)
        for n in reporting.get("notify") or ()
    ]


_INSERT = report_outbox.insert()


async def insert_rows(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> None:
    """One multi-row INSERT (nothing at all for no rows: unreported runs pay no round trip)."""
    if rows:
        await conn.execute(_INSERT, list(rows))


# -- the worker's side ----------------------------------------------------------------------------------


def _record(row: Any) -> ReportRecord:
    return ReportRecord.model_validate(dict(row._mapping))


def _is_head() -> sa.ColumnElement[bool]:
    """No earlier pending row of the same ordering key."""
    earlier = report_outbox.alias("earlier")
    return ~(
        sa.select(earlier.c.id)
        .where(
            earlier.c.ordering_key == report_outbox.c.ordering_key,
            earlier.c.status == ReportStatus.PENDING.value,
            earlier.c.id < report_outbox.c.id,
        )
        .exists()
    )


async def claimable_heads(conn: AsyncConnection, *, now: dt.datetime, limit: int) -> list[ReportRecord]:
    """Heads of ordering keys that are due and not leased, oldest first."""
    query = (
        sa.select(report_outbox)
        .where(
            report_outbox.c.status == ReportStatus.PENDING.value,
            report_outbox.c.next_attempt_at <= now,
            sa.or_(report_outbox.c.claimed_until.is_(None), report_outbox.c.claimed_until < now),
            _is_head(),
        )
        .order_by(report_outbox.c.id)
        .limit(limit)
    )
    return [_record(r) for r in await conn.execute(query)]


async def next_due(conn: AsyncConnection) -> dt.datetime | None:
    """When the next key head becomes due or its lease ends (for the worker's sleep); None: none pending.
    Rows behind a head wait for it, so only heads count."""
    due = sa.case(
        (report_outbox.c.claimed_until > report_outbox.c.next_attempt_at, report_outbox.c.claimed_until),
        else_=report_outbox.c.next_attempt_at,
    )
    query = sa.select(sa.func.min(due)).where(report_outbox.c.status == ReportStatus.PENDING.value, _is_head())
    value = (await conn.execute(query)).scalar_one_or_none()
    if isinstance(value, str):  # SQLite: a CASE over timestamps comes back as text
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


async def claim(conn: AsyncConnection, head_id: int, *, worker: str, now: dt.datetime, lease: dt.timedelta) -> bool:
    """Lease the key whose head is `head_id`; False when another worker has it or it was sent meanwhile."""
    result = await conn.execute(
        report_outbox.update()
        .where(
            report_outbox.c.id == head_id,
            report_outbox.c.status == ReportStatus.PENDING.value,
            sa.or_(report_outbox.c.claimed_until.is_(None), report_outbox.c.claimed_until < now),
        )
        .values(claimed_until=now + lease, claimed_by=worker)
    )
    return result.rowcount == 1


async def pending_of_key(conn: AsyncConnection, key: str) -> list[ReportRecord]:
    """The key's pending rows, oldest first."""
    query = (
        sa.select(report_outbox)
        .where(report_outbox.c.ordering_key == key, report_outbox.c.status == ReportStatus.PENDING.value)
        .order_by(report_outbox.c.id)
    )
    return [_record(r) for r in await conn.execute(query)]


async def mark_sent(conn: AsyncConnection, ids: Sequence[int], *, now: dt.datetime) -> None:
    await conn.execute(
        report_outbox.update()
        .where(report_outbox.c.id.in_(list(ids)), report_outbox.c.status == ReportStatus.PENDING.value)
        .values(status=ReportStatus.SENT.value, sent_at=now, claimed_until=None, claimed_by=None, last_error=None)
    )


async def mark_retry(
    conn: AsyncConnection, ids: Sequence[int], *, error: str, next_attempt_at: dt.datetime, now: dt.datetime
) -> None:
    """A failed attempt: count it, keep the error, release the lease until `next_attempt_at`."""
    await conn.execute(
        report_outbox.update()
        .where(report_outbox.c.id.in_(list(ids)), report_outbox.c.status == ReportStatus.PENDING.value)
        .values(
            attempts=report_outbox.c.attempts + 1,
            last_error=error[:2000],
            next_attempt_at=next_attempt_at,
            first_failed_at=sa.func.coalesce(report_outbox.c.first_failed_at, now),
            claimed_until=None,
            claimed_by=None,
        )
    )


async def mark_failed(conn: AsyncConnection, ids: Sequence[int], *, error: str) -> None:
    """Given up: kept, visible in `kici-admin reports list --status failed`, retryable."""
    await conn.execute(
        report_outbox.update()
        .where(report_outbox.c.id.in_(list(ids)), report_outbox.c.status == ReportStatus.PENDING.value)
        .values(
            status=ReportStatus.FAILED.value,
            attempts=report_outbox.c.attempts + 1,
            last_error=error[:2000],
            claimed_until=None,
            claimed_by=None,
        )
    )


# -- admin --------------------------------------------------------------------------------------------


async def list_reports(
    conn: AsyncConnection, *, org_id: str, status: str | None = None, run_id: str | None = None, limit: int = 100
) -> list[ReportRecord]:
    """Newest first."""
    query = sa.select(report_outbox).where(report_outbox.c.org_id == org_id)
    if status is not None:
        query = query.where(report_outbox.c.status == status)
    if run_id is not None:
        query = query.where(report_outbox.c.run_id == run_id)
    query = query.order_by(report_outbox.c.id.desc()).limit(max(0, limit))
    return [_record(r) for r in await conn.execute(query)]


async def get_report(conn: AsyncConnection, report_id: int) -> ReportRecord | None:
    row = (await conn.execute(sa.select(report_outbox).where(report_outbox.c.id == report_id))).first()
    return _record(row) if row is not None else None


async def retry_report(conn: AsyncConnection, report_id: int, *, now: dt.datetime | None = None) -> bool:
    """A failed row goes pending again, due now, with a fresh give-up clock; False unless it was failed."""
    now = now or utcnow()
    result = await conn.execute(
        report_outbox.update()
        .where(report_outbox.c.id == report_id, report_outbox.c.status == ReportStatus.FAILED.value)
        .values(
            status=ReportStatus.PENDING.value, next_attempt_at=now, first_failed_at=None, claimed_until=None,
            claimed_by=None,
        )
    )
    return result.rowcount == 1


async def delete_sent_before(conn: AsyncConnection, cutoff: dt.datetime, *, limit: int = 1000) -> int:
    """Delete up to `limit` reports sent before `cutoff` (the oldest first); how many."""
    doomed = (
        sa.select(report_outbox.c.id)
        .where(report_outbox.c.status == ReportStatus.SENT.value, report_outbox.c.sent_at < cutoff)
        .order_by(report_outbox.c.id)
        .limit(limit)
        .scalar_subquery()
    )
    result = await conn.execute(report_outbox.delete().where(report_outbox.c.id.in_(doomed)))
    return int(result.rowcount or 0)


async def count_pending(conn: AsyncConnection) -> int:
    query = sa.select(sa.func.count()).select_from(report_outbox).where(
        report_outbox.c.status == ReportStatus.PENDING.value
    )
    return int((await conn.execute(query)).scalar_one())


async def count_by_status(conn: AsyncConnection) -> dict[str, int]:
    query = sa.select(report_outbox.c.status, sa.func.count()).group_by(report_outbox.c.status)
    return {str(status): int(n) for status, n in await conn.execute(query)}
