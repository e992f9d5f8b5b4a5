"""model defaults: what each worker's model runs best with (steps, guidance, size, whether guidance doubles
the UNet's batch), announced in its heartbeat

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("defaults", sa.JSON))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("defaults")
