"""the queue's index: a job's queue position counts the queued jobs of its model ahead of it, by priority
and enqueue time; this index answers that count from one range per priority

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_queue", "jobs", ["model", "status", "priority", "enqueued_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_queue", "jobs")
