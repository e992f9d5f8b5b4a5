"""The fleet's memory: heartbeats and /v1/workers, memory profiles and /v1/models, admission with reasons."""

from __future__ import annotations

import socket
import time
import uuid
from datetime import timedelta

import pytest
import redis

from shared import fleet, jobstore

from shared.fleet_contract import WorkerState
from shared.memory import GB
from shared.models import Job, utcnow
from shared.queue import queue_depth
from shared.settings import Settings
from tests.helpers import assert_error_shape


def _job_count(stack) -> int:
    with stack.sessions() as s:
        return jobstore.count_jobs(s)


def test_workers_heartbeat_and_a_silent_worker_is_gone_and_not_capacity(stack):
    (w,) = [w for w in stack.api.workers() if w["model"] == stack.model]
    assert w["alive"] and w["precision"] in ("bf16", "f32", "f16") and w["backend"] == "optimum"
    assert 0 < w["resident_bytes"] < w["budget_bytes"] <= w["total_ram_bytes"]
    assert w["last_seen"] >= w["started_at"]

    long_ago = utcnow() - timedelta(minutes=10)
    with stack.sessions.begin() as s:
        fleet.beat(s, WorkerState(name="gone-host:1", host="gone-host", model="ghost-model", backend="optimum",
                                  precision="bf16", memory_mode="fast", budget_bytes=64 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=128 * GB, available_bytes=100 * GB, resident_bytes=GB,
                                  current_job_id=None), long_ago)
        s.get(fleet.Worker, "gone-host:1").last_seen = long_ago
    (ghost,) = [w for w in stack.api.workers() if w["name"] == "gone-host:1"]
    assert ghost["alive"] is False
    assert "ghost-model" not in {m["name"] for m in stack.api.models()}
    before = _job_count(stack)
    r = stack.api.http.post("/v1/jobs", json={"prompt": "a cat", "model": "ghost-model"})
    error = assert_error_shape(r, 503, "model_unavailable")
    assert stack.model in error["details"]["served_models"]
    assert _job_count(stack) == before

    # silent for longer than SDFLEET_WORKER_FORGET_S (an hour): no longer listed, and the reconciler
    # (the stack's ops worker runs it too) deletes its row
    with stack.sessions.begin() as s:
        s.get(fleet.Worker, "gone-host:1").last_seen = utcnow() - timedelta(hours=2)
    assert "gone-host:1" not in {w["name"] for w in stack.api.workers()}
    with stack.sessions.begin() as s:
        fleet.forget_workers(s, 3600)
        assert s.get(fleet.Worker, "gone-host:1") is None
        assert s.get(fleet.Worker, next(w["name"] for w in stack.api.workers() if w["model"] == stack.model))


def test_liveness_is_judged_by_the_database_clock_not_the_hosts(database_url):
    """A host whose clock runs minutes ahead or behind writes the database's time into its heartbeat: it is
    alive while it beats, and gone `stale_s` after its last beat by the database's clock."""
    from shared.db import engine_for, migrate, session_factory

    migrate(engine_for(database_url))
    sessions = session_factory(database_url)
    for skew in (timedelta(minutes=-10), timedelta(minutes=10)):
        name = f"skewed{skew.days}:1"
        with sessions.begin() as s:
            fleet.beat(s, WorkerState(name=name, host="skewed", model="clock-model", backend="optimum",
                                      precision="bf16", memory_mode="fast", budget_bytes=8 * GB,
                                      cgroup_limit_bytes=None, total_ram_bytes=16 * GB, available_bytes=12 * GB,
                                      resident_bytes=GB, current_job_id=None), utcnow() + skew)
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


@pytest.mark.one_database  # admission's SQL runs on both databases in test_routing
def test_job_that_fits_no_budget_is_422_with_numbers_and_hints_and_a_hint_that_fits_runs(stack, spawn_worker):
    budget = 2 * GB
    model, _ = spawn_worker("small", SDFLEET_MEMORY_BUDGET=budget)
    r_ = redis.Redis.from_url(stack.redis_url)
    before, queued = _job_count(stack), queue_depth(r_, model)
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
    assert _job_count(stack) == before and queue_depth(r_, model) == queued  # nothing stored or enqueued

    # the user takes the first hint that fits: it is admitted and runs
    job = stack.api.submit(prompt="a huge mural", model=model, **{"width": 2048, "height": 2048,
                           "guidance_scale": 7.5, **fitting[0]["change"]}, steps=2)
    done = stack.api.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["peak_rss_bytes"] <= budget


PLAN_FIELDS = ("model", "width", "height", "guidance_scale", "num_images")


def until_admission_knows(stack, sources: tuple[str, ...], **shape) -> None:
    """Wait until admission predicts this shape from measurements: an API process reads the fleet's profiles
    once per SDFLEET_API_CACHE_S (1 s), so a profile a job just recorded reaches admission within that."""
    deadline = time.monotonic() + 15
    while True:
        plan = stack.api.http.post("/v1/plan", json={k: v for k, v in shape.items() if k in PLAN_FIELDS}).json()
        if plan["workers"][0]["prediction_source"] in sources:
            return
        assert time.monotonic() < deadline, plan
        time.sleep(0.1)


def until_admission_routes(stack, memory_class: int, **shape) -> None:
    """Wait until admission routes this shape to this memory class (it reads the fleet's profiles once per
    SDFLEET_API_CACHE_S, so a profile a job just recorded reaches it within that)."""
    deadline = time.monotonic() + 15
    while True:
        plan = stack.api.http.post("/v1/plan", json={k: v for k, v in shape.items() if k in PLAN_FIELDS}).json()
        if plan["memory_class_bytes"] == memory_class:
            return
        assert time.monotonic() < deadline, plan
        time.sleep(0.1)


@pytest.mark.one_database  # the profile SQL races on both databases in tests/shared/test_races.py
def test_predictions_improve_as_profiles_fill(stack, spawn_worker):
    model, _ = spawn_worker("learning")
    params = dict(prompt="a forest river", model=model, width=384, height=256, steps=2, guidance_scale=7.5)
    first = stack.api.wait(stack.api.submit(**params)["id"], timeout=120)
    assert first["prediction_source"] == "prior"
    until_admission_knows(stack, ("profile",), **params)
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


def _wait_workers(stack, model: str, count: int, timeout: float = 180) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(ws := [w for w in stack.api.workers() if w["model"] == model and w["alive"]]) < count:
        assert time.monotonic() < deadline, ws
        time.sleep(0.2)
    return ws


@pytest.mark.one_database
def test_a_worker_that_cannot_fit_a_job_hands_it_on_and_one_no_worker_fits_fails(stack, tiny_model, tmp_path):
    """Admission predicted with the large worker's (balanced) figures; the small worker runs another memory
    mode whose profile says the job is too big for it: it hands the job on to a larger class, which only the
    large worker covers. A job no live worker's class holds fails insufficient_memory, with the reason."""
    from shared.memory import Shape
    from shared.queue import make_celery, queue_name
    from shared.settings import Settings
    from tests.conftest import kill_tree, stack_env, start_worker

    model = f"handon-{uuid.uuid4().hex[:6]}"
    env = dict(SDFLEET_MODEL=str(tiny_model), SDFLEET_MODEL_NAME=model)
    small = start_worker(stack_env(stack.database_url, stack.redis_url, SDFLEET_MEMORY_BUDGET=str(int(1.25 * GB)),
                                   SDFLEET_MEMORY_MODE="fast", **env), tmp_path / "small.log")
    large = start_worker(stack_env(stack.database_url, stack.redis_url, SDFLEET_MEMORY_BUDGET=str(4 * GB),
                                   SDFLEET_MEMORY_MODE="balanced", **env), tmp_path / "large.log")
    try:
        ws = {w["memory_mode"]: w for w in _wait_workers(stack, model, 2)}
        with stack.sessions.begin() as s:  # what the small worker's mode measured: too big for it
            for shape, peak in ((Shape(64, 64, True), 2 * GB), (Shape(128, 128, True), 16 * GB)):
                fleet.record_profile(s, model, "optimum", ws["fast"]["precision"], "fast", shape, peak, GB)
        first_class = 1024 << 20  # the large worker's prior for these jobs (asserted below)
        control = make_celery(Settings(redis_url=stack.redis_url)).control
        node = f"sdfleet@{socket.gethostname()}.{large.pid}"
        # the large worker stops reading the class admission picks, so the small one takes the job first
        assert control.cancel_consumer(queue_name(model, first_class), destination=[node], reply=True)
        job = stack.api.submit(prompt="a cat", model=model, width=64, height=64, steps=1)
        assert job["memory_class_bytes"] == first_class
        done = stack.api.wait(job["id"], timeout=120)
        assert done["status"] == "succeeded" and done["handoffs"] == 1, done
        assert done["memory_class_bytes"] == 2 * GB  # the class that holds the small worker's prediction
        with stack.sessions() as s:
            assert s.get(Job, job["id"]).worker_name == ws["balanced"]["name"]

        # Admission reads the fleet's profiles once per SDFLEET_API_CACHE_S: until it has read the one the first
        # job recorded, it predicts 128x128 from the prior, above this class, and the large worker would take it.
        until_admission_routes(stack, first_class, model=model, width=128, height=128)
        job = stack.api.submit(prompt="a cat", model=model, width=128, height=128, steps=1)
        assert job["memory_class_bytes"] == first_class, job
        done = stack.api.wait(job["id"], timeout=120)
        assert done["status"] == "failed" and done["error"]["code"] == "insufficient_memory", done
        assert "no live worker's memory class holds it" in done["error"]["message"] and done["attempts"] == 0
    finally:
        kill_tree([small, large])


@pytest.mark.one_database
def test_after_one_measured_shape_predictions_of_others_are_within_15_percent(stack, spawn_worker):
    model, _ = spawn_worker("predict")
    base = dict(prompt="a lighthouse", model=model, steps=2)
    first = stack.api.wait(stack.api.submit(**base, width=256, height=256, guidance_scale=7.5)["id"], timeout=120)
    assert first["status"] == "succeeded"
    until_admission_knows(stack, ("scaled", "profile"), **base, width=512, height=512, guidance_scale=7.5)
    for shape in (dict(width=512, height=512, guidance_scale=7.5), dict(width=384, height=256, guidance_scale=7.5),
                  dict(width=256, height=256, guidance_scale=1.0), dict(width=512, height=384, guidance_scale=1.0),
                  dict(width=256, height=256, guidance_scale=7.5, num_images=3),
                  dict(width=640, height=512, guidance_scale=7.5)):
        # Admission reads the fleet once per SDFLEET_API_CACHE_S (1 s): a job submitted sooner after the last
        # one ended is predicted from the worker's resident set before that job (which keeps the buffers of
        # the largest shape it ran). What is tested here is the prediction from current measurements.
        time.sleep(Settings().api_cache_s + 0.1)
        job = stack.api.wait(stack.api.submit(**base, **shape)["id"], timeout=120)
        assert job["status"] == "succeeded", job
        predicted, measured = job["predicted_peak_bytes"], job["peak_rss_bytes"]
        assert job["prediction_source"] in ("scaled", "profile"), job
        assert 0.95 * measured <= predicted <= 1.15 * measured, (shape, predicted, measured)
