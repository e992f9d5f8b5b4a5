"""fit rather than refuse (`fit: auto`): each job keeps what admission changed so that it fits a live worker,
and why (a FitRecord as JSON; NULL for a job that runs as it was asked). A column is added, the table not
rebuilt: SQLite keeps the job-statistics triggers of 0009.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("fitted", sa.JSON(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35 and later too), not a batch rebuild: SQLite keeps its triggers
    op.drop_column("jobs", "fitted")
