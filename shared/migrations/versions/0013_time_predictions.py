"""time, as memory is: each memory profile keeps what its jobs measured of time (seconds per UNet pass of a
denoising step, per image beside its steps, per job beside its images), and each job what admission predicted its generation would
take. Columns are added, not the tables rebuilt: SQLite keeps the job-statistics triggers of 0009.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("memory_profiles", sa.Column("step_s", sa.Float(), nullable=True))
    op.add_column("memory_profiles", sa.Column("image_overhead_s", sa.Float(), nullable=True))
    op.add_column("memory_profiles", sa.Column("job_overhead_s", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("predicted_generation_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("predicted_generation_s")
    with op.batch_alter_table("memory_profiles") as batch:
        batch.drop_column("job_overhead_s")
        batch.drop_column("image_overhead_s")
        batch.drop_column("step_s")
