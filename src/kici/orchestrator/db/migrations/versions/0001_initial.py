"""Initial schema: orgs, sources, tokens, dedup and event log, runs, jobs, needs, steps, queue, agents.

Definitions are frozen here on purpose (no imports from `schema.py`): a migration must keep creating
exactly what it created when it shipped. A test checks that the migrated database matches `schema.py`.
Constraint and index names come from the metadata naming convention of `schema.py` (Alembic applies
the target metadata's convention to `op` objects), which is part of the schema contract.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)

JOB_STATES = (
    "pending", "queued", "running", "recovering", "cancelling", "held", "waiting",
    "success", "failed", "cancelled", "skipped", "timed_out_stale", "drift_dropped",
)
RUN_STATUSES = ("pending", "running", "cancelling", "held", "success", "failed", "cancelled")
EVENT_LOG_STATUSES = (
    "received", "processed", "duplicate", "lockfile_missing", "lockfile_corrupt", "filtered", "failed",
)
QUEUE_STATUSES = ("pending", "dispatched", "completed", "failed", "expired", "recovering")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _org_id() -> sa.Column[str]:
    return sa.Column(
        "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
        server_default=sa.text("'default'"),
    )


def upgrade() -> None:
    op.create_table(
        "orgs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    # The default org exists from the start: every tenant row references it until multi-org arrives.
    op.execute("INSERT INTO orgs (id, name, created_at) VALUES ('default', 'default', CURRENT_TIMESTAMP)")

    op.create_table(
        "sources",
        sa.Column("id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("config", JSON, nullable=False),
        sa.Column("secrets", sa.LargeBinary, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("org_id", "name"),
        sa.CheckConstraint(_in("kind", ("git", "github", "generic")), name="kind"),
    )
    op.create_table(
        "admin_tokens",
        sa.Column("id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.CheckConstraint(_in("role", ("owner", "admin", "auditor")), name="role"),
    )
    op.create_table(
        "agent_tokens",
        sa.Column("id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
    )
    op.create_table(
        "dedup_cache",
        sa.Column("delivery_id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
    )
    op.create_index("ix_dedup_cache_expires_at", "dedup_cache", ["expires_at"])

    op.create_table(
        "event_log",
        sa.Column("id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column("delivery_id", sa.Text, nullable=False),
        sa.Column("source_id", sa.Text, nullable=True),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("event", sa.Text, nullable=True),
        sa.Column("action", sa.Text, nullable=True),
        sa.Column("repo", sa.Text, nullable=True),
        sa.Column("ref", sa.Text, nullable=True),
        sa.Column("sha", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("matched_count", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("processed_at", TS, nullable=True),
        sa.UniqueConstraint("org_id", "delivery_id"),
        sa.CheckConstraint(_in("status", EVENT_LOG_STATUSES), name="status"),
    )
    op.create_index("ix_event_log_org_id_created_at", "event_log", ["org_id", "created_at"])

    op.create_table(
        "runs",
        sa.Column("id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column("workflow", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("repo", sa.Text, nullable=False),
        sa.Column("ref", sa.Text, nullable=True),
        sa.Column("sha", sa.Text, nullable=False),
        sa.Column("event", JSON, nullable=False),
        sa.Column("delivery_id", sa.Text, nullable=True),
        sa.Column("source_id", sa.Text, nullable=True),
        sa.Column("lock_content_hash", sa.Text, nullable=True),
        sa.Column("workflow_content_hash", sa.Text, nullable=True),
        sa.Column("parent_run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("original_run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("cancelled_by", sa.Text, nullable=True),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("timeout_ms", sa.BigInteger, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint(_in("status", RUN_STATUSES), name="status"),
    )
    op.create_index("ix_runs_org_id_created_at", "runs", ["org_id", "created_at"])
    op.create_index("ix_runs_org_id_status_created_at", "runs", ["org_id", "status", "created_at"])
    op.create_index("ix_runs_repo_sha", "runs", ["repo", "sha"])
    op.create_index("ix_runs_delivery_id", "runs", ["delivery_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        _org_id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("job", sa.Text, nullable=False),
        sa.Column("matrix", JSON, nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("needs_satisfied", sa.Boolean, nullable=False),
        sa.Column("outputs", JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("failure_category", sa.Text, nullable=True),
        sa.Column("runs_on", JSON, nullable=False),
        sa.Column("exclude_labels", JSON, nullable=False),
        sa.Column("last_heartbeat_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("queued_at", TS, nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.UniqueConstraint("run_id", "name"),
        sa.CheckConstraint(_in("status", JOB_STATES), name="status"),
    )
    op.create_index("ix_jobs_status_last_heartbeat_at", "jobs", ["status", "last_heartbeat_at"])
    op.create_index("ix_jobs_agent_id", "jobs", ["agent_id"])

    op.create_table(
        "job_needs",
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("job_name", sa.Text, primary_key=True),
        sa.Column("upstream_name", sa.Text, primary_key=True),
        sa.Column("run_on", JSON, nullable=False),
    )
    op.create_table(
        "steps",
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("step_index", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("duration_ms", sa.BigInteger, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("log_bytes", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "dispatch_queue",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, unique=True),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        _org_id(),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("runs_on_labels", JSON, nullable=False),
        sa.Column("exclude_labels", JSON, nullable=False),
        sa.Column("agent_id", sa.Text, nullable=True),
        sa.Column("dispatch_attempts", sa.Integer, nullable=False),
        sa.Column("ack_deadline", TS, nullable=True),
        sa.Column("recovery_deadline", TS, nullable=True),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("dispatched_at", TS, nullable=True),
        sa.CheckConstraint(_in("status", QUEUE_STATUSES), name="status"),
    )
    op.create_index("ix_dispatch_queue_status_created_at", "dispatch_queue", ["status", "created_at"])
    op.create_index("ix_dispatch_queue_agent_id", "dispatch_queue", ["agent_id"])
    op.create_index("ix_dispatch_queue_run_id", "dispatch_queue", ["run_id"])

    op.create_table(
        "agents",
        sa.Column("id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column(
            "agent_token_id", sa.Text, sa.ForeignKey("agent_tokens.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("version", sa.Text, nullable=True),
        sa.Column("hostname", sa.Text, nullable=True),
        sa.Column("connected", sa.Boolean, nullable=False),
        sa.Column("last_seen_at", TS, nullable=True),
        sa.Column("registered_at", TS, nullable=False),
    )
    op.create_index("ix_agents_connected", "agents", ["connected"])


def downgrade() -> None:
    for table in (
        "agents", "dispatch_queue", "steps", "job_needs", "jobs", "runs", "event_log", "dedup_cache",
        "agent_tokens", "admin_tokens", "sources", "orgs",
    ):
        op.drop_table(table)
