"""memory modes: workers say how they run their pipeline, and memory profiles are kept apart by it

Profiles measured before this revision came from workers that kept every component resident: they are
kept, as the "fast" mode's.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""
import warnings

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_KEY = ["model", "backend", "precision", "width", "height", "images_per_pass", "guidance"]


def _swap_primary_key(columns: list[str], add: bool) -> None:
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot alter a primary key: batch mode rebuilds the table and copies the rows. Building the
        # new table, SQLAlchemy notes (SAWarning) that the copied constraint names the old key's columns and
        # the new key's wins: that is the change asked for, so the note is not shown on every fresh database.
        with warnings.catch_warnings(), op.batch_alter_table("memory_profiles", recreate="always") as batch:
            warnings.filterwarnings("ignore", category=sa.exc.SAWarning,
                                    message=r"Table '_alembic_tmp_memory_profiles' specifies columns")
            if add:
                batch.add_column(sa.Column("memory_mode", sa.String(64), nullable=False, server_default="fast"))
            batch.create_primary_key("memory_profiles_pkey", columns)
            if not add:
                batch.drop_column("memory_mode")
        return
    if add:
        op.add_column("memory_profiles",
                      sa.Column("memory_mode", sa.String(64), nullable=False, server_default="fast"))
    op.drop_constraint("memory_profiles_pkey", "memory_profiles", type_="primary")
    op.create_primary_key("memory_profiles_pkey", "memory_profiles", columns)
    if not add:
        op.drop_column("memory_profiles", "memory_mode")


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("memory_mode", sa.String(64), nullable=False, server_default="fast"))
    _swap_primary_key(_KEY[:3] + ["memory_mode"] + _KEY[3:], add=True)


def downgrade() -> None:
    op.execute("DELETE FROM memory_profiles WHERE memory_mode <> 'fast'")
    _swap_primary_key(_KEY, add=False)
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("memory_mode")
