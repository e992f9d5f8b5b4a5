"""fleet routing: each job's memory class (its queue) and hand-backs; a worker's state (loading, ready, paused)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("memory_class_bytes", sa.BigInteger))
        batch.add_column(sa.Column("handoffs", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=False, server_default="ready"))
        batch.add_column(sa.Column("state_reason", sa.Text))
        batch.add_column(sa.Column("max_budget_bytes", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("max_budget_bytes")
        batch.drop_column("state_reason")
        batch.drop_column("state")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("handoffs")
        batch.drop_column("memory_class_bytes")
