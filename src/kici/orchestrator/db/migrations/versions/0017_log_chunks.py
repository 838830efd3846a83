"""Job logs any orchestrator can serve: `log_chunks` (chunks not yet sealed), `log_segments` (sealed runs of
chunks, each a blob in the blob store) and `rate_limit_windows` (generic-webhook rate limits shared by every
orchestrator on the database).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "log_chunks",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("first_line", sa.Integer, nullable=False),
        sa.Column("line_count", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("lines", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_log_chunks_run_id", "log_chunks", ["run_id"])
    op.create_index("ix_log_chunks_created_at", "log_chunks", ["created_at"])
    op.create_table(
        "log_segments",
        sa.Column("job_id", sa.Text, primary_key=True),
        sa.Column("first_seq", sa.Integer, primary_key=True),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("first_line", sa.Integer, nullable=False),
        sa.Column("line_count", sa.Integer, nullable=False),
        sa.Column("byte_size", sa.BigInteger, nullable=False),
        sa.Column("blob_key", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_log_segments_run_id", "log_segments", ["run_id"])
    op.create_table(
        "rate_limit_windows",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("window_start", sa.BigInteger, primary_key=True),
        sa.Column("hits", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_windows")
    op.drop_index("ix_log_segments_run_id", table_name="log_segments")
    op.drop_table("log_segments")
    op.drop_index("ix_log_chunks_created_at", table_name="log_chunks")
    op.drop_index("ix_log_chunks_run_id", table_name="log_chunks")
    op.drop_table("log_chunks")
