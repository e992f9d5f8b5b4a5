"""images in: a job may be given an init image and a mask (image-to-image, inpainting, upscale). On `jobs`
its kind, strength, upscale factor and tile side; the images in `job_inputs` (stored as PNG, deleted with
the job); memory profiles kept apart by whether the job's init image went through the VAE encoder. Columns
are added to `jobs`, not the table rebuilt: SQLite keeps the job-statistics triggers of 0009.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""
import warnings

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_KEY = ["model", "backend", "precision", "memory_mode", "width", "height", "images_per_pass", "guidance"]


def _swap_primary_key(columns: list[str], add: bool) -> None:
    """As 0004 did: SQLite rebuilds the table in batch mode (its primary key cannot be altered)."""
    column = sa.Column("encodes", sa.Boolean(), nullable=False, server_default=sa.false())
    if op.get_bind().dialect.name == "sqlite":
        with warnings.catch_warnings(), op.batch_alter_table("memory_profiles", recreate="always") as batch:
            warnings.filterwarnings("ignore", category=sa.exc.SAWarning,
                                    message=r"Table '_alembic_tmp_memory_profiles' specifies columns")
            if add:
                batch.add_column(column)
            batch.create_primary_key("memory_profiles_pkey", columns)
            if not add:
                batch.drop_column("encodes")
        return
    if add:
        op.add_column("memory_profiles", column)
    op.drop_constraint("memory_profiles_pkey", "memory_profiles", type_="primary")
    op.create_primary_key("memory_profiles_pkey", "memory_profiles", columns)
    if not add:
        op.drop_column("memory_profiles", "encodes")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("kind", sa.String(16), nullable=False, server_default="txt2img"))
    op.add_column("jobs", sa.Column("strength", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("upscale", sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("tile", sa.Integer(), nullable=True))
    op.create_table(
        "job_inputs",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("role", sa.String(8), primary_key=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("source_format", sa.String(8), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
    )
    _swap_primary_key(_KEY + ["encodes"], add=True)


def downgrade() -> None:
    op.execute("DELETE FROM memory_profiles WHERE encodes")
    _swap_primary_key(_KEY, add=False)
    op.drop_table("job_inputs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("tile")
        batch.drop_column("upscale")
        batch.drop_column("strength")
        batch.drop_column("kind")
