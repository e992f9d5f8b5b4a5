"""The fleet's memory: heartbeats and /v1/workers, memory profiles and /v1/models, admission with reasons."""

from __future__ import annotations

from datetime import timedelta

import redis

from shared import fleet, store
from shared.memory import GB
from shared.models import utcnow
from shared.queue import queue_name
from tests.test_api_validation import assert_error_shape


def _job_count(stack) -> int:
    with stack.sessions() as s:
        return store.count_jobs(s)


def test_workers_heartbeat_and_a_silent_worker_is_gone_and_not_capacity(stack):
    (w,) = [w for w in stack.api.workers() if w["model"] == stack.model]
    assert w["alive"] and w["precision"] in ("bf16", "f32", "f16") and w["backend"] == "optimum"
    assert 0 < w["resident_bytes"] < w["budget_bytes"] <= w["total_ram_bytes"]
    assert w["last_seen"] >= w["started_at"]

    long_ago = utcnow() - timedelta(minutes=10)
    with stack.sessions.begin() as s:
        fleet.beat(s, fleet.heartbeat("gone-host:1", "gone-host", "ghost-model", "optimum", "bf16", "fast", 64 * GB,
                                      None, 128 * GB, 100 * GB, GB, None), long_ago)
        s.get(fleet.Worker, "gone-host:1").last_seen = long_ago
    (ghost,) = [w for w in stack.api.workers() if w["name"] == "gone-host:1"]
    assert ghost["alive"] is False
    assert "ghost-model" not in {m["name"] for m in stack.api.models()}
    before = _job_count(stack)
    r = stack.api.http.post("/v1/jobs", json={"prompt": "a cat", "model": "ghost-model"})
    error = assert_error_shape(r, 503, "model_unavailable")
    assert stack.model in error["details"]["served_models"]
    assert _job_count(stack) == before


def test_liveness_is_judged_by_the_database_clock_not_the_hosts(database_url):
    """A host whose clock runs minutes ahead or behind writes the database's time into its heartbeat: it is
    alive while it beats, and gone `stale_s` after its last beat by the database's clock."""
    from shared.db import engine_for, migrate, session_factory

    migrate(engine_for(database_url))
    sessions = session_factory(database_url)
    for skew in (timedelta(minutes=-10), timedelta(minutes=10)):
        name = f"skewed{skew.days}:1"
        with sessions.begin() as s:
            fleet.beat(s, fleet.heartbeat(name, "skewed", "clock-model", "optimum", "bf16", "fast", 8 * GB, None,
                                          16 * GB, 12 * GB, GB, None), utcnow() + skew)
        with sessions() as s:
            row, now = s.get(fleet.Worker, name), fleet.db_now(s)
            assert abs(row.last_seen - now) < timedelta(seconds=5)
            assert name in {w.name for w in fleet.live_workers(s, 30)}
            assert fleet.is_alive(row, 30, now) and not fleet.is_alive(row, 30, now + timedelta(seconds=31))


def test_unserved_model_is_503_and_nothing_is_stored(stack):
    before = _job_count(stack)
    r = stack.api.http.post("/v1/jobs", json={"prompt": "a cat", "model": "nobody-serves-this"})
    assert_error_shape(r, 503, "model_unavailable")
    assert _job_count(stack) == before


def test_job_that_fits_no_budget_is_422_with_numbers_and_hints_and_a_hint_that_fits_runs(stack, spawn_worker):
    budget = int(1.5 * GB)
    model, _ = spawn_worker("small", SDFLEET_MEMORY_BUDGET=budget)
    r_ = redis.Redis.from_url(stack.redis_url)
    before, queued = _job_count(stack), r_.llen(queue_name(model))
    r = stack.api.http.post("/v1/jobs", json={"prompt": "a huge mural", "model": model, "width": 2048,
                                              "height": 2048, "guidance_scale": 7.5})
    error = assert_error_shape(r, 422, "insufficient_memory")
    d = error["details"]
    assert d["predicted_bytes"] > d["largest_budget_bytes"] == budget
    assert d["prediction_source"] == "prior"
    messages = [h["message"] for h in d["hints"]]
    assert any(m.startswith("guidance_scale 1 would need ~") for m in messages)
    assert any(m.startswith("768x768 would need ~") for m in messages)
    assert all(h["predicted_bytes"] < d["predicted_bytes"] for h in d["hints"])
    fitting = [h for h in d["hints"] if h["fits"]]
    assert fitting and fitting[0]["message"] in error["message"]
    assert _job_count(stack) == before and r_.llen(queue_name(model)) == queued  # nothing stored or enqueued

    # the user takes the first hint that fits: it is admitted and runs
    job = stack.api.submit(prompt="a huge mural", model=model, **{"width": 2048, "height": 2048,
                           "guidance_scale": 7.5, **fitting[0]["change"]}, steps=2)
    done = stack.api.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["peak_rss_bytes"] <= budget


def test_predictions_improve_as_profiles_fill(stack, spawn_worker):
    model, _ = spawn_worker("learning")
    params = dict(prompt="a forest river", model=model, width=384, height=256, steps=2, guidance_scale=7.5)
    first = stack.api.wait(stack.api.submit(**params)["id"], timeout=120)
    assert first["prediction_source"] == "prior"
    second = stack.api.wait(stack.api.submit(**params)["id"], timeout=120)
    assert second["prediction_source"] == "profile"
    assert abs(second["predicted_peak_bytes"] - second["peak_rss_bytes"]) <= 0.10 * second["peak_rss_bytes"]
    prior_error = abs(first["predicted_peak_bytes"] - first["peak_rss_bytes"])
    assert abs(second["predicted_peak_bytes"] - second["peak_rss_bytes"]) < prior_error
    # another size of the same model is scaled from what was measured
    other = stack.api.submit(**{**params, "width": 512, "height": 512})
    assert other["prediction_source"] == "scaled"
    stack.api.wait(other["id"], timeout=120)

    (m,) = [m for m in stack.api.models() if m["name"] == model]
    shapes = {(p["width"], p["height"], p["guidance"]): p for p in m["profiles"]}
    assert shapes[(384, 256, True)]["samples"] == 2
    assert shapes[(384, 256, True)]["peak_bytes"] >= max(first["peak_rss_bytes"], second["peak_rss_bytes"])
    assert (512, 512, True) in shapes
    assert m["workers"] == 1 and m["largest_budget_bytes"] > 0


def test_memory_timeline_has_phase_marks(stack):
    job = stack.api.wait(stack.api.submit(prompt="a city", width=128, height=128, steps=3,
                                          num_images=2)["id"], timeout=120)
    t = stack.api.memory(job["id"])
    assert t["attempt"] == 1 and t["peak_rss_bytes"] == job["peak_rss_bytes"]
    phases = [(s["phase"], s["image"]) for s in t["samples"]]
    for image in (0, 1):
        for phase in ("encode", "denoise", "decode"):
            assert (phase, image) in phases
    times = [s["t"] for s in t["samples"]]
    assert times == sorted(times)
    assert all(s["rss"] >= s["anon"] for s in t["samples"])
    assert_error_shape(stack.api.http.get("/v1/jobs/no-such-job/memory"), 404, "not_found")
