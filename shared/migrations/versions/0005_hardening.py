"""hardening: attempt history, webhook delivery fencing, step times, retention tombstones

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""
import sqlalchemy as sa
from alembic import op

from shared.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("history", sa.JSON))
        batch.add_column(sa.Column("webhook_delivery_id", sa.String(36)))
        batch.add_column(sa.Column("webhook_sent_at", UTCDateTime))
    with op.batch_alter_table("memory_profiles") as batch:
        batch.add_column(sa.Column("max_step_s", sa.Float))
    op.create_table(
        "job_tombstones",
        sa.Column("job_id", sa.String(36), primary_key=True),
        sa.Column("owner_key_id", sa.String(36), index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("finished_at", UTCDateTime),
        sa.Column("deleted_at", UTCDateTime, nullable=False, index=True),
        sa.Column("image_bytes", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_tombstones")
    with op.batch_alter_table("memory_profiles") as batch:
        batch.drop_column("max_step_s")
    with op.batch_alter_table("jobs") as batch:
        for col in ("webhook_sent_at", "webhook_delivery_id", "history"):
            batch.drop_column(col)
