"""Failures on real worker processes: a pipeline that raises, a child SIGKILLed mid-job (as by the kernel
OOM killer), a job that kills its child every time, and the memory guard."""

from __future__ import annotations

import os
import signal
import time
import pytest

from shared import jobstore
from shared.memory import GB
from tests.conftest import pool_child
from tests.helpers import wait_status

pytestmark = pytest.mark.one_database  # processes and signals; the SQL is tested on both databases

FAULTY = {"SDFLEET_BACKEND": "tests.fakes:faulty"}


def test_exception_fails_the_job_and_the_next_job_succeeds_on_the_same_worker(stack, spawn_worker):
    model, proc = spawn_worker("raising", **FAULTY)
    child = pool_child(proc)
    failed = stack.api.wait(stack.api.submit(prompt="FAIL please", model=model, width=64, height=64,
                                             steps=1)["id"], timeout=120)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "generation_failed"
    assert "RuntimeError: injected failure" in failed["error"]["message"]
    assert failed["images"] == [] and failed["attempts"] == 1
    assert failed["finished_at"] is not None and failed["peak_rss_bytes"] > 0

    ok = stack.api.wait(stack.api.submit(prompt="a quiet river", model=model, width=64, height=64,
                                         steps=1)["id"], timeout=120)
    assert ok["status"] == "succeeded", ok["error"]
    assert len(ok["images"]) == 1
    assert pool_child(proc) == child  # the same pool child ran both


def test_child_killed_mid_job_is_redelivered_and_succeeds_on_the_second_attempt(stack, spawn_worker):
    model, proc = spawn_worker("sigkill")
    first_child = pool_child(proc)
    job = stack.api.submit(prompt="a long job", model=model, width=512, height=512, steps=150,
                           guidance_scale=1.0, seed=3)
    wait_status(stack, job["id"], "running")
    time.sleep(0.3)
    os.kill(first_child, signal.SIGKILL)
    done = stack.api.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["error"] is None
    assert len(done["images"]) == 1
    (lost,) = done["history"]  # the killed attempt: where it ran, why it ended, its last reading
    assert lost["attempt"] == 1 and lost["error"]["code"] == "worker_lost" and lost["peak_rss_bytes"] > 0
    assert pool_child(proc) != first_child  # Celery replaced the child, which loaded the model again
    with stack.sessions() as s:  # stored once
        assert len(jobstore.get_job(s, job["id"]).images) == 1


def test_job_that_kills_its_worker_every_time_ends_worker_lost_after_max_attempts(stack, spawn_worker):
    model, proc = spawn_worker("poison", SDFLEET_MAX_ATTEMPTS=2, **FAULTY)
    job = stack.api.submit(prompt="KILL the worker", model=model, width=64, height=64, steps=1)
    done = stack.api.wait(job["id"], timeout=180)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "worker_lost"
    assert done["attempts"] == 2
    assert "attempt 2 of 2" in done["error"]["message"] and "died" in done["error"]["message"]
    # the first death was noticed by the pool child that replaced the dead one: queued again, kept in history
    (first,) = done["history"]
    assert first["attempt"] == 1 and first["error"]["code"] == "worker_lost" and "died" in first["error"]["message"]
    assert first["worker_host"] == done["worker_host"] and first["ended_at"] <= done["finished_at"]
    assert done["peak_rss_bytes"] > 0 and done["peak_rss_method"] == "partial"  # the last reading
    assert "GiB resident when last seen" in done["error"]["message"]
    # it is never run again: the worker serves the next job, and the poison job stays as it ended
    ok = stack.api.wait(stack.api.submit(prompt="a calm sea", model=model, width=64, height=64,
                                         steps=1)["id"], timeout=180)
    assert ok["status"] == "succeeded"
    assert stack.api.job(job["id"]) == done


def test_guard_aborts_a_job_past_the_budget_and_the_worker_goes_on(stack, spawn_worker):
    budget = int(1.5 * GB)
    model, proc = spawn_worker("guarded", SDFLEET_MEMORY_BUDGET=budget, **FAULTY)
    child = pool_child(proc)
    (w,) = [w for w in stack.api.workers() if w["model"] == model]
    assert w["budget_bytes"] == budget and w["alive"]
    assert w["resident_bytes"] < budget - 500 * 2**20  # room for a normal job, not for the fake's 2 GB

    job = stack.api.submit(prompt="ALLOC=200 a hungry job", model=model, width=64, height=64, steps=10,
                           guidance_scale=1.0)
    assert job["prediction_source"] == "prior" and job["predicted_peak_bytes"] < budget
    done = stack.api.wait(job["id"], timeout=120)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "out_of_memory"
    assert "past this worker's budget" in done["error"]["message"]
    assert done["peak_rss_bytes"] > budget  # the measured peak is recorded
    assert done["peak_rss_bytes"] < budget + 3 * 200 * 2**20  # stopped within a step or two of crossing
    assert done["images"] == []

    timeline = stack.api.memory(job["id"])
    assert {"encode", "denoise"} <= {s["phase"] for s in timeline["samples"]}
    assert max(s["rss"] for s in timeline["samples"]) > budget

    ok = stack.api.wait(stack.api.submit(prompt="a small job", model=model, width=64, height=64, steps=2,
                                         guidance_scale=1.0)["id"], timeout=120)
    assert ok["status"] == "succeeded", ok["error"]
    assert ok["peak_rss_bytes"] < budget
    assert pool_child(proc) == child  # the same child, its memory given back
