"""SDFLEET_MEMORY_MODE=auto end to end: a real worker on the tiny model announces "auto", runs each job in the
fastest lever set whose predicted peak fits its budget, says in the job's record which set ran and why, measures
a profile per set, and switches back and forth between jobs without restarting, each set making the same image.
The predictions that make the choice are the worker's own, from the profiles in the database: the tiny model's
jobs fit any budget, so a measured profile of the faster sets past the budget (as a larger job would leave) is
what makes it choose a cheaper one. Admission's side, on both databases: tests/api/test_auto_admission.py."""

from __future__ import annotations

import pytest

from shared import fleet
from shared.db import session_factory
from shared.memory import GB, Shape
from shared.models import MemoryProfile

# processes and a client: the SQL under them runs on both databases in tests/api/test_auto_admission.py
pytestmark = pytest.mark.one_database

JOB = {"prompt": "a lighthouse in a storm", "width": 64, "height": 64, "guidance_scale": 7.5, "steps": 2, "seed": 5}


def test_an_auto_worker_runs_each_job_in_the_fastest_set_that_fits_and_says_so(stack, spawn_worker):
    model, _ = spawn_worker("auto", SDFLEET_MEMORY_MODE="auto", SDFLEET_MEMORY_BUDGET=2 * GB)
    (worker,) = [w for w in stack.api.workers() if w["model"] == model]
    assert worker["memory_mode"] == "auto"
    # its fast and balanced sets run guidance as one batch-2 pass: guidance jobs are shaped (and profiled) apart
    assert worker["defaults"]["guidance_doubles_batch"] is True
    sessions = session_factory(stack.database_url)

    def run() -> dict:
        done = stack.api.wait(stack.api.submit(model=model, **JOB)["id"], timeout=120)
        assert done["status"] == "succeeded", done["error"]
        return done

    first = run()
    assert first["lever_set"] == "fast"
    assert first["lever_reason"].startswith("auto: fast, predicted ") and "fits the budget of 2.0 GiB" in first["lever_reason"]
    assert 0 < first["lever_predicted_bytes"] <= 2 * GB  # the worker's own prediction there, under its budget
    png = stack.api.image(first["images"][0]["url"])

    # the faster sets measured past the budget at this shape: the next job runs in low, the image the same
    with sessions.begin() as s:
        (measured,) = s.query(MemoryProfile).filter_by(model=model, memory_mode="fast")
        shape = Shape(measured.width, measured.height, measured.guidance)
        for key in ("fast", "balanced"):
            fleet.record_profile(s, model, worker["backend"], worker["precision"], key, shape, 3 * GB, GB)
    low = run()
    assert low["lever_set"] == "low", low["lever_reason"]
    assert "fast would need 3.0 GiB, balanced would need 3.0 GiB" in low["lever_reason"]
    assert low["lever_predicted_bytes"] <= 2 * GB
    assert stack.api.image(low["images"][0]["url"]) == png
    with sessions() as s:
        keys = {p.memory_mode for p in s.query(MemoryProfile).filter_by(model=model)}
    assert keys == {"fast", "balanced", "low"}  # each set's profile apart; low's measured by that job

    # fast fits again (its profile gone): the worker switches back, and its job's peak is fast's again
    with sessions.begin() as s:
        s.query(MemoryProfile).filter_by(model=model, memory_mode="fast").delete()
    again = run()
    assert again["lever_set"] == "fast" and stack.api.image(again["images"][0]["url"]) == png
    assert again["peak_rss_bytes"] > low["peak_rss_bytes"]  # everything resident again, not one phase's part
