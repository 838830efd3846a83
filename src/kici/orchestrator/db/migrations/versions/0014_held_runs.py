"""Held runs: `runs.hold_reason` (why the source's trust policy held the run: shown by `kici-admin held
list`, the run's API and its page), `runs.hold_expires_at` (when the sweeper expires the hold) and
`runs.approved_at` (when a held run was approved: its workflow timeout counts from then, not from the
delivery). All NULL for runs that were never held.

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("hold_reason", sa.Text, nullable=True))
        batch.add_column(sa.Column("hold_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("approved_at")
        batch.drop_column("hold_expires_at")
        batch.drop_column("hold_reason")
