"""Clustering: the `nodes` table (one row per live orchestrator process, renewed as a lease), the leader
lease with its fencing term (one row, seeded here), the `cluster_events` table behind the cross-node bus's
polling fallback, and `agents.node_id` (the node holding the agent's connection).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("incarnation", sa.Text, nullable=False),
        sa.Column("address", sa.Text, nullable=True),
        sa.Column("version", sa.Text, nullable=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("lease_expires_at", TS, nullable=False),
    )
    op.create_index("ix_nodes_lease_expires_at", "nodes", ["lease_expires_at"])
    lease = op.create_table(
        "leader_lease",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=True),
        sa.Column("term", sa.BigInteger, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("acquired_at", TS, nullable=True),
    )
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    if op.get_context().dialect.name == "sqlite":
        epoch = epoch.replace(tzinfo=None)  # SQLite keeps naive UTC text (see schema.UtcDateTime)
    op.bulk_insert(lease, [{"name": "leader", "holder": None, "term": 0, "expires_at": epoch, "acquired_at": None}])
    op.create_table(
        "cluster_events",
        sa.Column("id", EVENT_ID, primary_key=True, autoincrement=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("origin", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_cluster_events_created_at", "cluster_events", ["created_at"])
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("node_id", sa.Text, nullable=True))
        batch.create_index("ix_agents_node_id", ["node_id"])


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.drop_index("ix_agents_node_id")
        batch.drop_column("node_id")
    op.drop_index("ix_cluster_events_created_at", table_name="cluster_events")
    op.drop_table("cluster_events")
    op.drop_table("leader_lease")
    op.drop_index("ix_nodes_lease_expires_at", table_name="nodes")
    op.drop_table("nodes")
