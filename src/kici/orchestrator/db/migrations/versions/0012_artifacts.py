"""Job artifacts: one row per file a job uploaded (`job(..., artifacts=[...])`, `ctx.upload_artifact`), its
content in the blob store under `artifacts/<run id>/<job id>/<artifact id>` (kici.orchestrator.artifacts).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("blob_key", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("job_id", "path", name="uq_artifacts_job_id_path"),
    )
    op.create_index("ix_artifacts_run_id_path", "artifacts", ["run_id", "path"])


def downgrade() -> None:
    op.drop_index("ix_artifacts_run_id_path", table_name="artifacts")
    op.drop_table("artifacts")
