"""Job statistics kept as jobs change state (migration 0009's triggers append deltas; `compact` folds them into
the totals): what /metrics reads, at a cost that depends on the models and the deltas of the last reconciler
interval, never on how many jobs the database holds."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, delete, text
from sqlalchemy.orm import Session

from shared.db import upsert

# the bounds of the histograms' buckets, as migration 0009 froze them (a change needs a migration)
DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RSS_BUCKETS = tuple(g * 2**30 for g in (0.5, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64))
BUCKETS = {"duration": DURATION_BUCKETS, "wait": DURATION_BUCKETS, "peak": RSS_BUCKETS}

_meta = MetaData()
job_counts = Table("job_counts", _meta, Column("model", String, primary_key=True),
                   Column("status", String, primary_key=True), Column("n", Integer))
job_count_deltas = Table("job_count_deltas", _meta, Column("id", Integer, primary_key=True), Column("model", String),
                         Column("status", String), Column("n", Integer))
job_histograms = Table("job_histograms", _meta, Column("model", String, primary_key=True),
                       Column("metric", String, primary_key=True), Column("bucket", Integer, primary_key=True),
                       Column("n", Integer), Column("total", Float))
job_histogram_deltas = Table("job_histogram_deltas", _meta, Column("id", Integer, primary_key=True),
                             Column("model", String), Column("metric", String), Column("bucket", Integer),
                             Column("n", Integer), Column("total", Float))


def counts(session: Session) -> dict[tuple[str, str], int]:
    """Jobs by (model, status) now: the totals and the deltas not folded yet, in one statement (one snapshot,
    so a compaction committing meanwhile is counted once)."""
    rows = session.execute(text(
        "SELECT model, status, sum(n) FROM (SELECT model, status, n FROM job_counts "
        "UNION ALL SELECT model, status, n FROM job_count_deltas) t GROUP BY model, status"))
    return {(model, status): int(n) for model, status, n in rows if n}


def histograms(session: Session) -> dict[str, dict[str, tuple[list[int], float]]]:
    """metric -> model -> (count per bucket, the last one +Inf; sum of the values), of succeeded jobs."""
    rows = session.execute(text(
        "SELECT metric, model, bucket, sum(n), sum(total) FROM (SELECT metric, model, bucket, n, total FROM "
        "job_histograms UNION ALL SELECT metric, model, bucket, n, total FROM job_histogram_deltas) t "
        "GROUP BY metric, model, bucket"))
    out: dict = defaultdict(dict)
    for metric, model, bucket, n, total in rows:
        if metric not in BUCKETS:
            continue
        per, acc = out[metric].get(model, ([0] * (len(BUCKETS[metric]) + 1), 0.0))
        per[min(bucket, len(per) - 1)] += int(n)
        out[metric][model] = (per, acc + float(total))
    return out


def _add_to(session: Session, table: Table, keys: list[str], rows: list[dict]) -> None:
    """Add each row's values to its totals (a new key starts at the row)."""
    for row in rows:
        upsert(session, table, row, keys, lambda old, new, row=row: {c: old[c] + new[c] for c in row if c not in keys})


def compact(session: Session) -> int:
    """Fold the deltas into the totals (the reconciler's pass, in its transaction): exactly the rows deleted
    (DELETE ... RETURNING) are added, so a delta committed meanwhile waits for the next pass. Returns how many
    deltas were folded."""
    moved = session.execute(delete(job_count_deltas).returning(
        job_count_deltas.c.model, job_count_deltas.c.status, job_count_deltas.c.n)).all()
    sums: dict = defaultdict(int)
    for model, status, n in moved:
        sums[(model, status)] += n
    _add_to(session, job_counts, ["model", "status"],
            [{"model": m, "status": s, "n": n} for (m, s), n in sorted(sums.items())])
    moved_h = session.execute(delete(job_histogram_deltas).returning(
        job_histogram_deltas.c.model, job_histogram_deltas.c.metric, job_histogram_deltas.c.bucket,
        job_histogram_deltas.c.n, job_histogram_deltas.c.total)).all()
    hist: dict = defaultdict(lambda: [0, 0.0])
    for model, metric, bucket, n, total in moved_h:
        hist[(model, metric, bucket)][0] += n
        hist[(model, metric, bucket)][1] += total
    _add_to(session, job_histograms, ["model", "metric", "bucket"],
            [{"model": m, "metric": k, "bucket": b, "n": n, "total": t}
             for (m, k, b), (n, t) in sorted(hist.items())])
    return len(moved) + len(moved_h)
