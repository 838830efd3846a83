"""Trust on runs: `runs.trust` (trusted, untrusted, approved) — what the source's trust policy decided for the
event that created the run — and `runs.secrets_allowed`, whether dispatch may resolve the secrets its jobs
declare. Existing runs were all created before trust policies existed, so they count as trusted.
Audit rows gain `actor` (`token:<id>`, `github:<login>`, `system`) and `target` (what the mutation changed),
so every mutation can say who changed what.

Frozen definitions, as in 0001: this file must keep creating exactly what it created when it shipped.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("trust", sa.Text, nullable=False, server_default="trusted"))
        batch.add_column(sa.Column("secrets_allowed", sa.Boolean, nullable=False, server_default=sa.true()))


    with op.batch_alter_table("audit_log") as batch:
        batch.add_column(sa.Column("actor", sa.Text, nullable=True))
        batch.add_column(sa.Column("target", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("target")
        batch.drop_column("actor")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("secrets_allowed")
        batch.drop_column("trust")
