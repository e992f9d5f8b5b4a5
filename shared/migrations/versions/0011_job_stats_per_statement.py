"""PostgreSQL: the job statistics' insert and delete triggers fire once per statement, not once per row. The
API stores submissions in batches (one multi-row INSERT per group commit, ~16 jobs at load), and the row
trigger of 0009 ran a PL/pgSQL call and appended a delta row for each job; a statement trigger reads the
statement's new (or deleted) rows as a transition table and appends one delta per (model, status) of the
batch. The status trigger stays per row: a worker changes one job at a time. SQLite has no statement
triggers: unchanged there.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# PostgreSQL allows a transition table only on a trigger of one event: one trigger (and function) each
STATEMENT_TRIGGERS = {
    "insert": ("INSERT", "NEW TABLE AS changed", 1),
    "delete": ("DELETE", "OLD TABLE AS changed", -1),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_stats_rows ON jobs")
    for name, (event, transition, sign) in STATEMENT_TRIGGERS.items():
        op.execute(f"""
CREATE OR REPLACE FUNCTION sdfleet_job_stats_{name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO job_count_deltas (model, status, n)
  SELECT model, status, {sign} * count(*) FROM changed GROUP BY model, status;
  RETURN NULL;
END $$""")
        op.execute(f"CREATE TRIGGER jobs_stats_{name} AFTER {event} ON jobs REFERENCING {transition} "
                   f"FOR EACH STATEMENT EXECUTE FUNCTION sdfleet_job_stats_{name}()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in STATEMENT_TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS jobs_stats_{name} ON jobs")
        op.execute(f"DROP FUNCTION IF EXISTS sdfleet_job_stats_{name}()")
    # the row trigger of 0009 (its function, sdfleet_job_stats, still serves the status trigger)
    op.execute("CREATE TRIGGER jobs_stats_rows AFTER INSERT OR DELETE ON jobs FOR EACH ROW "
               "EXECUTE FUNCTION sdfleet_job_stats()")
