"""resumable jobs: a running job's checkpoint (the state of the image being denoised, and the images a
multi-image job has finished) in tables of their own, dropped when the job ends; on `jobs`, the attempts
handed back politely (`leaves`, not counted against SDFLEET_MAX_ATTEMPTS) and how each attempt started
(`resumes`). Columns are added, not the table rebuilt: SQLite keeps the job-statistics triggers of 0009.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

from shared.models import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("leaves", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("resumes", sa.JSON(), nullable=True))
    op.create_table(
        "job_checkpoints",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("runtime", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("image", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("state", sa.LargeBinary(), nullable=True),
        sa.Column("written_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "job_checkpoint_images",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("index", sa.Integer(), primary_key=True),
        sa.Column("runtime", sa.String(255), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_checkpoint_images")
    op.drop_table("job_checkpoints")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resumes")
        batch.drop_column("leaves")
