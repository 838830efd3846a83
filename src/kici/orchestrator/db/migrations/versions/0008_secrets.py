"""Scoped secrets: the orchestrator's secret store (`kici-admin secret set|list|delete`), each value sealed
with AES-256-GCM under the secret key and tagged with the id of the key that sealed it (key rotation).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "scoped_secrets",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=True),
        sa.Column("updated_by", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("org_id", "scope", "name", name="uq_scoped_secrets_org_id_scope_name"),
    )
    op.create_index("ix_scoped_secrets_key_id", "scoped_secrets", ["key_id"])


def downgrade() -> None:
    op.drop_index("ix_scoped_secrets_key_id", table_name="scoped_secrets")
    op.drop_table("scoped_secrets")
