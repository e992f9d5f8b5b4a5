"""The kill storm and the graceful stop, apart from the other fault tests so that the two run in parallel
(each takes minutes): real Redis, the database and real worker processes; no job lost, none completed
twice."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import pool_child
from tests.helpers import LONG, SHORT, image_counts, jobs_of, wait_all_terminal
from tests.helpers import wait_status

pytestmark = pytest.mark.one_database  # processes and signals; the SQL is tested on both databases
KILLS = 8  # pool children SIGKILLed mid-job, one after another (each costs a reload: ~6 s)


def test_worker_sigkilled_again_and_again_during_jobs_while_others_wait(stack, spawn_worker):
    model, proc = spawn_worker("killed", SDFLEET_MAX_ATTEMPTS=2)
    submitted = [stack.api.submit(prompt=f"job {i}", model=model, **LONG)["id"] for i in range(4)]
    kills, killed = 0, set()
    deadline = time.monotonic() + 600
    while kills < KILLS:
        assert time.monotonic() < deadline, f"only {kills} kills"
        rows = jobs_of(stack, model)
        if sum(j.status in ("queued", "running") for j in rows) < 3:  # keep others waiting
            submitted.append(stack.api.submit(prompt=f"job {len(submitted)}", model=model, **LONG)["id"])
        # an attempt in progress (its own progress, written by the child now running it), surely mid-job;
        # a killed attempt's row says running until the job is delivered again: never counted twice
        running = [j for j in rows if j.status == "running" and (j.id, j.attempts) not in killed
                   and j.progress_step is not None and 0 < j.progress_step < j.progress_steps // 2]
        try:
            child = pool_child(proc)
        except ValueError:  # between children
            continue
        if running:
            os.kill(child, signal.SIGKILL)
            killed.add((running[0].id, running[0].attempts))
            kills += 1
        time.sleep(0.1)

    rows = wait_all_terminal(stack, model)
    assert {j.id for j in rows} == set(submitted)  # nothing lost, nothing invented
    images = image_counts(stack, model)
    succeeded = [j for j in rows if j.status == "succeeded"]
    for j in rows:
        assert j.status in ("succeeded", "failed"), (j.id, j.status)
        assert 1 <= j.attempts <= 2
        if j.status == "succeeded":
            assert images.get(j.id) == 1  # stored once: never completed twice
        else:
            assert j.error_code == "worker_lost" and j.attempts == 2 and j.id not in images
    # every kill cost exactly one attempt of a job: a redelivery, or the second of a worker_lost
    assert sum(j.attempts for j in rows) - len(succeeded) == kills
    assert len(succeeded) >= len(rows) - kills // 2




def test_sigterm_hands_back_the_current_job_and_leaves_the_rest_queued(stack, spawn_worker):
    model, proc = spawn_worker("graceful")
    current = stack.api.submit(prompt="a long job", model=model, **LONG)
    waiting = [stack.api.submit(prompt=f"waiting {i}", model=model, **SHORT)["id"] for i in range(2)]
    wait_status(stack, current["id"], "running")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    left = stack.api.job(current["id"])
    assert left["status"] == "queued" and [h["error"]["code"] for h in left["history"]] == ["worker_left"]
    for job_id in waiting:
        assert stack.api.job(job_id)["status"] == "queued"
    spawn_worker(model=model)  # a worker for the same model takes them over
    for job_id in waiting:
        done = stack.api.wait(job_id, timeout=60)
        assert done["status"] == "succeeded" and done["attempts"] == 1
    done = stack.api.wait(current["id"], timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 2  # the handed-back attempt did not count
