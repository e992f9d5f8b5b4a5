"""workers' heartbeats, memory profiles, job memory timelines, predictions on jobs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

from shared.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("predicted_peak_bytes", sa.BigInteger))
        batch.add_column(sa.Column("prediction_source", sa.String(16)))
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("precision", sa.String(16), nullable=False),
        sa.Column("budget_bytes", sa.BigInteger, nullable=False),
        sa.Column("cgroup_limit_bytes", sa.BigInteger),
        sa.Column("total_ram_bytes", sa.BigInteger, nullable=False),
        sa.Column("available_bytes", sa.BigInteger, nullable=False),
        sa.Column("resident_bytes", sa.BigInteger, nullable=False),
        sa.Column("current_job_id", sa.String(36)),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("last_seen", UTCDateTime, nullable=False),
    )
    op.create_index("ix_workers_model", "workers", ["model"])
    op.create_index("ix_workers_last_seen", "workers", ["last_seen"])
    op.create_table(
        "memory_profiles",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("backend", sa.String(64), primary_key=True),
        sa.Column("precision", sa.String(16), primary_key=True),
        sa.Column("width", sa.Integer, primary_key=True),
        sa.Column("height", sa.Integer, primary_key=True),
        sa.Column("images_per_pass", sa.Integer, primary_key=True),
        sa.Column("guidance", sa.Boolean, primary_key=True),
        sa.Column("peak_bytes", sa.BigInteger, nullable=False),
        sa.Column("base_bytes", sa.BigInteger, nullable=False),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "job_memory",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("interval_s", sa.Float, nullable=False),
        sa.Column("timeline", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_memory")
    op.drop_table("memory_profiles")
    op.drop_index("ix_workers_last_seen", "workers")
    op.drop_index("ix_workers_model", "workers")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("prediction_source")
        batch.drop_column("predicted_peak_bytes")
