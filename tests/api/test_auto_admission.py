"""Admission of jobs to workers with SDFLEET_MEMORY_MODE=auto: such a worker announces "auto" and runs each job in
the fastest lever set whose predicted peak fits its budget, so a job is admitted if the cheapest set it can switch
to fits, judged by that set's own profiles; its time is predicted in the set it would run in. In-process against
real Redis, on both databases; the workers are heartbeats (tests/system/test_auto_mode.py runs a real one)."""

from __future__ import annotations

import uuid

from shared import fleet
from shared.fleet_contract import WorkerState
from shared.memory import GB, Shape
from shared.models import utcnow
from shared.timing import StepTiming

# this module's own database on each backend, the in-process API
from tests.helpers import assert_error_shape, database_url, db, make_api  # noqa: F401

JOB = {"prompt": "a lighthouse", "width": 512, "height": 512, "guidance_scale": 7.5, "steps": 10}


def beat(db, model: str, mode: str, budget: int = 6 * GB) -> None:  # noqa: F811
    with db.begin() as s:
        fleet.beat(s, WorkerState(name=f"{model}:{mode}", host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode=mode, budget_bytes=budget, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())


def measured(db, model: str, key: str, peak: float, base: float, step_s: float) -> None:  # noqa: F811
    with db.begin() as s:
        fleet.record_profile(s, model, "optimum", "bf16", key, Shape(512, 512, True), int(peak * GB), int(base * GB),
                             step_s, StepTiming(step_s, 1.0, 0.5))


def test_an_auto_worker_takes_what_its_cheapest_set_fits_and_a_fixed_one_refuses(db, database_url, redis_url):  # noqa: F811
    fast_only, auto = f"fast-{uuid.uuid4().hex[:6]}", f"auto-{uuid.uuid4().hex[:6]}"
    for model in (fast_only, auto):
        # fast peaked past the 6 GiB budget's class; low measured well under it
        measured(db, model, "fast", peak=7.5, base=5.0, step_s=1.0)
        measured(db, model, "low", peak=2.5, base=1.0, step_s=3.0)
    beat(db, fast_only, "fast")
    beat(db, auto, "auto")
    with make_api(database_url, redis_url) as client:
        refused = assert_error_shape(client.post("/v1/jobs", json={**JOB, "model": fast_only}), 422,
                                     "insufficient_memory")
        assert refused["details"]["predicted_bytes"] == int(7.5 * GB)
        r = client.post("/v1/jobs", json={**JOB, "model": auto})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["predicted_peak_bytes"] == int(2.5 * GB) and job["prediction_source"] == "profile"
        # its time: in the set it would run in (low: fast does not fit): 10 steps x 3 s + 1 s an image + 0.5 s
        assert job["predicted_generation_s"] == 31.5
        assert job["lever_set"] is None  # until a worker starts it
        plan = client.post("/v1/plan", json={"model": auto, "width": 512, "height": 512, "guidance_scale": 7.5}).json()
        assert plan["admitted"] and plan["workers"][0]["memory_mode"] == "auto"
        assert {m["memory_mode"]: m["predicted_peak_bytes"] for m in plan["modes"]} == \
            {"fast": int(7.5 * GB), "low": int(2.5 * GB)}


def test_an_auto_worker_with_room_is_predicted_in_its_fastest_set_and_by_the_prior_before_any_profile(
        db, database_url, redis_url):  # noqa: F811
    roomy, new = f"roomy-{uuid.uuid4().hex[:6]}", f"new-{uuid.uuid4().hex[:6]}"
    measured(db, roomy, "fast", peak=3.0, base=2.0, step_s=1.0)
    measured(db, roomy, "balanced", peak=2.8, base=1.8, step_s=1.2)
    beat(db, roomy, "auto", budget=16 * GB)
    beat(db, new, "auto", budget=16 * GB)
    with make_api(database_url, redis_url) as client:
        job = client.post("/v1/jobs", json={**JOB, "model": roomy}).json()
        # the least of the measured sets' predictions; the time of the fastest that fits (fast: 10 x 1 s + 1.5)
        assert job["predicted_peak_bytes"] == int(2.8 * GB) and job["predicted_generation_s"] == 11.5
        job = client.post("/v1/jobs", json={**JOB, "model": new}).json()
        assert job["prediction_source"] == "prior" and job["predicted_generation_s"] is None
