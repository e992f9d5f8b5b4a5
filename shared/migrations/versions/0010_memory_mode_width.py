"""memory mode keys up to 200 characters: a key names the mode and every lever set against it (for example
"fast+release_encoders+release_all+drop_file_pages+vae_tiles+split_guidance+static+tiny_vae", 92), past
the 64 the columns had, and PostgreSQL refused such a worker's heartbeats and profiles (SQLite does not
enforce a VARCHAR's length: nothing to change there)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TABLES = ("workers", "memory_profiles")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.alter_column(table, "memory_mode", type_=sa.String(200), existing_type=sa.String(64),
                        existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.alter_column(table, "memory_mode", type_=sa.String(64), existing_type=sa.String(200),
                        existing_nullable=False)
