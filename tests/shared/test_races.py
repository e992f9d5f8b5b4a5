"""The shared store under races and limits, on each database: a cancel racing a finish, two workers
recording a new shape at once, a job taken back past its timeout, concurrent migrations; settings that refuse
a typo; the hard time limit."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from shared import fleet, jobstore
from shared.db import engine_for, schema_revision
from shared.errors import Conflict
from shared.jobs import JobStatus
from shared.jobstore import TakeBackOutcome
from shared.memory import GB, Shape
from shared.models import Job, MemoryProfile, utcnow
from shared.queue import hard_time_limit
from shared.settings import Settings
from tests.conftest import ROOT, free_port
from tests.helpers import PARAMS, database_url, db  # noqa: F401 (fixtures)


def test_an_unknown_setting_in_the_environment_is_refused_with_a_suggestion(monkeypatch):
    monkeypatch.setenv("SDFLEET_AUTHH", "required")
    with pytest.raises(ValueError, match="SDFLEET_AUTHH.*did you mean SDFLEET_AUTH"):
        Settings()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDFLEET_DATBASE_URL": "sqlite:///x.db"}
    env.pop("SDFLEET_AUTHH", None)
    r = subprocess.run([sys.executable, "-m", "sdfleet", "api", "--port", str(free_port())], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "SDFLEET_DATBASE_URL" in r.stderr and "SDFLEET_DATABASE_URL" in r.stderr


def test_cancel_of_a_job_that_just_finished_is_409_not_202(db):
    with db.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
        attempt = jobstore.start_attempt(s, job.id, job.delivery_id, "h", "h:1", 2)
    canceller = db()
    assert jobstore.get_job(canceller, job.id).status == "running"  # the API has read it running...
    with db.begin() as s:  # ...the worker finishes it...
        assert jobstore.finish_succeeded(s, attempt, [], 0.1, jobstore.MemoryReading(1, 1, 0, 1, "vmhwm"))
    with pytest.raises(Conflict, match="succeeded"):  # ...and the cancel's write finds it finished
        jobstore.cancel(canceller, job.id, None)
    canceller.rollback()
    canceller.close()
    with db() as s:
        row = s.get(Job, job.id)
        assert row.status == "succeeded" and row.cancel_requested_at is None


def test_two_workers_recording_a_new_shape_at_once_both_count(db):
    model = f"race-{uuid.uuid4().hex[:6]}"
    barrier = threading.Barrier(2)
    errors = []

    def finish(peak):
        try:
            with db.begin() as s:
                barrier.wait(10)
                fleet.record_profile(s, model, "optimum", "bf16", "fast", Shape(512, 512, True), peak, GB, 1.5)
        except Exception as exc:  # noqa: BLE001  (collected and asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(p,)) for p in (3 * GB, 4 * GB)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    with db() as s:
        (row,) = s.scalars(select(MemoryProfile).where(MemoryProfile.model == model))
    assert row.samples == 2 and row.peak_bytes == 4 * GB and row.max_step_s == 1.5


def test_a_job_taken_back_past_its_timeout_ends_timeout_and_keeps_its_history(db):
    with db.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
        jobstore.start_attempt(s, job.id, job.delivery_id, "host-a", "host-a:1", 3)
    with db.begin() as s:  # lost once, in time: queued again, its attempt in the history
        row = s.get(Job, job.id)
        assert jobstore.take_back(s, row, "the worker was lost", 3, 600).outcome is TakeBackOutcome.queued
    with db.begin() as s:
        row = s.get(Job, job.id)
        assert row.status == "queued" and row.attempts == 1 and len(row.history) == 1
        jobstore.start_attempt(s, job.id, row.delivery_id, "host-b", "host-b:1", 3)
    with db.begin() as s:  # lost again after running past the timeout (a hard time limit kill)
        row = s.get(Job, job.id)
        row.started_at = utcnow() - timedelta(seconds=700)
    with db.begin() as s:
        taken = jobstore.take_back(s, s.get(Job, job.id), "the worker was lost", 3, 600)
        assert taken.outcome is TakeBackOutcome.ended
    with db() as s:
        record = jobstore.to_public(s.get(Job, job.id))
    assert record.status is JobStatus.failed and record.error.code == "timeout"
    assert [h.worker_host for h in record.history] == ["host-a"]


def test_the_hard_time_limit_leaves_room_for_the_slowest_step():
    assert hard_time_limit(3600, None) == 3900
    assert hard_time_limit(3600, 70.0) == 3900  # one f32 SDXL step with guidance
    assert hard_time_limit(3600, 250.0) == 3600 + 750


def test_processes_migrating_a_fresh_sqlite_file_at_once_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = f"from shared.db import engine_for, migrate; migrate(engine_for({url!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE) for _ in range(4)]
    results = [(p.wait(60), p.stderr.read().decode()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    assert schema_revision(engine_for(url)) is not None
