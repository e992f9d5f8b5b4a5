"""What a /metrics scrape costs at 10 jobs and at 1,000,000, on SQLite and PostgreSQL, beside the way it was
computed before (a scan of every job at each scrape).

    .venv/bin/python bench/metrics.py [--sizes 10,1000000] [--databases sqlite,postgresql] [--scrapes 5]

For each database and size: a fresh database migrated to head, N jobs of 4 models inserted (a fifth queued,
the rest running, then set succeeded with a generation time, a queue wait and a peak in one UPDATE, so the
statistics' triggers see what a worker's finish does), the reconciler's fold (`jobstats.compact`) timed,
then --scrapes scrapes of each way (the collector called in-process: the database's part of a scrape, no
HTTP), medians. The old way is the collector of before migration 0009 (kept here, as it was). Redis: a bundled
redis-server on a free port. PostgreSQL: a database `sdfleet_bench_metrics` created and dropped.
Appends to bench/results/metrics.jsonl; `--table` reprints.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import free_port  # noqa: E402
from bench.submit import postgres_database  # noqa: E402
from sdfleet.stack import start_bundled_redis, stop  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "metrics.jsonl"
MODELS = ("sd15", "sdxl", "lcm", "sdxl-turbo")


def old_scrape(sessions, broker, settings) -> bytes:
    """The collector as it was before the statistics (api/metrics.py at migration 0008): every succeeded job's
    row read at each scrape."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
    from sqlalchemy import func, select

    from shared import fleet, jobstats
    from shared.jobs import JobStatus
    from shared.models import Job
    from shared.queue import queue_depth

    def histogram(name, buckets, values_by_model):
        h = HistogramMetricFamily(name, name, labels=["model"])
        for model, values in sorted(values_by_model.items()):
            values = sorted(values)
            cumulative = [(str(b), bisect.bisect_right(values, b)) for b in buckets] + [("+Inf", len(values))]
            h.add_metric([model], cumulative, sum(values))
        return h

    class Old:
        def collect(self):
            with sessions() as session:
                by_state = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                queued_models = set(session.scalars(select(Job.model).where(
                    Job.status == JobStatus.queued.value).distinct()))
                finished = session.execute(select(Job.model, Job.generation_s, Job.created_at, Job.started_at,
                                                  Job.peak_rss_bytes).where(
                    Job.status == JobStatus.succeeded.value)).all()
                workers = fleet.workers(session)
            jobs = GaugeMetricFamily("sdfleet_jobs", "Jobs by state", labels=["state"])
            for state in JobStatus:
                jobs.add_metric([state.value], by_state.get(state.value, 0))
            yield jobs
            depth = GaugeMetricFamily("sdfleet_queue_depth", "depth", labels=["model"])
            for model in sorted(queued_models | {w.model for w in workers}):
                depth.add_metric([model], queue_depth(broker, model))
            yield depth
            durations, waits, peaks = defaultdict(list), defaultdict(list), defaultdict(list)
            for model, generation_s, created, started, peak in finished:
                if generation_s is not None:
                    durations[model].append(generation_s)
                if started is not None:
                    waits[model].append((started - created).total_seconds())
                if peak is not None:
                    peaks[model].append(peak)
            yield histogram("sdfleet_job_duration_seconds", jobstats.DURATION_BUCKETS, durations)
            yield histogram("sdfleet_job_queue_wait_seconds", jobstats.DURATION_BUCKETS, waits)
            yield histogram("sdfleet_job_peak_rss_bytes", jobstats.RSS_BUCKETS, peaks)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Old())
    return generate_latest(registry)


def fill(sessions, n: int) -> float:
    """N jobs: a fifth queued, the rest run and succeeded. Seconds it took (the triggers included)."""
    from datetime import timedelta

    from sqlalchemy import update

    from shared import jobstore
    from shared.jobs import JobParameters
    from shared.models import Job, utcnow

    t0 = time.perf_counter()
    params = JobParameters(prompt="a lighthouse", negative_prompt=None, width=512, height=512, steps=20,
                           guidance_scale=7.5, seed=1, num_images=1, model=MODELS[0])
    chunk = 20_000
    for start in range(0, n, chunk):
        rows = []
        for i in range(start, min(n, start + chunk)):
            values = jobstore.new_job_values(jobstore.NewJob(params.model_copy(update={"model": MODELS[i % len(MODELS)]})))
            if i % 5:
                values.update(status="running", attempts=1, started_at=values["created_at"] + timedelta(
                    seconds=(i % 97) * 1.3), generation_s=0.5 + (i % 301), peak_rss_bytes=(1 + i % 13) << 29)
            rows.append(values)
        with sessions.begin() as s:
            s.execute(Job.__table__.insert(), rows)
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.status == "running").values(status="succeeded", finished_at=utcnow()))
    return time.perf_counter() - t0


def measure(db_url: str, redis_url: str, n: int, scrapes: int) -> dict:
    from api.metrics import render_metrics
    from shared import jobstats
    from shared.db import engine_for, migrate, session_factory
    from shared.settings import Settings

    import redis

    migrate(engine_for(db_url))
    sessions = session_factory(db_url)
    broker = redis.Redis.from_url(redis_url)
    settings = Settings(database_url=db_url, redis_url=redis_url)
    fill_s = fill(sessions, n)
    t0 = time.perf_counter()
    with sessions.begin() as s:
        folded = jobstats.compact(s)
    fold_s = time.perf_counter() - t0
    if engine_for(db_url).dialect.name == "postgresql":
        # what autovacuum does within its naptime (migration 0009 sets it to a thousand dead rows): the fold
        # of a million jobs' deltas leaves millions of dead rows that a scrape's scan would read meanwhile
        from sqlalchemy import text

        with engine_for(db_url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM job_count_deltas, job_histogram_deltas"))
    out = {"jobs": n, "fill_s": round(fill_s, 1), "fold_s": round(fold_s, 3), "folded": folded}
    # where a scrape's time goes: each statement's time on the database connection (cursor execute to
    # result), by the statement's first words
    from sqlalchemy import event

    spent: dict[str, list[float]] = defaultdict(list)

    def before(conn, cursor, statement, *args):
        conn.info["sdfleet_t0"] = time.perf_counter()

    def after(conn, cursor, statement, *args):
        spent[" ".join(statement.split())[:60]].append(time.perf_counter() - conn.info.pop("sdfleet_t0"))

    engine = engine_for(db_url)
    for way, scrape in (("statistics", lambda: render_metrics(sessions, broker, settings)[0]),
                        ("scan", lambda: old_scrape(sessions, broker, settings))):
        times = []
        spent.clear()
        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        for _ in range(scrapes):
            t = time.perf_counter()
            body = scrape()
            times.append(time.perf_counter() - t)
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
        out[f"{way}_ms"] = round(statistics.median(times) * 1000, 2)
        out[f"{way}_statements_ms"] = {k: round(statistics.median(v) * 1000, 2) for k, v in spent.items()}
        out[f"{way}_succeeded"] = next(float(l.split()[1]) for l in body.decode().splitlines()
                                       if l.startswith('sdfleet_jobs{state="succeeded"}'))
    assert out["statistics_succeeded"] == out["scan_succeeded"], out  # the same answer both ways
    engine_for(db_url).dispose()
    return out


def table(rows: list[dict]) -> str:
    lines = ["| database | jobs | scrape: statistics (median) | scrape: scan of every job (median) | scan / statistics "
             "| reconciler's fold after the fill |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['database']} | {r['jobs']:,} | {r['statistics_ms']:.1f} ms | {r['scan_ms']:.1f} ms | "
                     f"{r['scan_ms'] / r['statistics_ms']:.1f}x | {r['fold_s']:.2f} s ({r['folded']:,} deltas) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,1000000")
    ap.add_argument("--databases", default="sqlite,postgresql")
    ap.add_argument("--scrapes", type=int, default=5)
    ap.add_argument("--pg-admin-url", default=os.environ.get("SDFLEET_BENCH_PG_ADMIN_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip()]))
        return
    RESULTS.parent.mkdir(exist_ok=True)
    port = free_port()
    redis_proc = start_bundled_redis(port)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="sdfleet-bench-metrics-") as tmp:
            for database in args.databases.split(","):
                for n in map(int, args.sizes.split(",")):
                    if database == "sqlite":
                        url = f"sqlite:///{tmp}/metrics-{n}.db"
                    else:
                        url = postgres_database(args.pg_admin_url, "sdfleet_bench_metrics", create=True)
                    try:
                        r = measure(url, f"redis://127.0.0.1:{port}/0", n, args.scrapes)
                    finally:
                        if database == "postgresql":
                            postgres_database(args.pg_admin_url, "sdfleet_bench_metrics", create=False)
                    row = {"date": time.strftime("%Y-%m-%d %H:%M"), "database": database,
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores", **r}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with RESULTS.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    finally:
        stop([redis_proc])
    print(table(rows))


if __name__ == "__main__":
    main()
