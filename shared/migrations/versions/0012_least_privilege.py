"""least privilege for workers: what a worker's own database role (`sdfleet db worker-role`) needs from the
schema. `jobs.has_webhook`: a worker ending a job marks its webhook pending without reading `webhook_url` (on
PostgreSQL a trigger keeps it true to `webhook_url` whatever the statement says: an API of the previous
release stores jobs without it during a rolling upgrade). PostgreSQL only, beside it: `jobs.status_by`, the
role whose statement last changed a job's status, set by a trigger whatever the statement says (a worker
role's row-level security lets it change only the running jobs it claimed itself); `workers.db_role`, the
role that inserted a heartbeat row (a worker changes only its own); and the job-statistics trigger of 0009
runs as its owner (SECURITY DEFINER), so a worker role that ends a job appends the statistics' deltas without
any right on their tables. Columns are added, not the table rebuilt: SQLite keeps the triggers of 0009.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("has_webhook", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute("UPDATE jobs SET has_webhook = (webhook_url IS NOT NULL) WHERE webhook_url IS NOT NULL")
    op.add_column("jobs", sa.Column("status_by", sa.String(63), nullable=True))
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.add_column("workers", sa.Column("db_role", sa.String(63), nullable=True,
                                       server_default=sa.text("SESSION_USER") if postgresql else None))
    if not postgresql:
        return
    op.execute("""
CREATE OR REPLACE FUNCTION sdfleet_has_webhook() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.has_webhook := NEW.webhook_url IS NOT NULL;
  RETURN NEW;
END $$""")
    # the function runs only for a row that needs it (WHEN): nothing on the submit path of this release's API
    op.execute("CREATE TRIGGER jobs_has_webhook BEFORE INSERT OR UPDATE OF webhook_url, has_webhook ON jobs "
               "FOR EACH ROW WHEN (NEW.has_webhook IS DISTINCT FROM (NEW.webhook_url IS NOT NULL)) "
               "EXECUTE FUNCTION sdfleet_has_webhook()")
    op.execute("""
CREATE OR REPLACE FUNCTION sdfleet_status_by() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.status_by := session_user;
  RETURN NEW;
END $$""")
    op.execute("CREATE TRIGGER jobs_status_by BEFORE UPDATE OF status ON jobs FOR EACH ROW "
               "WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION sdfleet_status_by()")
    # the schema the tables are in, fixed: a SECURITY DEFINER function must not follow the caller's search_path
    schema = op.get_bind().execute(sa.text("SELECT quote_ident(current_schema())")).scalar()
    op.execute(f"ALTER FUNCTION sdfleet_job_stats() SECURITY DEFINER SET search_path = {schema}, pg_temp")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER FUNCTION sdfleet_job_stats() SECURITY INVOKER RESET search_path")
        op.execute("DROP TRIGGER IF EXISTS jobs_status_by ON jobs")
        op.execute("DROP FUNCTION IF EXISTS sdfleet_status_by()")
        op.execute("DROP TRIGGER IF EXISTS jobs_has_webhook ON jobs")
        op.execute("DROP FUNCTION IF EXISTS sdfleet_has_webhook()")
    # ALTER TABLE ... DROP COLUMN on both (SQLite 3.35+): a rebuild would drop SQLite's triggers of 0009
    op.execute("ALTER TABLE workers DROP COLUMN db_role")
    op.execute("ALTER TABLE jobs DROP COLUMN status_by")
    op.execute("ALTER TABLE jobs DROP COLUMN has_webhook")
