"""jobs say which decoder they asked for: the worker's tiny VAE or the model's own.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD/DROP COLUMN, not batch rebuilds: SQLite keeps the job-statistics triggers of 0009
    op.add_column("jobs", sa.Column("decoder", sa.String(8), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "decoder")
