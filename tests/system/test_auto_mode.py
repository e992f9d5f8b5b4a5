"""SDFLEET_MEMORY_MODE=auto end to end: a real worker on the tiny model announces "auto", runs each job in the
fastest lever set whose predicted peak fits its budget, says in the job's record which set ran and why, measures
a profile per set, and switches back and forth between jobs without restarting, each set making the same image.
The predictions that make the choice are the worker's own, from the profiles in the database: the tiny model's
jobs fit any budget, so a measured profile of the faster sets past the budget (as a larger job would leave) is
what makes it choose a cheaper one. Admission's side, on both databases: tests/api/test_auto_admission.py."""

from __future__ import annotations

import re

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
        # and low's at the budget: no room to keep anything compiled, one phase's components at a time
        fleet.record_profile(s, model, worker["backend"], worker["precision"], "low", shape, 2 * GB - 1, 2 * GB - 1)
    low = run()
    assert low["lever_set"] == "low", low["lever_reason"]
    assert "fast would need 3.0 GiB, balanced would need 3.0 GiB" in low["lever_reason"]
    assert low["lever_predicted_bytes"] <= 2 * GB and "kept" not in low["lever_reason"]
    assert stack.api.image(low["images"][0]["url"]) == png
    with sessions() as s:
        keys = {p.memory_mode for p in s.query(MemoryProfile).filter_by(model=model)}
    assert keys == {"fast", "balanced", "low"}  # each set's profile apart

    # fast fits again (its profile gone): the worker switches back, and its job's peak is fast's again
    with sessions.begin() as s:
        s.query(MemoryProfile).filter_by(model=model, memory_mode="fast").delete()
    again = run()
    assert again["lever_set"] == "fast" and stack.api.image(again["images"][0]["url"]) == png
    assert again["peak_rss_bytes"] > low["peak_rss_bytes"]  # everything resident again, not one phase's part


def test_a_low_worker_keeps_compiled_what_its_budget_has_room_for_and_drops_it_when_not(stack, spawn_worker):
    """Low mode compiles each component for its phase and releases it after; what the next job would load again
    stays compiled while the worker's budget has room for it after the job's predicted peak (the record says
    which), and is dropped when it has not. The images are low mode's either way; the worker announces what it
    keeps in its resident figure, so admission's prediction counts it."""
    model, _ = spawn_worker("keep", SDFLEET_MEMORY_MODE="low", SDFLEET_MEMORY_BUDGET=2 * GB)
    (worker,) = [w for w in stack.api.workers() if w["model"] == model]
    sessions = session_factory(stack.database_url)

    def run() -> dict:
        done = stack.api.wait(stack.api.submit(model=model, **JOB)["id"], timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert done["lever_set"] == "low"
        return done

    first = run()  # the tiny model's components fit any budget beside its job: all of them stay
    assert "kept compiled through the job: " in first["lever_reason"], first["lever_reason"]
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert name in first["lever_reason"].split("kept compiled through the job: ")[1]
    assert first["lever_predicted_bytes"] <= 2 * GB
    png = stack.api.image(first["images"][0]["url"])
    with sessions() as s:
        (profile,) = s.query(MemoryProfile).filter_by(model=model, memory_mode="low")
        shape = Shape(profile.width, profile.height, profile.guidance)

    kept = run()  # nothing to compile: faster, the same image
    assert stack.api.image(kept["images"][0]["url"]) == png
    # the first job measured the kept components' buffers at this shape: now they stay past their phase too
    assert "their buffers too: " in kept["lever_reason"], kept["lever_reason"]
    assert kept["lever_predicted_bytes"] >= 0.95 * kept["peak_rss_bytes"]  # the worker counted them
    assert kept["predicted_peak_bytes"] >= 0.95 * kept["peak_rss_bytes"]  # admission counted what it keeps

    # a measured peak at the budget: no room beside the job, so nothing is kept and low mode runs as it is
    with sessions.begin() as s:
        fleet.record_profile(s, model, worker["backend"], worker["precision"], "low", shape, 2 * GB - 1, 2 * GB - 1)
    tight = run()
    assert "kept" not in tight["lever_reason"], tight["lever_reason"]
    assert stack.api.image(tight["images"][0]["url"]) == png
    assert tight["peak_rss_bytes"] < kept["peak_rss_bytes"]  # one phase's components at a time again


def test_a_worker_keeps_the_runtime_s_buffers_for_a_next_job_of_the_same_kind_and_counts_them_apart(stack,
                                                                                                 spawn_worker,
                                                                                                 tmp_path):
    """The runtime's buffers for a job's shape are given back after the first job of a kind (what they hold
    measured so) and kept after the later ones for a next job of that kind, which then allocates nothing again;
    a job of another kind starts with them given back. The resident figure the worker announces leaves them
    out, so admission's predictions and the profiles are those of a worker that gives them back."""
    model, _ = spawn_worker("buffers", SDFLEET_MEMORY_MODE="fast")

    def run(**over) -> dict:
        done = stack.api.wait(stack.api.submit(model=model, **{**JOB, **over})["id"], timeout=120)
        assert done["status"] == "succeeded", done["error"]
        return done

    def resident() -> int:
        (w,) = [w for w in stack.api.workers() if w["model"] == model]
        return w["resident_bytes"]

    large = dict(width=512, height=512)  # (its buffers: tens of MiB, past the tolerance below)
    first = run(**large)  # measures the buffers by giving them back
    after_first = resident()
    said = (tmp_path / f"{model}.log").read_text()
    held = re.search(r"the runtime's buffers for .* held ([\d.]+) (MiB|GiB): kept from now on", said)
    assert held and float(held.group(1)) * (1024 if held.group(2) == "GiB" else 1) > 8, said[-2000:]
    same = [run(**large) for _ in range(3)]  # the second keeps them for the third and the fourth, which reuse them
    assert all(stack.api.image(d["images"][0]["url"]) == stack.api.image(first["images"][0]["url"]) for d in same)
    # the resident figure leaves the kept buffers out: what a job of another kind starts from once they go back
    assert resident() <= after_first + (8 << 20)
    for done in (first, *same):
        assert done["lever_predicted_bytes"] >= 0.95 * done["peak_rss_bytes"]
    other = run(width=96, height=64)  # another shape: the kept buffers go back before it starts
    assert other["lever_predicted_bytes"] >= 0.95 * other["peak_rss_bytes"]
