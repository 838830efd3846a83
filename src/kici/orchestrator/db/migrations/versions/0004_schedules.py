"""Schedules: the `schedule()` triggers registered from the lock file on each source's default branch,
with their durable next and last fire times.

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("source_id", sa.Text, sa.ForeignKey("sources.id", ondelete="CASCADE"), nullable=False),
        sa.Column("repo", sa.Text, nullable=False),
        sa.Column("workflow", sa.Text, nullable=False),
        sa.Column("trigger_index", sa.Integer, nullable=False),
        sa.Column("cron", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),
        sa.Column("branch", sa.Text, nullable=False),
        sa.Column("inputs", JSON, nullable=False),
        sa.Column("lock_commit", sa.Text, nullable=False),
        sa.Column("next_fire_at", TS, nullable=False),
        sa.Column("last_fired_at", TS, nullable=True),
        sa.Column("last_run_id", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint(
            "source_id", "repo", "workflow", "trigger_index",
            name="uq_schedules_source_id_repo_workflow_trigger_index",
        ),
    )
    op.create_index("ix_schedules_next_fire_at", "schedules", ["next_fire_at"])


def downgrade() -> None:
    op.drop_index("ix_schedules_next_fire_at", table_name="schedules")
    op.drop_table("schedules")
