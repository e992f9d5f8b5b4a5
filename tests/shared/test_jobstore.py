"""Job states: one guarded transition table, compare-and-set in the database, attempts counted there."""

from __future__ import annotations

import re

import pytest

from shared import jobstore
from shared.db import session_factory
from shared.errors import ErrorCode, InvalidTransition
from shared.jobs import JobParameters, JobStatus, check_transition
from shared.models import Job
from tests.conftest import ROOT

PARAMS = JobParameters(prompt="a cat", negative_prompt=None, width=64, height=64, steps=1, guidance_scale=1.0,
                       seed=1, num_images=1, model="tiny")
READING = jobstore.MemoryReading(100, 60, 40, 90, "vmhwm")


def test_terminal_states():
    assert {s for s in JobStatus if s.is_terminal} == {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}


def documented_transitions() -> set[tuple[JobStatus, JobStatus]]:
    """The state machine as docs/api.md's "Job states" table documents it (not the code's own table)."""
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("## Job states", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+) \| (\w+) \| .+ \|$", section, re.MULTILINE)
    pairs = {(JobStatus(a), JobStatus(b)) for a, b in rows if a != "from"}
    assert len(pairs) >= 5, section
    return pairs


DOCUMENTED = documented_transitions()


@pytest.mark.parametrize("old", list(JobStatus))
@pytest.mark.parametrize("new", list(JobStatus))
def test_the_code_allows_exactly_the_documented_transitions(old, new, sessions):
    documented = (old, new) in DOCUMENTED
    if documented:
        check_transition(old, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(old, new)
    # and on a row: the compare-and-set moves it only along a documented edge
    job_id, _ = _new_job(sessions)
    with sessions.begin() as s:
        s.get(Job, job_id).status = old.value
    with sessions.begin() as s:
        if documented:
            assert jobstore.transition(s, job_id, old, new)
        else:
            with pytest.raises(InvalidTransition):
                jobstore.transition(s, job_id, old, new)
    with sessions() as s:
        assert s.get(Job, job_id).status == (new if documented else old).value


@pytest.fixture
def sessions(sqlite_url):
    return session_factory(sqlite_url)


def _new_job(sessions) -> tuple[str, str]:
    with sessions.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
        return job.id, job.delivery_id


def _start(sessions, job_id, delivery, host):
    with sessions.begin() as s:
        return jobstore.start_attempt(s, job_id, delivery, host, f"{host}:1", max_attempts=2)


def test_attempt_runs_once_and_success_stores_images_once(sessions):
    job_id, delivery = _new_job(sessions)
    attempt = _start(sessions, job_id, delivery, "host-a")
    assert attempt.number == 1 and attempt.parameters == PARAMS
    image = jobstore.GeneratedImage(0, 1, 64, 64, b"png")
    with sessions.begin() as s:
        assert jobstore.finish_succeeded(s, attempt, [image], 1.5, READING)
    with sessions.begin() as s:  # a second completion of the same attempt changes nothing
        assert not jobstore.finish_succeeded(s, attempt, [image], 1.5, READING)
        assert not jobstore.finish_failed(s, attempt, ErrorCode.internal, "late", None)
    with sessions() as s:
        job = jobstore.get_job(s, job_id)
        assert job.status == "succeeded" and len(job.images) == 1 and job.peak_rss_bytes == 100
    assert _start(sessions, job_id, delivery, "host-b") is None  # a terminal job delivered again: not run


def test_redelivery_after_a_lost_worker_counts_attempts_then_fails_worker_lost(sessions):
    job_id, delivery = _new_job(sessions)
    first = _start(sessions, job_id, delivery, "host-a")
    # the worker died: the broker redelivers the same message while the row still says running
    second = _start(sessions, job_id, delivery, "host-b")
    assert second.number == 2
    with sessions.begin() as s:  # the lost first attempt can no longer write a result
        assert not jobstore.finish_succeeded(s, first, [], 1.0, READING)
    assert _start(sessions, job_id, delivery, "host-c") is None
    with sessions() as s:
        job = jobstore.to_public(jobstore.get_job(s, job_id))
    assert job.status == "failed" and job.error.code == "worker_lost" and job.attempts == 2
    assert "host-b" in job.error.message
    # the first attempt was taken back, and the history says where it ran and why it ended
    (first_try,) = job.history
    assert first_try.attempt == 1 and first_try.worker_host == "host-a" and first_try.error.code == "worker_lost"


def test_unknown_job_is_skipped(sessions):
    assert _start(sessions, "no-such-job", None, "host") is None


def test_a_message_from_before_a_requeue_is_stale(sessions):
    job_id, old = _new_job(sessions)
    with sessions.begin() as s:
        new = jobstore.requeue_lost_message(s, jobstore.get_job(s, job_id))
    assert new and new != old
    with sessions.begin() as s:  # a second reconciler acting on the same reading loses the race
        assert jobstore.requeue_lost_message(s, Job(id=job_id, delivery_id=old)) is None
    assert _start(sessions, job_id, old, "host-a") is None
    assert _start(sessions, job_id, new, "host-a").number == 1


def test_cancel_queued_running_and_finished(sessions):
    from shared.errors import Conflict

    queued, _ = _new_job(sessions)
    with sessions.begin() as s:
        assert jobstore.cancel(s, queued, None).status == "cancelled"
    with sessions.begin() as s:
        with pytest.raises(Conflict):
            jobstore.cancel(s, queued, None)
    running, delivery = _new_job(sessions)
    attempt = _start(sessions, running, delivery, "host-a")
    with sessions.begin() as s:
        job = jobstore.cancel(s, running, None)
        assert job.status == "running" and job.cancel_requested_at is not None
    with sessions.begin() as s:
        assert jobstore.sync_running(s, attempt, (0, 3, 10)) is True
    with sessions.begin() as s:
        assert jobstore.cancel(s, running, "another-owner") is None
