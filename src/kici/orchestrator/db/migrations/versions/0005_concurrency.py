"""Concurrency groups: the `concurrency_groups` lock rows, and each run's and job's place in its group
(`concurrency_group_id`, `concurrency_state`, `wait_reason`).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
_STATES = "concurrency_state IN ('waiting', 'holding', 'released')"


def upgrade() -> None:
    op.create_table(
        "concurrency_groups",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("repo", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("max_running", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("org_id", "scope", "repo", "name"),
        sa.CheckConstraint("scope IN ('run', 'job')", name="scope"),
    )
    for table in ("runs", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("concurrency_group_id", sa.Text, nullable=True))
            batch.add_column(sa.Column("concurrency_state", sa.Text, nullable=True))
            batch.add_column(sa.Column("wait_reason", sa.Text, nullable=True))
            batch.create_check_constraint("concurrency_state", _STATES)
            batch.create_index(
                f"ix_{table}_concurrency_group_id_concurrency_state_created_at",
                ["concurrency_group_id", "concurrency_state", "created_at"],
            )


def downgrade() -> None:
    for table in ("jobs", "runs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_concurrency_group_id_concurrency_state_created_at")
            batch.drop_constraint(f"ck_{table}_concurrency_state", type_="check")
            batch.drop_column("wait_reason")
            batch.drop_column("concurrency_state")
            batch.drop_column("concurrency_group_id")
    op.drop_table("concurrency_groups")
