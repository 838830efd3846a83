"""Dispatch, polling and audit: the run's workflow spec (what dispatch and rerun need), the branch heads
of polled git sources, and the audit log.

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("workflow_spec", JSON, nullable=True))
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("token_id", sa.Text, nullable=True),
        sa.Column("role", sa.Text, nullable=True),
        sa.Column("permission", sa.Text, nullable=True),
        sa.Column("method", sa.Text, nullable=True),
        sa.Column("path", sa.Text, nullable=True),
        sa.Column("client", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("outcome IN ('denied', 'allowed')", name="outcome"),
    )
    op.create_index("ix_audit_log_org_id_created_at", "audit_log", ["org_id", "created_at"])
    op.create_table(
        "git_refs",
        sa.Column("source_id", sa.Text, sa.ForeignKey("sources.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("ref", sa.Text, primary_key=True),
        sa.Column("sha", sa.Text, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("git_refs")
    op.drop_index("ix_audit_log_org_id_created_at", table_name="audit_log")
    op.drop_table("audit_log")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("workflow_spec")
