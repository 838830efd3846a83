"""Job caches: one row per saved cache entry — its repository (source and owner/name), namespace (`trusted`,
or the `untrusted:<ref>` of held-then-approved runs), key, the blob holding its archive, size and when it
was saved and last restored (kici.orchestrator.caches).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "caches",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("source_id", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("repo", sa.Text, nullable=False),
        sa.Column("namespace", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("blob_key", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=False),
        sa.UniqueConstraint("org_id", "source_id", "repo", "namespace", "key",
                            name="uq_caches_org_id_source_id_repo_namespace_key"),
    )
    op.create_index("ix_caches_org_id_repo_last_used_at", "caches", ["org_id", "repo", "last_used_at"])
    op.create_index("ix_caches_last_used_at", "caches", ["last_used_at"])


def downgrade() -> None:
    op.drop_index("ix_caches_last_used_at", table_name="caches")
    op.drop_index("ix_caches_org_id_repo_last_used_at", table_name="caches")
    op.drop_table("caches")
