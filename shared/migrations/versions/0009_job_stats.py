"""job statistics kept as jobs change state, so /metrics costs the same at ten jobs and at a million:
triggers on `jobs` append deltas (a job's count moves between statuses; a job that succeeds adds to the
histograms of its generation time, queue wait and peak RSS), the reconciler folds them into the totals, and a
scrape reads totals plus the deltas not folded yet. Deltas are only ever appended (no row two transactions
fight over), so submissions and workers never wait on each other for a counter. The existing jobs are
counted once, here.

The histogram buckets are frozen here (shared/jobstats.py has the same): changing them needs a migration that
rebuilds the histogram totals. SQLite: a later migration that rebuilds `jobs` (batch_alter_table) drops its
triggers and must create them again (`create_triggers`).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RSS_BUCKETS = tuple(g * 2**30 for g in (0.5, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64))
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: the rowid, which autoincrements


def _bucket(expr: str, buckets) -> str:
    """The index of the first bucket whose bound holds the value (len(buckets): +Inf)."""
    whens = " ".join(f"WHEN {expr} <= {b!r} THEN {i}" for i, b in enumerate(buckets))
    return f"CASE {whens} ELSE {len(buckets)} END"


def _postgresql_triggers() -> list[str]:
    wait = "EXTRACT(EPOCH FROM NEW.started_at - NEW.created_at)"
    return [f"""
CREATE OR REPLACE FUNCTION sdfleet_job_stats() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    INSERT INTO job_count_deltas (model, status, n) VALUES (OLD.model, OLD.status, -1);
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO job_count_deltas (model, status, n) VALUES (NEW.model, NEW.status, 1);
  END IF;
  IF TG_OP = 'UPDATE' AND NEW.status = 'succeeded' THEN
    IF NEW.generation_s IS NOT NULL THEN
      INSERT INTO job_histogram_deltas (model, metric, bucket, n, total)
      VALUES (NEW.model, 'duration', {_bucket('NEW.generation_s', DURATION_BUCKETS)}, 1, NEW.generation_s);
    END IF;
    IF NEW.started_at IS NOT NULL THEN
      INSERT INTO job_histogram_deltas (model, metric, bucket, n, total)
      VALUES (NEW.model, 'wait', {_bucket(wait, DURATION_BUCKETS)}, 1, {wait});
    END IF;
    IF NEW.peak_rss_bytes IS NOT NULL THEN
      INSERT INTO job_histogram_deltas (model, metric, bucket, n, total)
      VALUES (NEW.model, 'peak', {_bucket('NEW.peak_rss_bytes', RSS_BUCKETS)}, 1, NEW.peak_rss_bytes);
    END IF;
  END IF;
  RETURN NULL;
END $$""",
            "CREATE TRIGGER jobs_stats_rows AFTER INSERT OR DELETE ON jobs FOR EACH ROW "
            "EXECUTE FUNCTION sdfleet_job_stats()",
            "CREATE TRIGGER jobs_stats_status AFTER UPDATE OF status ON jobs FOR EACH ROW "
            "WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION sdfleet_job_stats()"]


def _sqlite_triggers() -> list[str]:
    wait = "round((julianday(NEW.started_at) - julianday(NEW.created_at)) * 86400.0, 3)"  # ms: no float noise
    return [
        "CREATE TRIGGER jobs_stats_insert AFTER INSERT ON jobs BEGIN "
        "INSERT INTO job_count_deltas (model, status, n) VALUES (NEW.model, NEW.status, 1); END",
        "CREATE TRIGGER jobs_stats_delete AFTER DELETE ON jobs BEGIN "
        "INSERT INTO job_count_deltas (model, status, n) VALUES (OLD.model, OLD.status, -1); END",
        "CREATE TRIGGER jobs_stats_status AFTER UPDATE OF status ON jobs WHEN OLD.status IS NOT NEW.status BEGIN "
        "INSERT INTO job_count_deltas (model, status, n) VALUES (OLD.model, OLD.status, -1), "
        "(NEW.model, NEW.status, 1); END",
        f"""CREATE TRIGGER jobs_stats_succeeded AFTER UPDATE OF status ON jobs
WHEN NEW.status = 'succeeded' AND OLD.status IS NOT 'succeeded' BEGIN
  INSERT INTO job_histogram_deltas (model, metric, bucket, n, total)
  SELECT NEW.model, 'duration', {_bucket('NEW.generation_s', DURATION_BUCKETS)}, 1, NEW.generation_s
   WHERE NEW.generation_s IS NOT NULL
  UNION ALL SELECT NEW.model, 'wait', {_bucket(wait, DURATION_BUCKETS)}, 1, {wait} WHERE NEW.started_at IS NOT NULL
  UNION ALL SELECT NEW.model, 'peak', {_bucket('NEW.peak_rss_bytes', RSS_BUCKETS)}, 1, NEW.peak_rss_bytes
   WHERE NEW.peak_rss_bytes IS NOT NULL;
END"""]


def create_triggers(dialect: str) -> None:
    for statement in _postgresql_triggers() if dialect == "postgresql" else _sqlite_triggers():
        op.execute(statement)


def _backfill(dialect: str) -> None:
    op.execute("INSERT INTO job_counts (model, status, n) SELECT model, status, count(*) FROM jobs "
               "GROUP BY model, status")
    if dialect == "postgresql":
        wait = "EXTRACT(EPOCH FROM started_at - created_at)"
    else:
        wait = "round((julianday(started_at) - julianday(created_at)) * 86400.0, 3)"
    for metric, value, buckets in (("duration", "generation_s", DURATION_BUCKETS), ("wait", wait, DURATION_BUCKETS),
                                   ("peak", "peak_rss_bytes", RSS_BUCKETS)):
        op.execute(f"INSERT INTO job_histograms (model, metric, bucket, n, total) "
                   f"SELECT model, '{metric}', b, count(*), sum(v) FROM (SELECT model, {_bucket('v0', buckets)} AS b, "
                   f"v0 AS v FROM (SELECT model, {value} AS v0 FROM jobs WHERE status = 'succeeded') s "
                   f"WHERE v0 IS NOT NULL) t GROUP BY model, b")


def upgrade() -> None:
    op.create_table("job_counts",
                    sa.Column("model", sa.String(200), primary_key=True),
                    sa.Column("status", sa.String(16), primary_key=True),
                    sa.Column("n", sa.BigInteger, nullable=False))
    op.create_table("job_count_deltas",
                    sa.Column("id", _ID, primary_key=True, autoincrement=True),
                    sa.Column("model", sa.String(200), nullable=False),
                    sa.Column("status", sa.String(16), nullable=False),
                    sa.Column("n", sa.Integer, nullable=False))
    op.create_table("job_histograms",
                    sa.Column("model", sa.String(200), primary_key=True),
                    sa.Column("metric", sa.String(16), primary_key=True),
                    sa.Column("bucket", sa.Integer, primary_key=True),
                    sa.Column("n", sa.BigInteger, nullable=False),
                    sa.Column("total", sa.Float, nullable=False))
    op.create_table("job_histogram_deltas",
                    sa.Column("id", _ID, primary_key=True, autoincrement=True),
                    sa.Column("model", sa.String(200), nullable=False),
                    sa.Column("metric", sa.String(16), nullable=False),
                    sa.Column("bucket", sa.Integer, nullable=False),
                    sa.Column("n", sa.Integer, nullable=False),
                    sa.Column("total", sa.Float, nullable=False))
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        # the deltas are deleted by every fold: vacuum them after a thousand dead rows whatever the table's
        # size (the default waits for a fifth of it), or a scrape's scan reads the dead rows of a burst
        for table in ("job_count_deltas", "job_histogram_deltas"):
            op.execute(f"ALTER TABLE {table} SET (autovacuum_vacuum_threshold = 1000, "
                       "autovacuum_vacuum_scale_factor = 0)")
    _backfill(dialect)
    create_triggers(dialect)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS jobs_stats_rows ON jobs")
        op.execute("DROP TRIGGER IF EXISTS jobs_stats_status ON jobs")
        op.execute("DROP FUNCTION IF EXISTS sdfleet_job_stats()")
    else:
        for name in ("jobs_stats_insert", "jobs_stats_delete", "jobs_stats_status", "jobs_stats_succeeded"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    for table in ("job_histogram_deltas", "job_histograms", "job_count_deltas", "job_counts"):
        op.drop_table(table)
