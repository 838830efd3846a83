"""The dispatch queue: exactly-once claims by agents, dispatch acks, expiry and agent-disconnect recovery.

Row flow (`dispatch_queue.status`): `pending → dispatched → completed | failed`; `dispatched ↔ recovering
→ failed`; `pending → expired` (queue timeout or cancel). The job itself stays `queued` from enqueue until
its agent reports `running`; a claim only records the agent on it.

Exactly-once claims:
- PostgreSQL: candidates are read oldest first with the exact-label routing done in SQL
  (`agent_labels @> runs_on_labels`, `runs_on_labels @> taints`, no exact exclude hit; JSONB operators),
  regex matchers are checked in Python with `kici.engine.labels.job_matches_agent`, then the first
  matching row is locked with `FOR UPDATE SKIP LOCKED` (re-checking `status = 'pending'`) and updated
  with a conditional `UPDATE … WHERE status = 'pending'`. Concurrent claimers skip each other's rows
  instead of queueing behind them, and the conditional update makes a double claim impossible even if
  the lock step were wrong.
- SQLite: the claim runs in `Database.transaction()`, whose `BEGIN IMMEDIATE` excludes every other writer
  of the file (other processes included), so read-then-update is atomic; routing is all in Python.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from kici.engine.labels import job_matches_agent
from kici.engine.lockfile import LabelMatcher
from kici.engine.states import JobEvent, JobState
from kici.orchestrator.db.database import Database
from kici.orchestrator.db.schema import DEFAULT_ORG_ID, QueueStatus, dispatch_queue, jobs, runs, utcnow
from kici.orchestrator.store import runs as run_store
from kici.orchestrator.store.jobs import set_job_status
from kici.orchestrator.store.runs import DEFAULT_QUEUE_LIMITS, RECOVERY_TIMEOUT_ERROR, QueueLimits

CLAIM_BATCH = 20
"""Candidate rows read per round of a claim (more rounds only when regex matchers reject them all)."""


@dataclass(frozen=True)
class AgentSlot:
    """A connected agent with a free slot, as the claim sees it."""

    agent_id: str
    labels: list[str]
    taints: list[str] = field(default_factory=list)
    """Labels the agent's token made mandatory: a job must ask for each of them by name."""


@dataclass(frozen=True)
class Claim:
    queue_id: str
    job_id: str
    run_id: str
    attempt: int
    """Dispatch attempt number (1 for the first hand-out)."""


class QueueRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    job_id: str
    run_id: str
    org_id: str
    status: str
    runs_on_labels: list[str]
    """The job's exact `runs_on` labels (regex matchers live on the job)."""
    exclude_labels: list[str]
    agent_id: str | None
    dispatch_attempts: int
    ack_deadline: dt.datetime | None
    recovery_deadline: dt.datetime | None
    expires_at: dt.datetime | None
    created_at: dt.datetime
    dispatched_at: dt.datetime | None
    job_name: str
    workflow: str
    repo: str


def _matchers(raw: Sequence[Any] | None) -> list[LabelMatcher]:
    return [LabelMatcher.model_validate(m) for m in raw or ()]


def _routes(agent: AgentSlot, row: Any) -> bool:
    return job_matches_agent(_matchers(row.runs_on), _matchers(row.exclude_labels), agent.labels, agent.taints)


# -- claim -------------------------------------------------------------------------------------------


async def claim_next(db: Database, agent: AgentSlot, *, ack_timeout_ms: int) -> Claim | None:
    """Hand the oldest pending, unexpired job this agent may run to it; None when there is none.

    Owns its transaction. The row becomes `dispatched` (agent, attempt + 1, `ack_deadline`,
    `dispatched_at`); the job records the agent and stays `queued` until the agent reports `running`.
    """
    async with db.transaction() as conn:
        return await _claim(conn, agent, ack_timeout_ms=ack_timeout_ms, postgres=db.is_postgresql)


async def _claim(conn: AsyncConnection, agent: AgentSlot, *, ack_timeout_ms: int, postgres: bool) -> Claim | None:
    now = utcnow()
    dq = dispatch_queue
    after: tuple[dt.datetime, str] | None = None
    while True:
        query = (
            sa.select(dq.c.id, dq.c.job_id, dq.c.created_at, jobs.c.runs_on, jobs.c.exclude_labels)
            .join(jobs, jobs.c.id == dq.c.job_id)
            .where(dq.c.status == QueueStatus.PENDING.value, sa.or_(dq.c.expires_at.is_(None), dq.c.expires_at >= now))
        )
        if postgres:
            labels = sa.type_coerce(dq.c.runs_on_labels, postgresql.JSONB)
            excluded = sa.type_coerce(dq.c.exclude_labels, postgresql.JSONB)
            agent_labels = sa.bindparam("agent_labels", list(agent.labels), type_=postgresql.JSONB)
            query = query.where(agent_labels.contains(labels))
            if agent.taints:
                query = query.where(labels.contains(sa.bindparam("taints", list(agent.taints), type_=postgresql.JSONB)))
            if agent.labels:
                label_array = sa.bindparam("label_array", list(agent.labels), type_=postgresql.ARRAY(sa.Text))
                query = query.where(sa.not_(excluded.has_any(label_array)))
        if after is not None:
            query = query.where(sa.tuple_(dq.c.created_at, dq.c.id) > sa.tuple_(*after))
        batch = list(await conn.execute(query.order_by(dq.c.created_at, dq.c.id).limit(CLAIM_BATCH)))
        if not batch:
            return None
        after = (batch[-1].created_at, batch[-1].id)
        candidates = [row.id for row in batch if _routes(agent, row)]
        while candidates:
            lock = (
                sa.select(dq.c.id, dq.c.job_id, dq.c.run_id, dq.c.dispatch_attempts)
                .where(dq.c.id.in_(candidates), dq.c.status == QueueStatus.PENDING.value)
                .order_by(dq.c.created_at, dq.c.id)
                .limit(1)
            )
            if postgres:
                lock = lock.with_for_update(skip_locked=True)
            row = (await conn.execute(lock)).first()
            if row is None:
                break  # every candidate was taken (or is being taken) by another claimer
            candidates.remove(row.id)
            claim = await _take(conn, row, agent, ack_timeout_ms=ack_timeout_ms, now=now)
            if claim is not None:
                return claim


async def _take(
    conn: AsyncConnection, row: Any, agent: AgentSlot, *, ack_timeout_ms: int, now: dt.datetime
) -> Claim | None:
    dq = dispatch_queue
    attempt = int(row.dispatch_attempts) + 1
    updated = await conn.execute(
        dq.update()
        .where(dq.c.id == row.id, dq.c.status == QueueStatus.PENDING.value)
        .values(
            status=QueueStatus.DISPATCHED.value,
            agent_id=agent.agent_id,
            dispatch_attempts=attempt,
            ack_deadline=now + dt.timedelta(milliseconds=ack_timeout_ms),
            dispatched_at=now,
        )
    )
    if updated.rowcount != 1:
        return None
    job = await conn.execute(
        jobs.update()
        .where(jobs.c.id == row.job_id, jobs.c.status == JobState.QUEUED.value)
        .values(agent_id=agent.agent_id)
    )
    if job.rowcount != 1:
        # the job left `queued` without its row (should not happen): retire the row, look further
        await conn.execute(
            dq.update()
            .where(dq.c.id == row.id)
            .values(status=QueueStatus.EXPIRED.value, agent_id=None, ack_deadline=None)
        )
        return None
    return Claim(queue_id=str(row.id), job_id=str(row.job_id), run_id=str(row.run_id), attempt=attempt)


@dataclass(frozen=True)
class PendingRow:
    """A pending, unexpired queue row with its job's routing, as the dispatcher matches it to agents, and
    what a `job.dispatch` needs of the job (so handing it out reads nothing more)."""

    queue_id: str
    job_id: str
    run_id: str
    runs_on: list[LabelMatcher]
    exclude_labels: list[LabelMatcher]
    name: str = ""
    job: str = ""
    matrix: dict[str, Any] | None = None
    queued_at: dt.datetime | None = None

    def routes_to(self, agent: AgentSlot) -> bool:
        return job_matches_agent(self.runs_on, self.exclude_labels, agent.labels, agent.taints)


async def pending_rows(conn: AsyncConnection, *, limit: int) -> list[PendingRow]:
    """Up to `limit` pending, unexpired rows, oldest first (a plain read: claiming is `claim_row_in`)."""
    now = utcnow()
    dq = dispatch_queue
    query = (
        sa.select(
            dq.c.id, dq.c.job_id, dq.c.run_id, jobs.c.runs_on, jobs.c.exclude_labels, jobs.c.name, jobs.c.job,
            jobs.c.matrix, jobs.c.queued_at,
        )
        .join(jobs, jobs.c.id == dq.c.job_id)
        .where(dq.c.status == QueueStatus.PENDING.value, sa.or_(dq.c.expires_at.is_(None), dq.c.expires_at >= now))
        .order_by(dq.c.created_at, dq.c.id)
        .limit(max(1, limit))
    )
    return [
        PendingRow(
            str(r.id), str(r.job_id), str(r.run_id), _matchers(r.runs_on), _matchers(r.exclude_labels),
            name=str(r.name), job=str(r.job), matrix=r.matrix, queued_at=r.queued_at,
        )
        for r in await conn.execute(query)
    ]


# On PostgreSQL a row another node is claiming at this moment (its transaction holds the row lock) is
# skipped, not waited for: the waiter would find it taken anyway, and meanwhile it held up every claim batched
# in its transaction (nodes read the same oldest rows). SQLite has one writer at a time and no row locks:
# there the clause renders as nothing.
_UNLOCKED_ROW = (
    sa.select(dispatch_queue.c.id)
    .where(dispatch_queue.c.id == sa.bindparam("v_queue_id"))
    .with_for_update(skip_locked=True)
    .scalar_subquery()
)
_CLAIM_ROW = (
    dispatch_queue.update()
    .where(dispatch_queue.c.id == _UNLOCKED_ROW, dispatch_queue.c.status == QueueStatus.PENDING.value)
    .values(
        status=QueueStatus.DISPATCHED.value,
        agent_id=sa.bindparam("v_agent", type_=sa.Text),
        dispatch_attempts=dispatch_queue.c.dispatch_attempts + 1,
        ack_deadline=sa.bindparam("v_deadline", type_=dispatch_queue.c.ack_deadline.type),
        dispatched_at=sa.bindparam("v_now", type_=dispatch_queue.c.dispatched_at.type),
    )
    .returning(dispatch_queue.c.dispatch_attempts)
)
_CLAIM_JOB = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("v_job_id"), jobs.c.status == JobState.QUEUED.value)
    .values(agent_id=sa.bindparam("v_agent", type_=sa.Text))
)


async def claim_row_in(
    conn: AsyncConnection, row: PendingRow, agent: AgentSlot, *, ack_timeout_ms: int
) -> Claim | None:
    """Claim one row the caller already matched to `agent`, in the caller's transaction; None when
    another claimer (or a cancel, or the expiry sweep) got to it first. The conditional update makes a
    double claim impossible. (Statements built once: this runs for every job.)"""
    now = utcnow()
    updated = await conn.execute(_CLAIM_ROW, {
        "v_queue_id": row.queue_id, "v_agent": agent.agent_id,
        "v_deadline": now + dt.timedelta(milliseconds=ack_timeout_ms), "v_now": now,
    })
    attempt = updated.scalar_one_or_none()
    if attempt is None:
        return None
    job = await conn.execute(_CLAIM_JOB, {"v_job_id": row.job_id, "v_agent": agent.agent_id})
    if job.rowcount != 1:  # the job left `queued` without its row (should not happen): retire the row
        await conn.execute(
            dispatch_queue.update().where(dispatch_queue.c.id == row.queue_id).values(
                status=QueueStatus.EXPIRED.value, agent_id=None, ack_deadline=None
            )
        )
        return None
    return Claim(queue_id=row.queue_id, job_id=row.job_id, run_id=row.run_id, attempt=int(attempt))


# -- acks --------------------------------------------------------------------------------------------


async def ack(conn: AsyncConnection, job_id: str, agent_id: str) -> bool:
    """`job.ack` from the agent the job was dispatched to: the ack deadline is cleared. False for a
    duplicate, a foreign agent, or a row no longer dispatched."""
    result = await conn.execute(
        dispatch_queue.update()
        .where(
            dispatch_queue.c.job_id == job_id,
            dispatch_queue.c.agent_id == agent_id,
            dispatch_queue.c.status == QueueStatus.DISPATCHED.value,
            dispatch_queue.c.ack_deadline.is_not(None),
        )
        .values(ack_deadline=None)
    )
    return result.rowcount == 1


async def _requeue(conn: AsyncConnection, job_id: str, agent_id: str | None, from_status: QueueStatus) -> bool:
    conditions = [dispatch_queue.c.job_id == job_id, dispatch_queue.c.status == from_status.value]
    if agent_id is not None:
        conditions.append(dispatch_queue.c.agent_id == agent_id)
    result = await conn.execute(
        dispatch_queue.update()
        .where(*conditions)
        .values(
            status=QueueStatus.PENDING.value,
            agent_id=None,
            ack_deadline=None,
            recovery_deadline=None,
            dispatched_at=None,
        )
    )
    if result.rowcount != 1:
        return False
    await conn.execute(
        jobs.update().where(jobs.c.id == job_id, jobs.c.status == JobState.QUEUED.value).values(agent_id=None)
    )
    return True


async def reject(
    conn: AsyncConnection,
    job_id: str,
    agent_id: str,
    *,
    max_attempts: int | None = None,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    transient: bool = False,
) -> Literal["requeued", "failed"] | None:
    """`job.reject` (busy, draining, unsupported): the row goes back to `pending` in its original place in
    line, the agent is cleared — or, once the job was handed out `max_attempts` times, the job fails. None
    for a foreign agent or a row not dispatched (or a job already started).

    `transient` (the agent was busy or draining, or the dispatch never reached it: a state of the agent, not
    of the job): the job goes back in line and never fails for it, whatever its attempt count. Around
    reconnects agents' slot counts are briefly wrong and sends fail, and five such hand-outs used to fail a
    job that never ran."""
    row = (
        await conn.execute(
            sa.select(dispatch_queue.c.dispatch_attempts)
            .join(jobs, jobs.c.id == dispatch_queue.c.job_id)
            .where(
                dispatch_queue.c.job_id == job_id,
                dispatch_queue.c.agent_id == agent_id,
                dispatch_queue.c.status == QueueStatus.DISPATCHED.value,
                jobs.c.status == JobState.QUEUED.value,
            )
        )
    ).first()
    if row is None:
        return None
    if transient:  # numbered like any hand-out (deliveries stay distinguishable), but never the job's end
        return "requeued" if await _requeue(conn, job_id, agent_id, QueueStatus.DISPATCHED) else None
    if max_attempts is not None and int(row.dispatch_attempts) >= max_attempts:
        error = f"rejected by agents on all {row.dispatch_attempts} dispatch attempts"
        failed = await run_store.finish_job(
            conn, job_id, JobState.FAILED, JobEvent.FAIL, error=error, failure_category="dispatch", limits=limits
        )
        return "failed" if failed else None
    return "requeued" if await _requeue(conn, job_id, agent_id, QueueStatus.DISPATCHED) else None


async def find_expired_acks(conn: AsyncConnection, *, now: dt.datetime) -> list[tuple[str, str]]:
    """`(job_id, agent_id)` of dispatches whose ack deadline passed (the caller closes those agents with
    4031 before `requeue_expired_acks`)."""
    rows = await conn.execute(
        sa.select(dispatch_queue.c.job_id, dispatch_queue.c.agent_id)
        .where(
            dispatch_queue.c.status == QueueStatus.DISPATCHED.value,
            dispatch_queue.c.ack_deadline.is_not(None),
            dispatch_queue.c.ack_deadline < now,
        )
        .order_by(dispatch_queue.c.created_at)
    )
    return [(str(r.job_id), str(r.agent_id)) for r in rows]


async def requeue_expired_acks(
    conn: AsyncConnection, *, now: dt.datetime, max_attempts: int, limits: QueueLimits = DEFAULT_QUEUE_LIMITS
) -> tuple[list[str], list[str]]:
    """Dispatches not acknowledged in time: requeued, or — after `max_attempts` attempts — the job fails
    ("dispatch not acknowledged after N attempts") and its run is settled. Returns (requeued, failed)."""
    rows = await conn.execute(
        sa.select(dispatch_queue.c.job_id, dispatch_queue.c.agent_id, dispatch_queue.c.dispatch_attempts)
        .where(
            dispatch_queue.c.status == QueueStatus.DISPATCHED.value,
            dispatch_queue.c.ack_deadline.is_not(None),
            dispatch_queue.c.ack_deadline < now,
        )
        .order_by(dispatch_queue.c.created_at)
    )
    requeued: list[str] = []
    failed: list[str] = []
    for row in list(rows):
        job_id = str(row.job_id)
        await run_store.lock_job(conn, job_id)
        if int(row.dispatch_attempts) >= max_attempts:
            error = f"dispatch not acknowledged after {row.dispatch_attempts} attempts"
            if await run_store.finish_job(
                conn, job_id, JobState.FAILED, JobEvent.FAIL, error=error, failure_category="dispatch", limits=limits
            ):
                failed.append(job_id)
        elif await _requeue(conn, job_id, row.agent_id, QueueStatus.DISPATCHED):
            requeued.append(job_id)
    return requeued, failed


# -- expiry, depth, listing ----------------------------------------------------------------------------


async def expire_queue(
    conn: AsyncConnection, *, now: dt.datetime, limits: QueueLimits = DEFAULT_QUEUE_LIMITS
) -> list[str]:
    """Pending rows past `expires_at`: row `expired`, job `timed_out_stale`, run settled. The job ids."""
    rows = await conn.execute(
        sa.select(dispatch_queue.c.id, dispatch_queue.c.job_id)
        .where(
            dispatch_queue.c.status == QueueStatus.PENDING.value,  # (lock order: run, row, job)
            dispatch_queue.c.expires_at.is_not(None),
            dispatch_queue.c.expires_at < now,
        )
        .order_by(dispatch_queue.c.created_at)
    )
    expired: list[str] = []
    for row in list(rows):
        await run_store.lock_job(conn, str(row.job_id))
        result = await conn.execute(
            dispatch_queue.update()
            .where(dispatch_queue.c.id == row.id, dispatch_queue.c.status == QueueStatus.PENDING.value)
            .values(status=QueueStatus.EXPIRED.value)
        )
        if result.rowcount != 1:
            continue
        if await run_store.finish_job(
            conn,
            str(row.job_id),
            JobState.TIMED_OUT_STALE,
            JobEvent.STALE,
            error="queue timeout: no matching agent took the job in time",
            failure_category="queue_timeout",
            limits=limits,
        ):
            expired.append(str(row.job_id))
    return expired


queue_depth = run_store.queue_depth


async def list_queue(
    conn: AsyncConnection,
    *,
    org_id: str = DEFAULT_ORG_ID,
    limit: int = 100,
    statuses: Sequence[str] = (QueueStatus.PENDING.value, QueueStatus.DISPATCHED.value, QueueStatus.RECOVERING.value),
) -> list[QueueRecord]:
    """Active queue rows (pending, dispatched, recovering by default), oldest first, with the job name,
    workflow and repository."""
    query = (
        sa.select(dispatch_queue, jobs.c.name.label("job_name"), runs.c.workflow, runs.c.repo)
        .join(jobs, jobs.c.id == dispatch_queue.c.job_id)
        .join(runs, runs.c.id == dispatch_queue.c.run_id)
        .where(dispatch_queue.c.org_id == org_id, dispatch_queue.c.status.in_(list(statuses)))
        .order_by(dispatch_queue.c.created_at, dispatch_queue.c.id)
        .limit(max(0, limit))
    )
    return [QueueRecord.model_validate(dict(row._mapping)) for row in await conn.execute(query)]


# -- agent disconnect and recovery ----------------------------------------------------------------------


async def agents_holding_jobs(conn: AsyncConnection, agent_ids: Sequence[str]) -> set[str]:
    """Which of these agents hold queue rows (`dispatched` to them or `recovering` for them): the ones a
    registration must reclaim or settle jobs for (`reclaim`); one statement for all."""
    if not agent_ids:
        return set()
    held = (QueueStatus.RECOVERING.value, QueueStatus.DISPATCHED.value)
    rows = await conn.execute(
        sa.select(dispatch_queue.c.agent_id).distinct()
        .where(dispatch_queue.c.agent_id.in_(list(agent_ids)), dispatch_queue.c.status.in_(held))
    )
    return {str(row.agent_id) for row in rows}


async def release_agent_jobs(conn: AsyncConnection, agent_id: str, *, recovery_deadline: dt.datetime) -> list[str]:
    """The agent disconnected: its running jobs go `recovering`, and the queue rows of everything it held
    (started or only dispatched) go `recovering` until `recovery_deadline`. The job ids."""
    rows = await conn.execute(
        sa.select(dispatch_queue.c.job_id, jobs.c.status)
        .join(jobs, jobs.c.id == dispatch_queue.c.job_id)
        .where(dispatch_queue.c.agent_id == agent_id, dispatch_queue.c.status == QueueStatus.DISPATCHED.value)
        .order_by(dispatch_queue.c.created_at)
    )
    released: list[str] = []
    for row in list(rows):
        job_id = str(row.job_id)
        await run_store.lock_job(conn, job_id)
        if row.status == JobState.RUNNING.value:
            await set_job_status(conn, job_id, JobState.RECOVERING, JobEvent.RECOVER, owned_by=agent_id)
        elif row.status != JobState.QUEUED.value:
            continue  # cancelling: the agent still owes the outcome; the stale sweep covers it
        result = await conn.execute(
            dispatch_queue.update()
            .where(dispatch_queue.c.job_id == job_id, dispatch_queue.c.status == QueueStatus.DISPATCHED.value)
            .values(status=QueueStatus.RECOVERING.value, recovery_deadline=recovery_deadline, ack_deadline=None)
        )
        if result.rowcount == 1:
            released.append(job_id)
    return released


async def reclaim(
    conn: AsyncConnection,
    agent_id: str,
    job_ids: Sequence[str],
    *,
    release_missing: bool = True,
    limits: QueueLimits = DEFAULT_QUEUE_LIMITS,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """The agent (re)registered reporting `job_ids` in flight: those of its recovering jobs resume
    (`recovering → running`, row `dispatched`), and those still `dispatched` to it (a reconnect that
    replaced a connection before its loss was noticed) stay. With `release_missing`, its other jobs are
    settled now instead of at the window's end: never started → requeued, started → failed. With `labels`
    (the agent's labels now), a reported job whose `runs_on`/`exclude_labels` they no longer satisfy is
    settled the same way instead of reclaimed. The ids reclaimed."""
    held = (QueueStatus.RECOVERING.value, QueueStatus.DISPATCHED.value)
    rows = await conn.execute(
        sa.select(dispatch_queue.c.job_id, dispatch_queue.c.status.label("row_status"), jobs.c.status,
                  jobs.c.runs_on, jobs.c.exclude_labels)
        .join(jobs, jobs.c.id == dispatch_queue.c.job_id)
        .where(dispatch_queue.c.agent_id == agent_id, dispatch_queue.c.status.in_(held))
    )
    wanted = set(job_ids)
    reclaimed: list[str] = []
    for row in list(rows):
        job_id = str(row.job_id)
        await run_store.lock_job(conn, job_id)
        # the agent's labels may have changed since the dispatch: a job it no longer qualifies for is not
        # handed back (its outcome could not be trusted to have run where the workflow asked)
        fits = labels is None or job_matches_agent(_matchers(row.runs_on), _matchers(row.exclude_labels), labels)
        if job_id in wanted and not fits:
            if row.status == JobState.QUEUED.value:
                await _requeue(conn, job_id, agent_id, QueueStatus(row.row_status))
            else:
                await run_store.finish_job(
                    conn, job_id, JobState.FAILED, JobEvent.FAIL,
                    error="the agent reconnected without the labels this job runs on", failure_category="agent_lost",
                    limits=limits,
                )
        elif job_id in wanted:
            if row.status == JobState.RECOVERING.value:
                await set_job_status(conn, job_id, JobState.RUNNING, JobEvent.START, owned_by=agent_id)
            # the agent just said it holds the job: as good as a heartbeat. Without this its stale clock runs
            # from the last heartbeat before the disconnect until the next one after it
            await run_store.touch_heartbeat(conn, job_id, agent_id, utcnow())
            # the agent holding the job is as good as its ack: an ack deadline left from before the reconnect
            # (the ack may have died with a previous orchestrator process) must not requeue a job it runs
            await conn.execute(
                dispatch_queue.update()
                .where(dispatch_queue.c.job_id == job_id, dispatch_queue.c.status.in_(held))
                .values(status=QueueStatus.DISPATCHED.value, recovery_deadline=None, ack_deadline=None)
            )
            reclaimed.append(job_id)
        elif release_missing:
            if row.status == JobState.QUEUED.value:
                await _requeue(conn, job_id, agent_id, QueueStatus(row.row_status))
            else:
                await run_store.finish_job(
                    conn, job_id, JobState.FAILED, JobEvent.FAIL,
                    error="the agent reconnected without this job", failure_category="agent_lost", limits=limits,
                )
    return reclaimed


REVOKED_TOKEN_ERROR = "the agent's token was revoked"


async def settle_revoked_agents(
    conn: AsyncConnection, agent_ids: Sequence[str], *, limits: QueueLimits = DEFAULT_QUEUE_LIMITS
) -> tuple[list[str], list[str]]:
    """The agents' token was revoked: what they held can never be reported by them again. Jobs not yet
    started go back to the queue; started ones (running, recovering, cancelling) fail. (requeued, failed)."""
    if not agent_ids:
        return [], []
    held = (QueueStatus.RECOVERING.value, QueueStatus.DISPATCHED.value)
    rows = await conn.execute(
        sa.select(dispatch_queue.c.job_id, dispatch_queue.c.agent_id, dispatch_queue.c.status.label("row_status"),
                  jobs.c.status)
        .join(jobs, jobs.c.id == dispatch_queue.c.job_id)
        .where(dispatch_queue.c.agent_id.in_(list(agent_ids)), dispatch_queue.c.status.in_(held))
        .order_by(dispatch_queue.c.created_at)
    )
    requeued: list[str] = []
    failed: list[str] = []
    for row in list(rows):
        job_id = str(row.job_id)
        await run_store.lock_job(conn, job_id)
        if row.status == JobState.QUEUED.value:
            if await _requeue(conn, job_id, str(row.agent_id), QueueStatus(row.row_status)):
                requeued.append(job_id)
        elif await run_store.finish_job(
            conn, job_id, JobState.FAILED, JobEvent.FAIL, error=REVOKED_TOKEN_ERROR, failure_category="agent_lost",
            limits=limits,
        ):
            failed.append(job_id)
    return requeued, failed


async def settle_unrecovered(
    conn: AsyncConnection, *, now: dt.datetime, limits: QueueLimits = DEFAULT_QUEUE_LIMITS
) -> tuple[list[str], list[str]]:
    """Recovery windows that ended. A job its agent had started fails ("recovery timeout exceeded"), its
    row `failed`, the run settled; a job it never started (still `queued`: dispatched, perhaps never even
    received) goes back to the queue — nothing of it ran, so there is nothing to recover and no reason to
    fail it. (failed, requeued) job ids."""
    rows = await conn.execute(
        sa.select(dispatch_queue.c.job_id, jobs.c.status)
        .join(jobs, jobs.c.id == dispatch_queue.c.job_id)
        .where(
            dispatch_queue.c.status == QueueStatus.RECOVERING.value,
            dispatch_queue.c.recovery_deadline.is_not(None),
            dispatch_queue.c.recovery_deadline < now,
        )
        .order_by(dispatch_queue.c.created_at)
    )
    failed: list[str] = []
    requeued: list[str] = []
    for row in list(rows):
        job_id = str(row.job_id)
        await run_store.lock_job(conn, job_id)
        if row.status == JobState.QUEUED.value:
            if await _requeue(conn, job_id, None, QueueStatus.RECOVERING):
                requeued.append(job_id)
        elif await run_store.finish_job(
            conn, job_id, JobState.FAILED, JobEvent.FAIL,
            error=RECOVERY_TIMEOUT_ERROR, failure_category="agent_lost", limits=limits,
        ):
            failed.append(job_id)
    return failed, requeued
