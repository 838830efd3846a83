"""Reporting: the run's reporting targets, the reporting outbox, and the job → GitHub check run mapping.

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)
OUTBOX_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("reporting", JSON, nullable=True))
    op.create_table(
        "report_outbox",
        sa.Column("id", OUTBOX_ID, primary_key=True, autoincrement=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("ordering_key", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job_id", sa.Text, nullable=True),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=True),
        sa.Column("delivery_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("claimed_until", TS, nullable=True),
        sa.Column("claimed_by", sa.Text, nullable=True),
        sa.Column("first_failed_at", TS, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("sent_at", TS, nullable=True),
        sa.CheckConstraint("status IN ('pending', 'sent', 'failed')", name="status"),
        sa.CheckConstraint("kind IN ('check_run', 'notification')", name="kind"),
    )
    op.create_index("ix_report_outbox_status_ordering_key_id", "report_outbox", ["status", "ordering_key", "id"])
    op.create_index("ix_report_outbox_run_id", "report_outbox", ["run_id"])
    op.create_table(
        "github_check_runs",
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("repo", sa.Text, nullable=False),
        sa.Column("check_run_id", sa.BigInteger, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_github_check_runs_run_id", "github_check_runs", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_github_check_runs_run_id", table_name="github_check_runs")
    op.drop_table("github_check_runs")
    op.drop_index("ix_report_outbox_run_id", table_name="report_outbox")
    op.drop_index("ix_report_outbox_status_ordering_key_id", table_name="report_outbox")
    op.drop_table("report_outbox")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("reporting")
