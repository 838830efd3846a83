"""Audit trail and retention: tokens that expire (`admin_tokens.expires_at`, `agent_tokens.expires_at`),
aggregated unauthenticated denials (`audit_log.count`, `audit_log.last_at` and the unique
`audit_log.aggregate_key` that concurrent denials of one client and window meet on), and the indexes the
retention sweep walks (`runs.finished_at`, `event_log.created_at`, `audit_log.created_at`).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("admin_tokens") as batch:
        batch.add_column(sa.Column("expires_at", TS, nullable=True))
    with op.batch_alter_table("agent_tokens") as batch:
        batch.add_column(sa.Column("expires_at", TS, nullable=True))
    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("count", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("last_at", TS, nullable=True))
        batch.add_column(sa.Column("aggregate_key", sa.Text, nullable=True))
        batch.create_unique_constraint("uq_audit_log_aggregate_key", ["aggregate_key"])
    op.create_index("ix_audit_log_created_at", "audit_log", ["created_at"])
    op.create_index("ix_event_log_created_at", "event_log", ["created_at"])
    op.create_index("ix_runs_finished_at", "runs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_finished_at", table_name="runs")
    op.drop_index("ix_event_log_created_at", table_name="event_log")
    op.drop_index("ix_audit_log_created_at", table_name="audit_log")
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_constraint("uq_audit_log_aggregate_key", type_="unique")
        batch.drop_column("aggregate_key")
        batch.drop_column("last_at")
        batch.drop_column("count")
    with op.batch_alter_table("agent_tokens") as batch:
        batch.drop_column("expires_at")
    with op.batch_alter_table("admin_tokens") as batch:
        batch.drop_column("expires_at")
