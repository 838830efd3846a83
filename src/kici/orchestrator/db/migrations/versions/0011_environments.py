"""Deployment environments: `environments` (allowed refs, reviewers, wait timer, variables), each job's
resolved `jobs.environment`, and `environment_gates`, one job's passage through its environment's gate.

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _org_id() -> sa.Column[str]:
    return sa.Column(
        "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
        server_default=sa.text("'default'"),
    )


def upgrade() -> None:
    op.create_table(
        "environments",
        sa.Column("id", sa.Text, primary_key=True),
        _org_id(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("branches", JSON, nullable=False),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("required_approvals", sa.Integer, nullable=False),
        sa.Column("reviewer_roles", JSON, nullable=False),
        sa.Column("reviewer_users", JSON, nullable=False),
        sa.Column("prevent_self_review", sa.Boolean, nullable=False),
        sa.Column("wait_timer_s", sa.Integer, nullable=False),
        sa.Column("variables", JSON, nullable=False),
        sa.Column("created_by", sa.Text, nullable=True),
        sa.Column("updated_by", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("org_id", "name", name="uq_environments_org_id_name"),
    )
    op.create_table(
        "environment_gates",
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        _org_id(),
        sa.Column("environment", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("approvals_required", sa.Integer, nullable=False),
        sa.Column("approvals", JSON, nullable=False),
        sa.Column("ready_at", TS, nullable=True),
        sa.Column("decided_by", sa.Text, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("status IN ('approval', 'timer', 'passed', 'rejected')", name="status"),
    )
    op.create_index("ix_environment_gates_run_id", "environment_gates", ["run_id"])
    op.create_index("ix_environment_gates_org_id_environment_status", "environment_gates",
                    ["org_id", "environment", "status"])
    op.create_index("ix_environment_gates_status_ready_at", "environment_gates", ["status", "ready_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("environment", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("environment")
    op.drop_index("ix_environment_gates_status_ready_at", table_name="environment_gates")
    op.drop_index("ix_environment_gates_org_id_environment_status", table_name="environment_gates")
    op.drop_index("ix_environment_gates_run_id", table_name="environment_gates")
    op.drop_table("environment_gates")
    op.drop_table("environments")
