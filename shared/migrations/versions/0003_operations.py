"""operations: priorities, owners and API keys, idempotency, delivery fencing, cancel, progress, webhooks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

from shared.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("priority", sa.String(8), nullable=False, server_default="normal"))
        batch.add_column(sa.Column("owner_key_id", sa.String(36)))
        batch.add_column(sa.Column("idempotency_key", sa.String(255)))
        batch.add_column(sa.Column("request_hash", sa.String(64)))
        batch.add_column(sa.Column("delivery_id", sa.String(36)))
        batch.add_column(sa.Column("enqueued_at", UTCDateTime))
        batch.add_column(sa.Column("worker_name", sa.String(255)))
        batch.add_column(sa.Column("cancel_requested_at", UTCDateTime))
        batch.add_column(sa.Column("progress_step", sa.Integer))
        batch.add_column(sa.Column("progress_steps", sa.Integer))
        batch.add_column(sa.Column("progress_image", sa.Integer))
        batch.add_column(sa.Column("webhook_url", sa.Text))
        batch.add_column(sa.Column("webhook_status", sa.String(16)))
        batch.add_column(sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_jobs_owner_key_id", "jobs", ["owner_key_id"])
    # one job per (owner, key); NULL owners (an open API) are folded to '' so the constraint holds for them too
    op.create_index("ux_jobs_idempotency", "jobs", [sa.text("coalesce(owner_key_id, '')"), "idempotency_key"],
                    unique=True, postgresql_where=sa.text("idempotency_key IS NOT NULL"),
                    sqlite_where=sa.text("idempotency_key IS NOT NULL"))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("webhook_secret", sa.String(128), nullable=False),
        sa.Column("rate_limit_per_min", sa.Integer),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ux_jobs_idempotency", "jobs")
    op.drop_index("ix_jobs_owner_key_id", "jobs")
    with op.batch_alter_table("jobs") as batch:
        for col in ("webhook_attempts", "webhook_status", "webhook_url", "progress_image", "progress_steps",
                    "progress_step", "cancel_requested_at", "worker_name", "enqueued_at", "delivery_id",
                    "request_hash", "idempotency_key", "owner_key_id", "priority"):
            batch.drop_column(col)
