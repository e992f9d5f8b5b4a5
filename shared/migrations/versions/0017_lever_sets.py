"""memory profiles keep the first image's peaks before and during its decode (a prediction scales the UNet's
rise with its work and the decoder's with the pixels); jobs say which lever set they ran in, why, and what
their worker predicted there.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD/DROP COLUMN, not batch rebuilds: SQLite keeps the job-statistics triggers of 0009
    op.add_column("memory_profiles", sa.Column("steps_peak_bytes", sa.BigInteger(), nullable=True))
    op.add_column("memory_profiles", sa.Column("decode_peak_bytes", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("lever_set", sa.String(200), nullable=True))
    op.add_column("jobs", sa.Column("lever_reason", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("lever_predicted_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "lever_predicted_bytes")
    op.drop_column("jobs", "lever_reason")
    op.drop_column("jobs", "lever_set")
    op.drop_column("memory_profiles", "decode_peak_bytes")
    op.drop_column("memory_profiles", "steps_peak_bytes")
