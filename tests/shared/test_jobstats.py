"""Job statistics kept as jobs change state (migration 0009's triggers, shared/jobstats.py): /metrics reads
them instead of every job, and they say what counting the jobs says, before and after the reconciler folds
them, for jobs stored before the migration too, on SQLite and PostgreSQL."""

from __future__ import annotations

import bisect
import uuid
from collections import Counter, defaultdict
from datetime import timedelta

from sqlalchemy import delete, func, select, update

from shared import jobstats, jobstore
from shared.db import engine_for, migrate, session_factory
from shared.jobs import JobParameters, JobStatus
from shared.memory import GB
from shared.models import Job, utcnow
from tests.helpers import fresh_url  # noqa: F401  (a database of the test's own, on each backend)

PARAMS = JobParameters(prompt="a cat", negative_prompt=None, width=64, height=64, steps=1, guidance_scale=1.0,
                       seed=1, num_images=1, model="m-a")


def _make_jobs(s, n: int, model: str) -> list[str]:
    return [jobstore.create_job(s, jobstore.NewJob(PARAMS.model_copy(update={"model": model}))).id for _ in range(n)]


def _succeed(s, job_id: str, generation_s: float, peak: int, waited_s: float) -> None:
    job = s.get(Job, job_id)
    assert jobstore.transition(s, job_id, JobStatus.queued, JobStatus.running, attempts=1,
                            started_at=job.created_at + timedelta(seconds=waited_s))
    assert jobstore.transition(s, job_id, JobStatus.running, JobStatus.succeeded, attempt=1, generation_s=generation_s,
                            peak_rss_bytes=peak)


def _truth(s) -> tuple[dict, dict]:
    """What counting every job says: (model, status) counts, and the histograms of the succeeded ones."""
    counts = {(m, st): n for m, st, n in s.execute(select(Job.model, Job.status, func.count()).group_by(
        Job.model, Job.status))}
    hist: dict = defaultdict(dict)
    for job in s.scalars(select(Job).where(Job.status == JobStatus.succeeded.value)):
        for metric, value in (("duration", job.generation_s), ("peak", job.peak_rss_bytes),
                              ("wait", (job.started_at - job.created_at).total_seconds())):
            per, total = hist[metric].get(job.model, ([0] * (len(jobstats.BUCKETS[metric]) + 1), 0.0))
            per[bisect.bisect_left(jobstats.BUCKETS[metric], value)] += 1
            hist[metric][job.model] = (per, total + value)
    return counts, hist


def _assert_same(s, truth) -> None:
    counts, hist = truth
    assert jobstats.counts(s) == counts
    got = jobstats.histograms(s)
    assert set(got) == set(hist)
    for metric in hist:
        assert set(got[metric]) == set(hist[metric])
        for model, (per, total) in hist[metric].items():
            assert got[metric][model][0] == per, (metric, model)
            assert abs(got[metric][model][1] - total) < 1e-3 * max(1.0, total)


def test_statistics_follow_every_change_and_survive_folding(fresh_url):  # noqa: F811
    db = session_factory(fresh_url)
    with db.begin() as s:
        a = _make_jobs(s, 6, "m-a")
        b = _make_jobs(s, 3, "m-b")
    with db.begin() as s:
        _succeed(s, a[0], 0.05, GB // 4, 0.2)   # the first buckets
        _succeed(s, a[1], 7.0, 3 * GB, 65.0)    # in the middle
        _succeed(s, b[0], 4000.0, 100 * GB, 2.0)  # past the last bound: +Inf
        assert jobstore.transition(s, a[2], JobStatus.queued, JobStatus.cancelled)
        assert jobstore.transition(s, a[3], JobStatus.queued, JobStatus.running, attempts=1, started_at=utcnow())
        # a status written again unchanged is no change
        s.execute(update(Job).where(Job.id == a[4]).values(status=JobStatus.queued.value))
    with db() as s:
        histograms = _truth(s)[1]
    with db.begin() as s:
        s.execute(delete(Job).where(Job.id.in_([a[0], b[1]])))  # as retention deletes
    with db() as s:
        # the counts follow the deletion; a deleted succeeded job stays in the histograms (counters only grow)
        truth = (_truth(s)[0], histograms)
        _assert_same(s, truth)
    assert truth[0] == {("m-a", "succeeded"): 1, ("m-a", "cancelled"): 1, ("m-a", "running"): 1,
                        ("m-a", "queued"): 2, ("m-b", "succeeded"): 1, ("m-b", "queued"): 1}
    with db.begin() as s:
        assert jobstats.compact(s) > 0
    with db() as s:
        _assert_same(s, truth)
        assert not s.scalar(select(func.count()).select_from(jobstats.job_count_deltas))
    with db.begin() as s:  # changes after a fold add to the totals
        _succeed(s, b[2], 1.5, GB, 0.7)
        assert jobstats.compact(s) > 0
    with db() as s:
        counts = jobstats.counts(s)
        assert counts[("m-b", "succeeded")] == 2 and ("m-b", "queued") not in counts
        assert jobstats.histograms(s)["duration"]["m-b"][0] == [0] * 3 + [1] + [0] * 9 + [1]


def test_jobs_stored_before_the_statistics_are_counted_once(fresh_url):  # noqa: F811
    engine = engine_for(fresh_url)
    migrate(engine, "0008")
    db = session_factory(fresh_url)
    model = f"old-{uuid.uuid4().hex[:6]}"
    with db.begin() as s:  # the ORM's insert, not the API's: no statistics exist yet
        ids = _make_jobs(s, 4, model)
        _succeed(s, ids[0], 12.0, 2 * GB, 3.0)
    migrate(engine)
    with db() as s:
        counts = jobstats.counts(s)
        assert counts == {(model, "queued"): 3, (model, "succeeded"): 1}
        assert Counter(jobstats.histograms(s)["peak"][model][0])[1] == 1


def test_a_batch_of_submissions_and_a_bulk_delete_are_counted_per_job(fresh_url):  # noqa: F811
    """The API stores submissions in batches (one executemany per group commit, api/submit.py) and retention
    deletes in bulk: the counts follow both, job by job, before and after a fold."""
    db = session_factory(fresh_url)
    rows = [jobstore.new_job_values(jobstore.NewJob(PARAMS.model_copy(update={"model": m})))
            for m in ["m-a"] * 30 + ["m-b"] * 10]
    with db.begin() as s:
        s.execute(Job.__table__.insert(), rows)  # what the API's group commit runs
    with db() as s:
        assert jobstats.counts(s) == {("m-a", "queued"): 30, ("m-b", "queued"): 10} == _truth(s)[0]
    with db.begin() as s:
        s.execute(delete(Job).where(Job.id.in_([r["id"] for r in rows[:20]] + [rows[-1]["id"]])))
    with db() as s:
        assert jobstats.counts(s) == {("m-a", "queued"): 10, ("m-b", "queued"): 9} == _truth(s)[0]
    with db.begin() as s:
        assert jobstats.compact(s) > 0
    with db() as s:
        assert jobstats.counts(s) == {("m-a", "queued"): 10, ("m-b", "queued"): 9}
