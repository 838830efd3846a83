"""Test reports: one `test_report_files` row per JUnit XML file a job sent (`job(..., test_reports=[...])`)
with its counts or the reason it was not read, its content in the blob store under
`test-reports/<run id>/<job id>/<file id>`; one `test_results` row per test case it holds
(kici.orchestrator.test_reports).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
RESULT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "test_report_files",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.Text, nullable=True),
        sa.Column("blob_key", sa.Text, nullable=True),
        sa.Column("passed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("duration_ms", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("job_id", "path", name="uq_test_report_files_job_id_path"),
    )
    op.create_index("ix_test_report_files_run_id", "test_report_files", ["run_id"])
    op.create_table(
        "test_results",
        sa.Column("id", RESULT_ID, primary_key=True, autoincrement=True),
        sa.Column("file_id", sa.Text, sa.ForeignKey("test_report_files.id", ondelete="CASCADE"), nullable=False),
        sa.Column("run_id", sa.Text, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("suite", sa.Text, nullable=True),
        sa.Column("classname", sa.Text, nullable=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("duration_ms", sa.BigInteger, nullable=True),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("details", sa.Text, nullable=True),
        sa.Column("file", sa.Text, nullable=True),
        sa.Column("line", sa.Integer, nullable=True),
        sa.CheckConstraint("status IN ('passed', 'failed', 'error', 'skipped')", name="status"),
    )
    op.create_index("ix_test_results_run_id_status", "test_results", ["run_id", "status"])
    op.create_index("ix_test_results_job_id", "test_results", ["job_id"])
    op.create_index("ix_test_results_file_id", "test_results", ["file_id"])


def downgrade() -> None:
    op.drop_index("ix_test_results_file_id", table_name="test_results")
    op.drop_index("ix_test_results_job_id", table_name="test_results")
    op.drop_index("ix_test_results_run_id_status", table_name="test_results")
    op.drop_table("test_results")
    op.drop_index("ix_test_report_files_run_id", table_name="test_report_files")
    op.drop_table("test_report_files")
