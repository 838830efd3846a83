"""The orchestrator's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

This module is what the queries in `kici.orchestrator.store` are written against. The migrations in
`migrations/versions/` create the same schema with frozen definitions; a test compares the two on both
databases, so a change here without a migration (or the other way round) fails CI.

Conventions:
- Ids are UUID text (`new_id()`), except `orgs.id`, a short slug that appears in webhook URLs.
- Every tenant table has `org_id` (default org `default`): multi-org comes later, but the ids are here now.
- Timestamps are timezone-aware UTC on both databases (`UtcDateTime`).
- Status columns carry CHECK constraints listing their values, so no code path can write a state the
  engine's state machine does not know.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from kici.engine.states import JobState, RunStatus

DEFAULT_ORG_ID = "default"


class AdminRole(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    AUDITOR = "auditor"
    VIEWER = "viewer"


class SourceKind(StrEnum):
    GIT = "git"
    GITHUB = "github"
    GENERIC = "generic"


class EventLogStatus(StrEnum):
    RECEIVED = "received"
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    LOCKFILE_MISSING = "lockfile_missing"
    LOCKFILE_CORRUPT = "lockfile_corrupt"
    FILTERED = "filtered"
    FAILED = "failed"


class ConcurrencyScope(StrEnum):
    """What a concurrency group limits: whole runs (workflow `concurrency`) or single jobs
    (job `concurrency_group`). The two are separate namespaces."""

    RUN = "run"
    JOB = "job"


class EnvironmentGateStatus(StrEnum):
    """Where a job stands at its deployment environment's gate (`environment_gates.status`)."""

    APPROVAL = "approval"
    """Waiting for reviewers' approvals."""
    TIMER = "timer"
    """Approved (or no approvals needed): waiting for the environment's wait timer."""
    PASSED = "passed"
    """Through the gate: the job goes on to the environment's one-deployment-at-a-time group."""
    REJECTED = "rejected"


class ConcurrencyState(StrEnum):
    """A run's or job's place in its concurrency group: `waiting → holding → released` (or straight to
    `released` when it ends while waiting)."""

    WAITING = "waiting"
    HOLDING = "holding"
    RELEASED = "released"


class QueueStatus(StrEnum):
    """`pending → dispatched → completed | failed`; `dispatched ↔ recovering → failed`; `pending → expired`."""

    PENDING = "pending"
    DISPATCHED = "dispatched"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    RECOVERING = "recovering"


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in and out, on both databases.

    PostgreSQL's `timestamptz` already round-trips aware values; SQLite stores text and hands back naive
    ones. Rejecting naive input catches local-time bugs at the first write instead of in a report.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime written to the database; use an aware UTC datetime")
        value = value.astimezone(dt.UTC)
        # SQLite compares timestamps as text: store them uniformly (naive UTC) so ordering is correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


JSON_TYPE: sa.types.TypeEngine[Any] = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
"""JSON on SQLite, JSONB on PostgreSQL (containment queries and GIN indexes for label routing)."""


def _check_in(column: str, values: type[StrEnum], name: str | None = None) -> sa.CheckConstraint:
    listed = ", ".join(f"'{v.value}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=name or column)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _org_id() -> sa.Column[str]:
    return sa.Column(
        "org_id",
        sa.Text,
        sa.ForeignKey("orgs.id", ondelete="CASCADE"),
        nullable=False,
        server_default=sa.text(f"'{DEFAULT_ORG_ID}'"),
    )


def _created_at() -> sa.Column[dt.datetime]:
    return sa.Column("created_at", UtcDateTime, nullable=False, default=utcnow)


orgs = sa.Table(
    "orgs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    _created_at(),
)

sources = sa.Table(
    "sources",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("config", JSON_TYPE, nullable=False, default=dict),
    sa.Column("secrets", sa.LargeBinary, nullable=True),  # AES-256-GCM blob under the secret key
    _created_at(),
    sa.Column("updated_at", UtcDateTime, nullable=False, default=utcnow),
    sa.UniqueConstraint("org_id", "name"),
    _check_in("kind", SourceKind),
)

admin_tokens = sa.Table(
    "admin_tokens",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("token_hash", sa.Text, nullable=False, unique=True),  # SHA-256 hex; the token is never stored
    _created_at(),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("expires_at", UtcDateTime, nullable=True),  # None: never; past it the token is refused like a revoked one
    _check_in("role", AdminRole),
)

agent_tokens = sa.Table(
    "agent_tokens",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("labels", JSON_TYPE, nullable=False, default=list),  # the labels an agent may claim
    sa.Column("token_hash", sa.Text, nullable=False, unique=True),
    _created_at(),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    # whether its agents may run job steps as root (an agent running as root without a step user)
    sa.Column("allow_root_steps", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Column("expires_at", UtcDateTime, nullable=True),  # None: never
)

dedup_cache = sa.Table(
    "dedup_cache",
    metadata,
    sa.Column("delivery_id", sa.Text, primary_key=True),
    _org_id(),
    _created_at(),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Index(None, "expires_at"),
)

event_log = sa.Table(
    "event_log",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("delivery_id", sa.Text, nullable=False),
    sa.Column("source_id", sa.Text, nullable=True),  # no FK: the log outlives a removed source
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("event", sa.Text, nullable=True),
    sa.Column("action", sa.Text, nullable=True),
    sa.Column("repo", sa.Text, nullable=True),
    sa.Column("ref", sa.Text, nullable=True),
    sa.Column("sha", sa.Text, nullable=True),
    sa.Column("status", sa.Text, nullable=False, default=EventLogStatus.RECEIVED.value),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("matched_count", sa.Integer, nullable=False, default=0),
    _created_at(),
    sa.Column("processed_at", UtcDateTime, nullable=True),
    sa.UniqueConstraint("org_id", "delivery_id"),
    sa.Index(None, "org_id", "created_at"),
    sa.Index(None, "created_at"),  # the retention sweep
    _check_in("status", EventLogStatus),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("workflow", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, default=RunStatus.PENDING.value),
    sa.Column("repo", sa.Text, nullable=False),
    sa.Column("ref", sa.Text, nullable=True),
    sa.Column("sha", sa.Text, nullable=False),
    sa.Column("event", JSON_TYPE, nullable=False, default=dict),  # the normalized kici.engine Event
    sa.Column("delivery_id", sa.Text, nullable=True),
    sa.Column("source_id", sa.Text, nullable=True),
    sa.Column("lock_content_hash", sa.Text, nullable=True),
    sa.Column("workflow_content_hash", sa.Text, nullable=True),
    sa.Column("parent_run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("original_run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("cancelled_by", sa.Text, nullable=True),
    sa.Column("failure_reason", sa.Text, nullable=True),
    sa.Column("timeout_ms", sa.BigInteger, nullable=True),
    # The run's workflow as in the lock file at its commit (camelCase lock-file JSON): what dispatch needs
    # (file, export, jobs, env, timeouts) and what a rerun replays, without fetching the lock file again.
    sa.Column("workflow_spec", JSON_TYPE, nullable=True),
    # Where the run's progress is reported (GitHub check runs, notification URLs), decided once when the
    # run is created (`kici.orchestrator.reporting.targets`); NULL: nowhere, and no outbox row is written.
    sa.Column("reporting", JSON_TYPE, nullable=True),
    # Workflow `concurrency`: the group the run joined at creation (no FK: see `concurrency_groups`), its
    # place in it, and why it waits ("concurrency: <group>") while it does.
    sa.Column("concurrency_group_id", sa.Text, nullable=True),
    sa.Column("concurrency_state", sa.Text, nullable=True),
    sa.Column("wait_reason", sa.Text, nullable=True),
    # What the source's trust policy decided for the run's event (`RunTrust`), and whether dispatch may
    # resolve the secrets its jobs declare (false for untrusted code unless the policy allows it).
    sa.Column("trust", sa.Text, nullable=False, server_default="trusted"),
    sa.Column("secrets_allowed", sa.Boolean, nullable=False, server_default=sa.true()),
    # A run the trust policy held (`status` held): why, when the sweeper expires the hold, and when it was
    # approved (its workflow timeout counts from then) (0011).
    sa.Column("hold_reason", sa.Text, nullable=True),
    sa.Column("hold_expires_at", UtcDateTime, nullable=True),
    sa.Column("approved_at", UtcDateTime, nullable=True),
    _created_at(),
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    # What the runs list filters on, copied from the event at creation (the event JSON is not indexable
    # the same way on both databases): the branch (a PR's head branch) and the event type ("trigger").
    sa.Column("branch", sa.Text, nullable=True),
    sa.Column("trigger", sa.Text, nullable=True),
    sa.Index(None, "org_id", "created_at"),
    sa.Index(None, "org_id", "status", "created_at"),
    sa.Index(None, "finished_at"),  # the retention sweep
    sa.Index(None, "repo", "sha"),
    sa.Index(None, "delivery_id"),
    # the runs list's filters (store.runs.find_runs): each one an index ending in the page order
    sa.Index(None, "org_id", "workflow", "created_at"),
    sa.Index(None, "org_id", "repo", "created_at"),
    sa.Index(None, "org_id", "branch", "created_at"),
    sa.Index(None, "org_id", "source_id", "created_at"),
    sa.Index(None, "org_id", "sha"),
    sa.Index(None, "concurrency_group_id", "concurrency_state", "created_at"),
    _check_in("status", RunStatus),
    _check_in("concurrency_state", ConcurrencyState),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    _org_id(),
    sa.Column("name", sa.Text, nullable=False),  # unique per run: the lock job name plus matrix suffix
    sa.Column("job", sa.Text, nullable=False),  # the job's name in the lock file
    sa.Column("matrix", JSON_TYPE, nullable=True),
    sa.Column("status", sa.Text, nullable=False, default=JobState.PENDING.value),
    sa.Column("agent_id", sa.Text, nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False, default=1),
    sa.Column("needs_satisfied", sa.Boolean, nullable=False, default=False),
    sa.Column("outputs", JSON_TYPE, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("failure_category", sa.Text, nullable=True),
    sa.Column("runs_on", JSON_TYPE, nullable=False, default=list),
    sa.Column("exclude_labels", JSON_TYPE, nullable=False, default=list),
    sa.Column("last_heartbeat_at", UtcDateTime, nullable=True),
    # Job `concurrency_group`, as on runs.
    sa.Column("concurrency_group_id", sa.Text, nullable=True),
    sa.Column("concurrency_state", sa.Text, nullable=True),
    sa.Column("wait_reason", sa.Text, nullable=True),
    # The deployment environment the job deploys to, resolved once when the run was created (a lambda
    # `environment=` evaluated against the event); None: no environment.
    sa.Column("environment", sa.Text, nullable=True),
    _created_at(),
    sa.Column("queued_at", UtcDateTime, nullable=True),
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.UniqueConstraint("run_id", "name"),
    sa.Index(None, "status", "last_heartbeat_at"),  # the stale-job sweep
    sa.Index(None, "agent_id"),
    sa.Index(None, "concurrency_group_id", "concurrency_state", "created_at"),
    _check_in("status", JobState),
    _check_in("concurrency_state", ConcurrencyState),
)

job_needs = sa.Table(
    "job_needs",
    metadata,
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("job_name", sa.Text, primary_key=True),
    sa.Column("upstream_name", sa.Text, primary_key=True),
    sa.Column("run_on", JSON_TYPE, nullable=False, default=list),  # upstream statuses that let job_name run
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("step_index", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=True),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("duration_ms", sa.BigInteger, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("log_bytes", sa.BigInteger, nullable=False, default=0),
)

dispatch_queue = sa.Table(
    "dispatch_queue",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, unique=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    _org_id(),
    sa.Column("status", sa.Text, nullable=False, default=QueueStatus.PENDING.value),
    sa.Column("runs_on_labels", JSON_TYPE, nullable=False, default=list),
    sa.Column("exclude_labels", JSON_TYPE, nullable=False, default=list),
    sa.Column("agent_id", sa.Text, nullable=True),
    sa.Column("dispatch_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("ack_deadline", UtcDateTime, nullable=True),
    sa.Column("recovery_deadline", UtcDateTime, nullable=True),
    sa.Column("expires_at", UtcDateTime, nullable=True),
    _created_at(),
    sa.Column("dispatched_at", UtcDateTime, nullable=True),
    sa.Index(None, "status", "created_at"),  # the claim: oldest pending first
    sa.Index(None, "agent_id"),
    sa.Index(None, "run_id"),
    _check_in("status", QueueStatus),
)

concurrency_groups = sa.Table(
    "concurrency_groups",
    metadata,
    # One row per group ever used: the row every change to the group's members locks first (`SELECT …
    # FOR UPDATE`), so admissions and releases of one group are serialized across orchestrators. Rows
    # are tiny and kept (a group name is a branch or environment name); runs and jobs reference them by
    # id without a foreign key so neither side's deletion has to care about the other.
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("repo", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("max_running", sa.Integer, nullable=False, default=1),
    _created_at(),
    sa.UniqueConstraint("org_id", "scope", "repo", "name"),
    _check_in("scope", ConcurrencyScope),
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column(
        "agent_token_id", sa.Text, sa.ForeignKey("agent_tokens.id", ondelete="SET NULL"), nullable=True
    ),
    sa.Column("labels", JSON_TYPE, nullable=False, default=list),
    sa.Column("max_concurrency", sa.Integer, nullable=False, default=1),
    sa.Column("version", sa.Text, nullable=True),
    sa.Column("hostname", sa.Text, nullable=True),
    sa.Column("connected", sa.Boolean, nullable=False, default=False),
    # the agent's last `agent.status` said it is draining (finishing its jobs, taking no new ones);
    # cleared when it registers again
    sa.Column("draining", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Column("last_seen_at", UtcDateTime, nullable=True),
    sa.Column("registered_at", UtcDateTime, nullable=False, default=utcnow),
    # the orchestrator node holding the agent's connection (`nodes.id`, no foreign key: a dead node's row
    # is deleted by the survivor that takes its agents over, in the same transaction)
    sa.Column("node_id", sa.Text, nullable=True),
    sa.Index(None, "connected"),
    sa.Index(None, "node_id"),
)

git_refs = sa.Table(
    "git_refs",
    metadata,
    # the branch heads a polled git source had at its last poll: what the next poll compares against
    sa.Column("source_id", sa.Text, sa.ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("ref", sa.Text, primary_key=True),
    sa.Column("sha", sa.Text, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False, default=utcnow),
)

schedules = sa.Table(
    "schedules",
    metadata,
    # one `schedule()` trigger registered from the lock file on a source's default branch
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("source_id", sa.Text, sa.ForeignKey("sources.id", ondelete="CASCADE"), nullable=False),
    sa.Column("repo", sa.Text, nullable=False),  # a GitHub source serves several repositories
    sa.Column("workflow", sa.Text, nullable=False),
    sa.Column("trigger_index", sa.Integer, nullable=False),  # the trigger's position in the workflow's `triggers`
    sa.Column("cron", sa.Text, nullable=False),
    sa.Column("timezone", sa.Text, nullable=False),
    sa.Column("branch", sa.Text, nullable=False),  # the default branch the registration was read from
    sa.Column("inputs", JSON_TYPE, nullable=False, default=dict),
    sa.Column("lock_commit", sa.Text, nullable=False),  # the commit whose lock file registered it
    sa.Column("next_fire_at", UtcDateTime, nullable=False),
    sa.Column("last_fired_at", UtcDateTime, nullable=True),  # the cron slot of the last fire
    sa.Column("last_run_id", sa.Text, nullable=True),  # no FK: runs may be purged, the schedule stays
    _created_at(),
    sa.Column("updated_at", UtcDateTime, nullable=False, default=utcnow),
    sa.UniqueConstraint("source_id", "repo", "workflow", "trigger_index"),
    sa.Index(None, "next_fire_at"),  # the scheduler's tick reads only due rows
)


dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    # A dashboard sign-in: the browser holds an opaque secret (cookie); only its SHA-256 is stored. A
    # session lives no longer than its admin token (CASCADE, and sign-ins check `revoked_at` of both).
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("token_id", sa.Text, sa.ForeignKey("admin_tokens.id", ondelete="CASCADE"), nullable=False),
    sa.Column("session_hash", sa.Text, nullable=False, unique=True),
    _created_at(),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("last_seen_at", UtcDateTime, nullable=True),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("client", sa.Text, nullable=True),
    sa.Column("user_agent", sa.Text, nullable=True),
    sa.Index(None, "token_id"),
    sa.Index(None, "expires_at"),
)


class AuditOutcome(StrEnum):
    DENIED = "denied"
    ALLOWED = "allowed"


audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("action", sa.Text, nullable=False),  # `admin.request` for API calls; more kinds come later
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=True),  # the HTTP status answered
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("token_id", sa.Text, nullable=True),  # no FK: the trail outlives a deleted token
    sa.Column("role", sa.Text, nullable=True),
    sa.Column("permission", sa.Text, nullable=True),
    sa.Column("method", sa.Text, nullable=True),
    sa.Column("path", sa.Text, nullable=True),
    sa.Column("client", sa.Text, nullable=True),
    # who did it (`token:<id>`, `github:<login>`, `system`) and what it changed (`secret:NAME@SCOPE`, `run:ID`, …)
    sa.Column("actor", sa.Text, nullable=True),
    sa.Column("target", sa.Text, nullable=True),
    _created_at(),
    # aggregated unauthenticated denials: one row per client and window, `count` incremented, `last_at` the
    # latest; `aggregate_key` (`denied:401:<client>:<window start>`) is what concurrent denials meet on
    sa.Column("count", sa.Integer, nullable=False, default=1, server_default="1"),
    sa.Column("last_at", UtcDateTime, nullable=True),
    sa.Column("aggregate_key", sa.Text, nullable=True, unique=True),
    sa.Index(None, "org_id", "created_at"),
    sa.Index(None, "created_at"),  # the retention sweep
    _check_in("outcome", AuditOutcome),
)


class ReportStatus(StrEnum):
    """`pending → sent`; `pending → failed` (gave up; `kici-admin reports retry` makes it pending again)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class ReportKind(StrEnum):
    CHECK_RUN = "check_run"
    NOTIFICATION = "notification"


_OUTBOX_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only

report_outbox = sa.Table(
    "report_outbox",
    metadata,
    # the id orders the rows of one ordering key: a row is sent only after every earlier one of its key
    sa.Column("id", _OUTBOX_ID, primary_key=True, autoincrement=True),
    _org_id(),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("ordering_key", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.Text, nullable=True),
    sa.Column("event", sa.Text, nullable=False),  # queued / in_progress / completed; run.finished / job.finished
    sa.Column("target", sa.Text, nullable=True),  # a notification's URL
    sa.Column("delivery_id", sa.Text, nullable=False, default=new_id),  # the receiver's idempotency key
    sa.Column("status", sa.Text, nullable=False, default=ReportStatus.PENDING.value),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", UtcDateTime, nullable=False, default=utcnow),
    sa.Column("claimed_until", UtcDateTime, nullable=True),  # a worker's lease on the row's ordering key
    sa.Column("claimed_by", sa.Text, nullable=True),
    sa.Column("first_failed_at", UtcDateTime, nullable=True),  # the give-up clock starts here
    sa.Column("last_error", sa.Text, nullable=True),
    _created_at(),
    sa.Column("sent_at", UtcDateTime, nullable=True),
    sa.Index(None, "status", "ordering_key", "id"),
    sa.Index(None, "run_id"),
    _check_in("status", ReportStatus),
    _check_in("kind", ReportKind),
)

github_check_runs = sa.Table(
    "github_check_runs",
    metadata,
    # the check run GitHub created for a job (`external_id` = the job id), so later updates PATCH it
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("repo", sa.Text, nullable=False),
    sa.Column("check_run_id", sa.BigInteger, nullable=False),
    _created_at(),
    sa.Index(None, "run_id"),
)


scoped_secrets = sa.Table(
    "scoped_secrets",
    metadata,
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("scope", sa.Text, nullable=False),  # `org`, `repo:<owner/name>` or `env:<environment>`
    sa.Column("name", sa.Text, nullable=False),
    # AES-256-GCM under the secret key, associated data `secret:{org}:{scope}:{name}` (kici.orchestrator.crypto)
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("key_id", sa.Text, nullable=False),  # which key sealed `value` (crypto.key_id); rotation's work list
    sa.Column("fingerprint", sa.Text, nullable=False),  # HMAC of the value under a key derived from the secret key
    sa.Column("created_by", sa.Text, nullable=True),  # admin token id; no FK: the row outlives a deleted token
    sa.Column("updated_by", sa.Text, nullable=True),
    _created_at(),
    sa.Column("updated_at", UtcDateTime, nullable=False, default=utcnow),
    sa.UniqueConstraint("org_id", "scope", "name"),
    sa.Index(None, "key_id"),
)


environments = sa.Table(
    "environments",
    metadata,
    # A deployment environment (`kici-admin environment create`): which refs may deploy to it, who must
    # approve, how long to wait after approval, and plain variables handed to its jobs. Its secrets are
    # `scoped_secrets` rows with scope `env:<name>`.
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("branches", JSON_TYPE, nullable=False, default=list),  # globs; both lists empty: every ref
    sa.Column("tags", JSON_TYPE, nullable=False, default=list),
    sa.Column("required_approvals", sa.Integer, nullable=False, default=0),
    # who may approve: admin-token roles (`owner`, `admin`) and GitHub author associations (`OWNER`, …)
    sa.Column("reviewer_roles", JSON_TYPE, nullable=False, default=list),
    sa.Column("reviewer_users", JSON_TYPE, nullable=False, default=list),  # `token:<id>` / `github:<login>`
    sa.Column("prevent_self_review", sa.Boolean, nullable=False, default=False),
    sa.Column("wait_timer_s", sa.Integer, nullable=False, default=0),
    sa.Column("variables", JSON_TYPE, nullable=False, default=dict),
    sa.Column("created_by", sa.Text, nullable=True),
    sa.Column("updated_by", sa.Text, nullable=True),
    _created_at(),
    sa.Column("updated_at", UtcDateTime, nullable=False, default=utcnow),
    sa.UniqueConstraint("org_id", "name"),
)

environment_gates = sa.Table(
    "environment_gates",
    metadata,
    # One job's passage through its environment's gate, created when the job becomes ready: approvals
    # recorded so far (who, role, when), then the wait timer, then `passed` (or `rejected`).
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    _org_id(),
    sa.Column("environment", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("approvals_required", sa.Integer, nullable=False),
    sa.Column("approvals", JSON_TYPE, nullable=False, default=list),
    sa.Column("ready_at", UtcDateTime, nullable=True),  # the wait timer's end, once approved
    sa.Column("decided_by", sa.Text, nullable=True),  # who rejected
    sa.Column("reason", sa.Text, nullable=True),
    _created_at(),
    sa.Column("updated_at", UtcDateTime, nullable=False, default=utcnow),
    sa.Index(None, "run_id"),
    sa.Index(None, "org_id", "environment", "status"),
    sa.Index(None, "status", "ready_at"),
    _check_in("status", EnvironmentGateStatus),
)


artifacts = sa.Table(
    "artifacts",
    metadata,
    # a file a job uploaded (kici.orchestrator.artifacts); its content is the blob `blob_key`
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("path", sa.Text, nullable=False),  # relative to the job's workspace, `/`-separated
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("content_type", sa.Text, nullable=False),
    sa.Column("blob_key", sa.Text, nullable=False),
    _created_at(),
    sa.UniqueConstraint("job_id", "path"),
    sa.Index(None, "run_id", "path"),
)

secret_deliveries = sa.Table(
    "secret_deliveries",
    metadata,
    # each dispatch that sent a job the secrets it declares: which names, from which scope; never values
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),  # the dispatch attempt the secrets went out with
    sa.Column("secrets", JSON_TYPE, nullable=False),  # {name: scope}, e.g. {"PYPI_TOKEN": "repo:acme/app"}
    _created_at(),
    sa.Index(None, "run_id"),
    sa.Index(None, "job_id"),
)


class TestStatus(StrEnum):
    """A test's outcome in a JUnit report (kici.engine.junit)."""

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    SKIPPED = "skipped"


test_report_files = sa.Table(
    "test_report_files",
    metadata,
    # one JUnit XML file a job sent (kici.orchestrator.test_reports): its counts, or why it was not read
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("path", sa.Text, nullable=False),  # relative to the job's workspace, `/`-separated
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=True),  # null when the file was refused before it was read
    sa.Column("blob_key", sa.Text, nullable=True),  # the file as sent; null when refused
    sa.Column("passed", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),
    sa.Column("skipped", sa.Integer, nullable=False, default=0),
    sa.Column("duration_ms", sa.BigInteger, nullable=False, default=0),  # the sum of its tests' times
    sa.Column("error", sa.Text, nullable=True),  # not read: malformed, refused (DTD, size); no results then
    _created_at(),
    sa.UniqueConstraint("job_id", "path"),
    sa.Index(None, "run_id"),
)

_TEST_RESULT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only

test_results = sa.Table(
    "test_results",
    metadata,
    # one test case of a report file; the id keeps the file's order
    sa.Column("id", _TEST_RESULT_ID, primary_key=True, autoincrement=True),
    sa.Column("file_id", sa.Text, sa.ForeignKey("test_report_files.id", ondelete="CASCADE"), nullable=False),
    sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("suite", sa.Text, nullable=True),
    sa.Column("classname", sa.Text, nullable=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("duration_ms", sa.BigInteger, nullable=True),
    sa.Column("message", sa.Text, nullable=True),
    sa.Column("details", sa.Text, nullable=True),  # e.g. the traceback, truncated
    sa.Column("file", sa.Text, nullable=True),  # the test's source file and line, when the report says
    sa.Column("line", sa.Integer, nullable=True),
    sa.Index(None, "run_id", "status"),
    sa.Index(None, "job_id"),
    sa.Index(None, "file_id"),
    _check_in("status", TestStatus),
)


log_chunks = sa.Table(
    "log_chunks",
    metadata,
    # job log chunks as agents sent them, not yet sealed into a segment blob (kici.orchestrator.storage.logs);
    # no foreign keys: a chunk is written in batches with other jobs' and must never fail on its neighbours
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),  # the agent's per-job chunk number: a replay is stored once
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("first_line", sa.Integer, nullable=False),  # 1-based number of the chunk's first line
    sa.Column("line_count", sa.Integer, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),  # -1: job setup output
    sa.Column("lines", sa.Text, nullable=False),  # a JSON array of strings
    _created_at(),
    sa.Index(None, "run_id"),
    sa.Index(None, "created_at"),
)

log_segments = sa.Table(
    "log_segments",
    metadata,
    # sealed runs of chunks: the blob `blob_key` holds them as NDJSON records, in seq order
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("first_seq", sa.Integer, primary_key=True),
    sa.Column("last_seq", sa.Integer, nullable=False),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("first_line", sa.Integer, nullable=False),
    sa.Column("line_count", sa.Integer, nullable=False),
    sa.Column("byte_size", sa.BigInteger, nullable=False),
    sa.Column("blob_key", sa.Text, nullable=False),
    _created_at(),
    sa.Index(None, "run_id"),
)

rate_limit_windows = sa.Table(
    "rate_limit_windows",
    metadata,
    # request counts per key and one-minute window, shared by every orchestrator (generic webhooks)
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("window_start", sa.BigInteger, primary_key=True),  # Unix minute (seconds // 60)
    sa.Column("hits", sa.Integer, nullable=False),
)


caches = sa.Table(
    "caches",
    metadata,
    # a saved job cache (kici.orchestrator.caches); its archive is the blob `blob_key`
    sa.Column("id", sa.Text, primary_key=True, default=new_id),
    _org_id(),
    # no FK; empty for runs without a source
    sa.Column("source_id", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("repo", sa.Text, nullable=False),  # owner/name, as on runs
    sa.Column("namespace", sa.Text, nullable=False),  # `trusted`, or `untrusted:<ref>` (held-then-approved runs)
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("blob_key", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, nullable=True),  # the run that saved it (no FK: caches outlive runs)
    _created_at(),
    sa.Column("last_used_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("org_id", "source_id", "repo", "namespace", "key"),
    sa.Index(None, "org_id", "repo", "last_used_at"),
    sa.Index(None, "last_used_at"),  # age eviction
)
nodes = sa.Table(
    "nodes",
    metadata,
    # one row per live orchestrator process (KICI_NODE_NAME), its lease renewed as a heartbeat
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("incarnation", sa.Text, nullable=False),  # a fresh id per process start
    sa.Column("address", sa.Text, nullable=True),  # where peers and operators reach it (KICI_NODE_ADDRESS)
    sa.Column("version", sa.Text, nullable=True),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("lease_expires_at", UtcDateTime, nullable=False),
    sa.Index(None, "lease_expires_at"),
)

leader_lease = sa.Table(
    "leader_lease",
    metadata,
    # one row ("leader", seeded by the migration): who runs the leader duties, under which fencing term
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=True),
    sa.Column("term", sa.BigInteger, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("acquired_at", UtcDateTime, nullable=True),
)

_EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

cluster_events = sa.Table(
    "cluster_events",
    metadata,
    # durable messages of the cross-node bus (kici.orchestrator.cluster.bus), polled by every node; pruned
    sa.Column("id", _EVENT_ID, primary_key=True, autoincrement=True),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("payload", JSON_TYPE, nullable=False),
    sa.Column("origin", sa.Text, nullable=False),  # the publishing node
    _created_at(),
    sa.Index(None, "created_at"),
)


VERSION_TABLE = "kici_schema_version"
"""Alembic's bookkeeping table, renamed so a database shared with another Alembic app does not clash."""
