"""Secret deliveries: one row each time dispatch sends a job the secrets it declares — the run, the job,
the dispatch attempt and, for each name, the scope its value came from. Never a value.

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "secret_deliveries",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("secrets", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_secret_deliveries_run_id", "secret_deliveries", ["run_id"])
    op.create_index("ix_secret_deliveries_job_id", "secret_deliveries", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_secret_deliveries_job_id", table_name="secret_deliveries")
    op.drop_index("ix_secret_deliveries_run_id", table_name="secret_deliveries")
    op.drop_table("secret_deliveries")
