"""The decoder a job asks for (`decoder`: tiny or full): refused with the reason where the model's workers have no
tiny VAE and for jobs with an image; on workers with one, each decoder is judged by its own profiles (a job decoded
by the model's own VAE by the key without "+tiny_vae"), the refusal of a full decode hints the tiny one, and
`fit: auto` takes that hint. In-process against real Redis, on both databases; the workers are heartbeats (the
decoders themselves run in tests/worker/test_levers.py, on a real worker too)."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from shared import fleet
from shared.fleet_contract import WorkerState
from shared.memory import GB, Shape
from shared.models import Job, utcnow
# this module's own database on each backend, the in-process API
from tests.helpers import assert_error_shape, database_url, db, make_api  # noqa: F401

JOB = {"prompt": "a lighthouse", "width": 512, "height": 512, "guidance_scale": 1.0, "steps": 1}


def beat(db, memory_mode: str, budget: int = 8 * GB) -> str:  # noqa: F811
    model = f"dec-{uuid.uuid4().hex[:6]}"
    with db.begin() as s:
        fleet.beat(s, WorkerState(name=f"{model}:1", host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode=memory_mode, budget_bytes=budget, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())
    return model


def stored(db, model: str) -> list[Job]:  # noqa: F811
    with db() as s:
        return list(s.scalars(select(Job).where(Job.model == model)))


def test_a_tiny_decoder_is_refused_where_no_worker_has_one_and_for_jobs_with_an_image(db, database_url,  # noqa: F811
                                                                                      redis_url):
    plain = beat(db, "fast")
    with make_api(database_url, redis_url) as client:
        error = assert_error_shape(client.post("/v1/jobs", json={**JOB, "model": plain, "decoder": "tiny"}), 422,
                                   "invalid_request")
        assert error["details"] == [{"field": "decoder", "reason": error["message"].removeprefix("decoder: ")}]
        assert "have no tiny VAE" in error["message"] and "SDFLEET_TINY_VAE" in error["message"]
        for bad in ("TINY", "taesd", "", 1, True, ["tiny"]):
            error = assert_error_shape(client.post("/v1/jobs", json={**JOB, "model": plain, "decoder": bad}), 422,
                                       "invalid_request")
            assert [d["field"] for d in error["details"]] == ["decoder"], error
        image = {**JOB, "model": plain, "image": {"job_id": str(uuid.uuid4())}, "decoder": "tiny"}
        error = assert_error_shape(client.post("/v1/jobs", json=image), 422, "invalid_request")
        assert "text-to-image jobs only" in error["message"]
        assert stored(db, plain) == []
        full = client.post("/v1/jobs", json={**JOB, "model": plain, "decoder": "full"})
        assert full.status_code == 202 and full.json()["parameters"]["decoder"] == "full"


def test_each_decoder_is_judged_by_its_own_profiles_and_fit_auto_takes_the_tiny_one(db, database_url,  # noqa: F811
                                                                                    redis_url):
    model = beat(db, "fast+tiny_vae", budget=4 * GB)
    shape = Shape(512, 512, False)
    with db.begin() as s:  # measured: the tiny VAE's decode fits, the model's own VAE's does not
        fleet.record_profile(s, model, "optimum", "bf16", "fast+tiny_vae", shape, 2 * GB, GB)
        fleet.record_profile(s, model, "optimum", "bf16", "fast", shape, 6 * GB, GB)
    with make_api(database_url, redis_url) as client:
        for asked in ({}, {"decoder": "tiny"}):  # leaving it out is the worker's default: the tiny VAE
            done = client.post("/v1/jobs", json={**JOB, "model": model, **asked})
            assert done.status_code == 202, done.text
            assert done.json()["predicted_peak_bytes"] == 2 * GB
        refused = assert_error_shape(client.post("/v1/jobs", json={**JOB, "model": model, "decoder": "full"}), 422,
                                     "insufficient_memory")
        assert "6.0 GiB" in refused["message"]
        (hint,) = [h for h in refused["details"]["hints"] if h["change"] == {"decoder": "tiny"}]
        assert hint["fits"] and hint["predicted_bytes"] == 2 * GB
        fitted = client.post("/v1/jobs", json={**JOB, "model": model, "decoder": "full", "fit": "auto"})
        assert fitted.status_code == 202, fitted.text
        record = fitted.json()
        assert record["parameters"]["decoder"] == "tiny"
        assert record["fitted"]["changes"] == {"decoder": "tiny"} and record["fitted"]["original"] == {"decoder": "full"}
    assert len(stored(db, model)) == 3
