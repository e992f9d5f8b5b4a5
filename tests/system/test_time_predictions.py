"""Time, as memory is, with real workers on the tiny model: a worker's first job has no prediction ("no
measurement yet"), the jobs after it do (its own shape's and others'), and its profile shows what it measured;
queued jobs behind a running one have an expected start, later for the one further back, and say the worker is
busy; a job whose only worker is paused says so, with the worker's own reason, on its record and in the list.
How close the predictions are is the bench's (bench/timing.py), never asserted here."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.one_database  # the workers and the API, not SQL (tests/shared/test_timing.py is)

CACHE_S = 1.0  # the API's view of the fleet (SDFLEET_API_CACHE_S): what a job measured reaches it within this


def until(read, check, timeout: float = 60):
    """Read until `check` holds (what a client polling the record sees), or fail with the last reading."""
    deadline = time.monotonic() + timeout
    while not check(value := read()):
        assert time.monotonic() < deadline, value
        time.sleep(0.1)
    return value


def test_a_workers_jobs_give_predictions_and_queued_jobs_an_expected_start(stack, spawn_worker):
    model, _ = spawn_worker("timing")
    job = dict(prompt="a lighthouse", model=model, width=128, height=128, steps=8, guidance_scale=7.5)
    first = stack.api.submit(**job)
    assert first["predicted_generation_s"] is None  # nothing of this worker measured yet
    first = stack.api.wait(first["id"])
    assert first["status"] == "succeeded" and first["predicted_generation_s"] is None
    (profile,) = next(m for m in stack.api.models() if m["name"] == model)["profiles"]
    assert profile["step_s"] > 0 and profile["image_overhead_s"] >= 0 and profile["job_overhead_s"] >= 0

    time.sleep(CACHE_S + 0.2)  # the API's view of the fleet now holds the profile the first job measured
    again = stack.api.submit(**job)
    other = stack.api.submit(**{**job, "width": 256, "height": 192, "guidance_scale": 1.0, "steps": 5,
                                "num_images": 2})
    assert again["predicted_generation_s"] > 0 and other["predicted_generation_s"] > 0
    for record in (stack.api.wait(again["id"]), stack.api.wait(other["id"])):
        assert record["status"] == "succeeded" and record["predicted_generation_s"] > 0
        assert record["expected_start_s"] is None and record["waiting_reason"] is None  # not queued

    # a long job runs; two wait behind it
    blocker = stack.api.submit(prompt="a long one", model=model, width=256, height=256, steps=150, num_images=4)
    queued = []
    try:
        wait_for(stack, blocker["id"], "status", "running")
        until(lambda: stack.api.job(blocker["id"]), lambda r: r["progress"] and r["progress"]["step"] > 0)
        queued = [stack.api.submit(**{**job, "prompt": f"behind {n}"}) for n in (1, 2)]
        one = until(lambda: stack.api.job(queued[0]["id"]), lambda r: "busy" in (r["waiting_reason"] or ""))
        two = stack.api.job(queued[1]["id"])
        assert one["status"] == two["status"] == "queued"
        assert one["waiting_reason"] == "the worker that can take it is busy: 1 job(s) running, 0 queued ahead of it"
        assert two["waiting_reason"] == "the worker that can take it is busy: 1 job(s) running, 1 queued ahead of it"
        assert one["expected_start_s"] > 0 and two["expected_start_s"] > one["expected_start_s"]
        # the list says the same, in the statements of one page
        listed = {j["id"]: j for j in stack.api.jobs(status=["queued"], limit=200)["jobs"]}
        assert listed[queued[1]["id"]]["waiting_reason"] == two["waiting_reason"]
        assert listed[queued[1]["id"]]["queue_position"] == two["queue_position"] == 2
        assert listed[queued[1]["id"]]["expected_start_s"] > 0
    finally:
        for j in (*queued, blocker):
            stack.api.http.delete(f"/v1/jobs/{j['id']}")


def test_a_job_whose_only_worker_is_paused_says_why(stack, spawn_worker):
    """A worker whose pause threshold is above this machine's memory pauses at once (as it would for an owner's
    busy CPUs): the job waits, and its record names the worker and its reason instead of saying nothing."""
    threshold = 2 * psutil.virtual_memory().total
    model, _ = spawn_worker("paused", SDFLEET_PAUSE_AVAILABLE_BYTES=threshold, SDFLEET_HEARTBEAT_S=1)
    (worker,) = until(lambda: [w for w in stack.api.workers() if w["model"] == model],
                      lambda ws: ws and ws[0]["state"] == "paused")
    assert "SDFLEET_PAUSE_AVAILABLE_BYTES" in worker["state_reason"]
    job = stack.api.submit(prompt="waits for the owner", model=model, width=64, height=64, steps=1)
    try:
        record = until(lambda: stack.api.job(job["id"]), lambda r: "paused" in (r["waiting_reason"] or ""))
        assert record["status"] == "queued" and record["expected_start_s"] is None
        reason = record["waiting_reason"]
        assert reason.startswith(f"the only worker that can take it is paused ({worker['name']}: the host's "
                                 "available memory is ")
        assert reason.endswith("(SDFLEET_PAUSE_AVAILABLE_BYTES))")
        listed = next(j for j in stack.api.jobs(status=["queued"], limit=200)["jobs"] if j["id"] == job["id"])
        assert listed["waiting_reason"].startswith(f"the only worker that can take it is paused ({worker['name']}")
    finally:
        stack.api.http.delete(f"/v1/jobs/{job['id']}")
