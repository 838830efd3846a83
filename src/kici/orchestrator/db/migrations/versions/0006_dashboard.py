"""The dashboard: the `viewer` role, dashboard sign-in sessions, and what the runs list filters on
(`runs.branch`, `runs.trigger`, copied from the event, plus one index per filter).

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
_ROLES_BEFORE = ("owner", "admin", "auditor")
_ROLES_AFTER = ("owner", "admin", "auditor", "viewer")
_RUN_INDEXES = {
    "ix_runs_org_id_workflow_created_at": ["org_id", "workflow", "created_at"],
    "ix_runs_org_id_repo_created_at": ["org_id", "repo", "created_at"],
    "ix_runs_org_id_branch_created_at": ["org_id", "branch", "created_at"],
    "ix_runs_org_id_source_id_created_at": ["org_id", "source_id", "created_at"],
    "ix_runs_org_id_sha": ["org_id", "sha"],
}


def _roles_check(roles: tuple[str, ...]) -> str:
    return "role IN (" + ", ".join(f"'{r}'" for r in roles) + ")"


def _set_roles(roles: tuple[str, ...]) -> None:
    # SQLite cannot alter a CHECK constraint: batch mode copies the table with the new one.
    with op.batch_alter_table("admin_tokens") as batch:
        batch.drop_constraint("role", type_="check")
        batch.create_check_constraint("role", sa.text(_roles_check(roles)))


def upgrade() -> None:
    _set_roles(_ROLES_AFTER)
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("branch", sa.Text, nullable=True))
        batch.add_column(sa.Column("trigger", sa.Text, nullable=True))
    # Existing runs: the branch and event type from the stored event (JSON operators differ per database).
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE runs SET branch = event->>'branch', \"trigger\" = event->>'type'")
    else:
        op.execute(
            "UPDATE runs SET branch = json_extract(event, '$.branch'), \"trigger\" = json_extract(event, '$.type')"
        )
    for name, columns in _RUN_INDEXES.items():
        op.create_index(name, "runs", columns)
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column(
            "org_id", sa.Text, sa.ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False,
            server_default=sa.text("'default'"),
        ),
        sa.Column("token_id", sa.Text, sa.ForeignKey("admin_tokens.id", ondelete="CASCADE"), nullable=False),
        sa.Column("session_hash", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("client", sa.Text, nullable=True),
        sa.Column("user_agent", sa.Text, nullable=True),
    )
    op.create_index("ix_dashboard_sessions_token_id", "dashboard_sessions", ["token_id"])
    op.create_index("ix_dashboard_sessions_expires_at", "dashboard_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_dashboard_sessions_expires_at", table_name="dashboard_sessions")
    op.drop_index("ix_dashboard_sessions_token_id", table_name="dashboard_sessions")
    op.drop_table("dashboard_sessions")
    for name in _RUN_INDEXES:
        op.drop_index(name, table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("trigger")
        batch.drop_column("branch")
    op.execute("DELETE FROM admin_tokens WHERE role = 'viewer'")
    _set_roles(_ROLES_BEFORE)
