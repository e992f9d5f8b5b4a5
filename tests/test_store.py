"""Job states: one guarded transition table, compare-and-set in the database, attempts counted there."""

from __future__ import annotations

import pytest

from shared import store
from shared.db import session_factory
from shared.errors import ErrorCode, InvalidTransition
from shared.jobs import ALLOWED, JobParameters, JobStatus, check_transition

PARAMS = JobParameters(prompt="a cat", negative_prompt=None, width=64, height=64, steps=1, guidance_scale=1.0,
                       seed=1, num_images=1, model="tiny")
READING = store.MemoryReading(100, 60, 40, 90, "vmhwm")


def test_terminal_states():
    assert {s for s in JobStatus if s.is_terminal} == {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


@pytest.mark.parametrize("old", list(JobStatus))
@pytest.mark.parametrize("new", list(JobStatus))
def test_transition_table(old, new):
    if new in ALLOWED[old]:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(old, new)
    if old.is_terminal:
        assert not ALLOWED[old]


@pytest.fixture
def sessions(sqlite_url):
    return session_factory(sqlite_url)


def _new_job(sessions) -> str:
    with sessions.begin() as s:
        return store.create_job(s, PARAMS).id


def test_attempt_runs_once_and_success_stores_images_once(sessions):
    job_id = _new_job(sessions)
    with sessions.begin() as s:
        attempt = store.start_attempt(s, job_id, "host-a", max_attempts=2)
    assert attempt.number == 1 and attempt.parameters == PARAMS
    image = store.GeneratedImage(0, 1, 64, 64, b"png")
    with sessions.begin() as s:
        assert store.finish_succeeded(s, attempt, [image], 1.5, READING)
    with sessions.begin() as s:  # a second completion of the same attempt changes nothing
        assert not store.finish_succeeded(s, attempt, [image], 1.5, READING)
        assert not store.finish_failed(s, attempt, ErrorCode.internal, "late", None)
    with sessions() as s:
        job = store.get_job(s, job_id)
        assert job.status == "succeeded" and len(job.images) == 1 and job.peak_rss_bytes == 100
    with sessions.begin() as s:  # a terminal job delivered again is not run again
        assert store.start_attempt(s, job_id, "host-b", max_attempts=2) is None


def test_redelivery_after_a_lost_worker_counts_attempts_then_fails_worker_lost(sessions):
    job_id = _new_job(sessions)
    with sessions.begin() as s:
        first = store.start_attempt(s, job_id, "host-a", max_attempts=2)
    # the worker died: the broker redelivers the same ID while the row still says running
    with sessions.begin() as s:
        second = store.start_attempt(s, job_id, "host-b", max_attempts=2)
    assert second.number == 2
    with sessions.begin() as s:  # the lost first attempt can no longer write a result
        assert not store.finish_succeeded(s, first, [], 1.0, READING)
    with sessions.begin() as s:
        assert store.start_attempt(s, job_id, "host-c", max_attempts=2) is None
    with sessions() as s:
        job = store.get_job(s, job_id)
        assert job.status == "failed" and job.error_code == "worker_lost" and job.attempts == 2
        assert "host-b" in job.error_message


def test_unknown_job_is_skipped(sessions):
    with sessions.begin() as s:
        assert store.start_attempt(s, "no-such-job", "host", max_attempts=2) is None
