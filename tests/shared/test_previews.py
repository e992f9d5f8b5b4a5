"""Live previews in the database (shared/previews.py), on SQLite and PostgreSQL: written only by the attempt that
holds the running job, one per job (the latest replaces the last), named in the job's record and in a page of
the list without a statement per job, gone when the job ends (also when it is cancelled or fails), and deleted
with a job by retention. The worker's own writes under its database role: tests/shared/test_privilege.py."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import event, select

from ops.retention import delete_expired
from shared import jobstore, previews
from shared.errors import ErrorCode
from shared.jobs import JobParameters, JobStatus
from shared.models import Job, JobPreview, JobTombstone, utcnow
from tests.helpers import database_url, db  # noqa: F401  (this module's database, on each backend)

PARAMS = JobParameters(prompt="a lighthouse", negative_prompt=None, width=128, height=64, steps=20,
                       guidance_scale=7.5, seed=1, num_images=2, model="m-preview")
READING = jobstore.MemoryReading(100, 60, 40, 90, "vmhwm")
JPEG = b"\xff\xd8\xff\xe0 a small jpeg"


def _running(db) -> jobstore.Attempt:
    with db.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
        job_id, delivery = job.id, job.delivery_id
    with db.begin() as s:
        return jobstore.start_attempt(s, job_id, delivery, "host-a", "host-a:1", max_attempts=3)


def _save(db, attempt: jobstore.Attempt, step: int, image: int = 0, data: bytes = JPEG) -> bool:
    with db.begin() as s:
        return previews.save(s, attempt.job_id, attempt.number, image, step, PARAMS.steps, data, "image/jpeg", 16, 8)


def _record(db, job_id: str):
    with db() as s:
        return jobstore.to_public(jobstore.get_job(s, job_id))


def test_the_attempt_holding_the_job_writes_its_latest_preview_and_the_record_names_it(db):
    attempt = _running(db)
    assert _record(db, attempt.job_id).preview is None  # none before the first
    assert _save(db, attempt, 3)
    assert _save(db, attempt, 9, image=1, data=JPEG + b"9")  # the latest replaces the last
    with db() as s:
        rows = s.scalars(select(JobPreview).where(JobPreview.job_id == attempt.job_id)).all()
        assert len(rows) == 1
        row = previews.load(s, attempt.job_id)
    assert (row.image, row.step, row.steps, row.data, row.media_type, row.width, row.height) == (
        1, 9, 20, JPEG + b"9", "image/jpeg", 16, 8)
    link = _record(db, attempt.job_id).preview
    assert link.url == f"/v1/jobs/{attempt.job_id}/preview"
    assert (link.image, link.step, link.steps, link.width, link.height) == (1, 9, 20, 16, 8)
    assert abs(link.written_at - utcnow()) < timedelta(minutes=1)
    # with an owner, only the owner's job has one
    with db() as s:
        assert previews.load(s, attempt.job_id, owner_key_id="someone-else") is None


def test_an_attempt_that_no_longer_holds_the_job_writes_none(db):
    attempt = _running(db)
    assert _save(db, attempt, 2)
    with db.begin() as s:  # the worker leaves: handed back, queued again (its last preview stays meanwhile)
        assert jobstore.hand_back(s, attempt, "the worker is stopping (SIGTERM)")
    assert not _save(db, attempt, 5)  # queued: nobody holds it
    with db() as s:
        job = s.get(Job, attempt.job_id)
        assert previews.load(s, attempt.job_id).step == 2
        delivery = job.delivery_id
    with db.begin() as s:
        second = jobstore.start_attempt(s, attempt.job_id, delivery, "host-b", "host-b:1", max_attempts=3)
    assert not _save(db, attempt, 7)  # the first attempt, late: another holds the job now
    assert _save(db, second, 4)
    with db() as s:
        row = previews.load(s, attempt.job_id)
        assert (row.attempt, row.step) == (2, 4)


def test_the_preview_goes_when_the_job_ends_however_it_ends(db):
    ended = []
    for end in ("succeeded", "failed", "cancelled"):
        attempt = _running(db)
        assert _save(db, attempt, 5)
        with db.begin() as s:
            if end == "succeeded":
                assert jobstore.finish_succeeded(s, attempt, [jobstore.GeneratedImage(0, 1, 128, 64, b"png")], 1.0,
                                                 READING)
            else:
                code = ErrorCode.generation_failed if end == "failed" else ErrorCode.cancelled
                assert jobstore.finish_failed(s, attempt, code, end, READING)
        record = _record(db, attempt.job_id)
        assert record.status.value == end and record.preview is None
        with db() as s:
            assert previews.load(s, attempt.job_id) is None
        ended.append(attempt.job_id)
    assert not _save(db, attempt, 6)  # an ended job takes none


def test_a_page_of_the_list_reads_its_previews_in_one_statement_not_one_per_job(db, database_url):
    from shared.db import engine_for

    def statements(n_jobs: int) -> tuple[int, list]:
        attempts = [_running(db) for _ in range(n_jobs)]
        for i, a in enumerate(attempts):
            _save(db, a, i + 1)
        seen = []
        engine = engine_for(database_url)
        listener = lambda *args: seen.append(args[2])  # noqa: E731  (before_cursor_execute: the statement)
        event.listen(engine, "before_cursor_execute", listener)
        try:
            with db() as s:
                page = jobstore.list_jobs(s, None, [JobStatus.running], 200)
                records = [jobstore.to_public(j) for j in page]
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        steps = {r.id: r.preview.step for r in records if r.preview}
        assert all(steps[a.job_id] == i + 1 for i, a in enumerate(attempts))
        for a in attempts:  # out of the next round's running jobs
            with db.begin() as s:
                jobstore.finish_failed(s, a, ErrorCode.cancelled, "done", None)
        return len(seen), seen

    few, _ = statements(2)
    many, seen = statements(12)
    assert many == few, seen  # the jobs, their images, their previews: a statement each per page


def test_retention_deletes_a_job_with_a_preview_left(db):
    attempt = _running(db)
    assert _save(db, attempt, 5)
    with db.begin() as s:  # ended by some path that left its preview (none does: retention must not mind)
        s.get(Job, attempt.job_id).status = JobStatus.failed.value
        s.get(Job, attempt.job_id).finished_at = utcnow() - timedelta(days=10)
    with db.begin() as s:
        stones = delete_expired(s, utcnow() - timedelta(days=1), None)
    assert attempt.job_id in {t.job_id for t in stones}
    with db() as s:
        assert s.get(Job, attempt.job_id) is None and previews.load(s, attempt.job_id) is None
        assert s.get(JobTombstone, attempt.job_id) is not None
