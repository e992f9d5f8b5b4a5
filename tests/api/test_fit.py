"""Fit rather than refuse (`fit: auto`): a job no live worker fits is admitted with the first of the refusal's
own hints that fits, its record saying what changed and why; without it (or with "refuse") the refusal stays;
with it and nothing fitting, too. A change of model takes that model's defaults for what the request left out,
a hint whose change the other model refuses is passed over, an Idempotency-Key replays the fitted job,
`POST /v1/plan` shows what `fit: auto` would do, and the OpenAI route takes `fit` too. In-process against
real Redis, on both databases; the workers are heartbeats (tests/system/test_fit.py runs fitted jobs on a
real worker)."""

from __future__ import annotations

import uuid

import redis
from sqlalchemy import select

from shared import fleet
from shared.fleet_contract import WorkerState
from shared.jobs import FALLBACK_DEFAULTS
from shared.memory import GB, MB
from shared.models import Job, utcnow
from shared.queue import class_depth, queue_depth
# this module's own database on each backend, the in-process API
from tests.helpers import assert_error_shape, database_url, db, make_api  # noqa: F401

# the prior on these heartbeats (1 GiB resident): 1 GiB + 256 MiB + 160 KiB per latent pixel and UNet batch item;
# a 2048x2048 job with guidance is ~21 GiB, 512x512 without it ~1.9 GiB
HUGE = {"prompt": "a huge mural", "width": 2048, "height": 2048, "guidance_scale": 7.5, "steps": 2}


def beat(db, model: str, budget: int, defaults=None) -> None:  # noqa: F811
    with db.begin() as s:
        fleet.beat(s, WorkerState(name=f"{model}:{uuid.uuid4().hex[:4]}", host="h", model=model, backend="optimum",
                                  precision="bf16", memory_mode="fast", budget_bytes=budget, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None, defaults=defaults), utcnow())


def model_of(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def stored(db, model: str) -> list[Job]:  # noqa: F811
    with db() as s:
        return list(s.scalars(select(Job).where(Job.model == model)))


def first_fitting(error: dict) -> dict:
    return next(h for h in error["details"]["hints"] if h["fits"])


def test_fit_auto_admits_with_the_first_hint_that_fits_and_without_it_the_refusal_stays(db, database_url,  # noqa: F811
                                                                                         redis_url):
    model = model_of("fit")
    beat(db, model, 4 * GB)
    broker = redis.Redis.from_url(redis_url)
    with make_api(database_url, redis_url) as client:
        body = {**HUGE, "model": model}
        for plain in (body, {**body, "fit": "refuse"}):
            refused = assert_error_shape(client.post("/v1/jobs", json=plain), 422, "insufficient_memory")
            assert stored(db, model) == [] and queue_depth(broker, model) == 0
        hint = first_fitting(refused)
        # the hints are sorted fitting first, least memory first: the one taken is the refusal's first
        assert hint is refused["details"]["hints"][0] and hint["message"] in refused["message"]

        r = client.post("/v1/jobs", json={**body, "fit": "auto"})
        assert r.status_code == 202, r.text
        job = r.json()
        fitted = job["fitted"]
        assert fitted == {"changes": hint["change"], "original": {k: body[k] for k in hint["change"]},
                          "reason": refused["message"], "hint": hint["message"]}
        asked = {"prompt": body["prompt"], "negative_prompt": None, "steps": 2, "num_images": 1, "model": model,
                 "width": 2048, "height": 2048, "guidance_scale": 7.5, "kind": "txt2img", "strength": None,
                 "upscale": None, "tile": None, "decoder": None}
        assert job["parameters"] == {**asked, **hint["change"], "seed": job["parameters"]["seed"]}
        assert job["predicted_peak_bytes"] == hint["predicted_bytes"] <= 4 * GB
        assert class_depth(broker, model, job["memory_class_bytes"]) == 1  # queued with the change, in its class
        (row,) = stored(db, model)
        assert row.fitted == fitted and (row.width, row.height) == (job["parameters"]["width"],
                                                                   job["parameters"]["height"])
        assert client.get(f"/v1/jobs/{job['id']}").json()["fitted"] == fitted
        assert next(j for j in client.get("/v1/jobs").json()["jobs"] if j["id"] == job["id"])["fitted"] == fitted

        # a job that fits as it is runs as asked, fit or no fit: nothing in `fitted`
        small = client.post("/v1/jobs", json={**body, "width": 256, "height": 256, "fit": "auto"}).json()
        assert small["fitted"] is None and small["parameters"]["width"] == 256


def test_fit_auto_with_nothing_that_fits_is_refused_and_invalid_values_are_422(db, database_url,  # noqa: F811
                                                                                redis_url):
    model = model_of("nofit")
    beat(db, model, 1536 * MB)  # its class holds 1.5 GiB: not even 512x512 without guidance (~1.9 GiB)
    with make_api(database_url, redis_url) as client:
        body = {**HUGE, "model": model, "width": 1024, "height": 1024}
        plain = assert_error_shape(client.post("/v1/jobs", json=body), 422, "insufficient_memory")
        auto = assert_error_shape(client.post("/v1/jobs", json={**body, "fit": "auto"}), 422, "insufficient_memory")
        assert auto["details"]["hints"] and not any(h["fits"] for h in auto["details"]["hints"])
        assert auto == plain and "No single change listed would fit" in auto["message"]
        for bad in ("Auto", "AUTO", "yes", "", " auto", True, None, 1, ["auto"], {"auto": True}):
            error = assert_error_shape(client.post("/v1/jobs", json={**body, "fit": bad}), 422, "invalid_request")
            assert [d["field"] for d in error["details"]] == ["fit"], error
    assert stored(db, model) == []


def int8_defaults(**over):
    return FALLBACK_DEFAULTS.model_copy(update=over).model_dump()


def test_a_change_of_model_takes_that_models_defaults_and_one_it_refuses_is_passed_over(db, database_url,  # noqa: F811
                                                                                        redis_url):
    base = model_of("fam")
    fp16, int8 = f"{base}-fp16", f"{base}-int8"
    beat(db, fp16, 1536 * MB)  # SD 1.5's defaults (20 steps): a 512x512 job without guidance (~1.9 GiB) fits not
    beat(db, int8, 4 * GB, int8_defaults(steps=30, negative_prompt=False))
    with make_api(database_url, redis_url) as client:
        body = {"prompt": "a fox", "model": fp16, "width": 512, "height": 512, "guidance_scale": 1.0}
        refused = assert_error_shape(client.post("/v1/jobs", json=body), 422, "insufficient_memory")
        (hint,) = refused["details"]["hints"]  # no smaller size, no guidance to drop: the variant alone
        assert hint["change"] == {"model": int8} and hint["fits"]
        job = client.post("/v1/jobs", json={**body, "fit": "auto"}).json()
        # steps was left out: the int8 model's own default, recorded as a change with the fp16 model's
        assert job["fitted"]["changes"] == {"model": int8, "steps": 30}
        assert job["fitted"]["original"] == {"model": fp16, "steps": 20}
        assert job["parameters"]["model"] == int8 and job["parameters"]["steps"] == 30
        assert job["fitted"]["hint"] == hint["message"] and job["fitted"]["reason"] == refused["message"]
        asked_steps = client.post("/v1/jobs", json={**body, "steps": 4, "fit": "auto"}).json()
        assert asked_steps["fitted"]["changes"] == {"model": int8} and asked_steps["parameters"]["steps"] == 4

        # the int8 model takes no negative prompt (an LCM's would not): its hint cannot be taken, and no other fits
        with_negative = {**body, "negative_prompt": "blurry", "fit": "auto"}
        error = assert_error_shape(client.post("/v1/jobs", json=with_negative), 422, "insufficient_memory")
        assert error["details"]["hints"] == refused["details"]["hints"]
    assert stored(db, fp16) == [] and len(stored(db, int8)) == 2


def test_an_idempotency_key_replays_the_fitted_job_and_a_body_without_fit_is_another(db, database_url,  # noqa: F811
                                                                                     redis_url):
    model = model_of("idem")
    beat(db, model, 4 * GB)
    with make_api(database_url, redis_url) as client:
        body = {**HUGE, "model": model, "fit": "auto"}
        key = {"Idempotency-Key": f"fit-{uuid.uuid4().hex}"}
        first = client.post("/v1/jobs", json=body, headers=key)
        again = client.post("/v1/jobs", json=body, headers=key)
        assert (first.status_code, again.status_code) == (202, 200)
        assert again.json()["id"] == first.json()["id"] and again.json()["fitted"] == first.json()["fitted"]
        without = {k: v for k, v in body.items() if k != "fit"}
        assert_error_shape(client.post("/v1/jobs", json=without, headers=key), 409, "idempotency_conflict")

        # "fit" left out and "refuse" given are the same body (and hash as bodies did before the field)
        key = {"Idempotency-Key": f"fit-{uuid.uuid4().hex}"}
        small = {"prompt": "a cat", "model": model, "width": 256, "height": 256}
        made = client.post("/v1/jobs", json=small, headers=key)
        replay = client.post("/v1/jobs", json={**small, "fit": "refuse"}, headers=key)
        assert (made.status_code, replay.status_code) == (202, 200) and replay.json()["id"] == made.json()["id"]
    assert len(stored(db, model)) == 2


def test_a_fit_on_the_cached_fleet_is_decided_again_on_a_fresh_read(db, database_url, redis_url):  # noqa: F811
    """Fitting is a refusal of the job as asked: like one, it is decided again on a fresh read of the fleet,
    where a worker that has come up since may take the job as it is."""
    model = model_of("late")
    beat(db, model, 4 * GB)
    with make_api(database_url, redis_url, api_cache_s=60) as client:
        body = {**HUGE, "model": model, "width": 1024, "height": 1024, "fit": "auto"}
        assert client.post("/v1/jobs", json=body).json()["fitted"] is not None  # the view is read and cached now
        beat(db, model, 32 * GB)
        job = client.post("/v1/jobs", json=body).json()
        assert job["fitted"] is None and job["parameters"]["width"] == 1024


def test_the_plan_shows_what_fit_auto_would_do(db, database_url, redis_url):  # noqa: F811
    model, tiny = model_of("plan"), model_of("plantiny")
    beat(db, model, 4 * GB)
    beat(db, tiny, 1536 * MB)
    with make_api(database_url, redis_url) as client:
        shape = {"model": model, "width": 2048, "height": 2048, "guidance_scale": 7.5}
        plan = client.post("/v1/plan", json=shape).json()
        assert not plan["admitted"]
        job = client.post("/v1/jobs", json={**shape, "prompt": "a plan", "fit": "auto"}).json()
        assert plan["fit"] == {**job["fitted"], "predicted_peak_bytes": job["predicted_peak_bytes"],
                               "memory_class_bytes": job["memory_class_bytes"]}
        assert plan["fit"]["hint"] == first_fitting({"details": {"hints": plan["hints"]}})["message"]
        assert client.post("/v1/plan", json={**shape, "width": 256, "height": 256}).json()["fit"] is None
        assert client.post("/v1/plan", json={**shape, "model": tiny, "width": 1024,
                                             "height": 1024}).json()["fit"] is None  # nothing fits
        assert_error_shape(client.post("/v1/plan", json={**shape, "fit": "auto"}), 422, "invalid_request")


def test_the_openai_route_takes_fit_as_an_sdfleet_field(db, database_url, redis_url):  # noqa: F811
    model = model_of("oai")
    beat(db, model, 4 * GB)
    with make_api(database_url, redis_url, images_wait_s=0.05) as client:  # no worker runs it: it outlives the wait
        body = {"prompt": "a huge mural", "model": model, "size": "2048x2048", "guidance_scale": 7.5}
        refused = client.post("/v1/images/generations", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "insufficient_memory"
        waited = client.post("/v1/images/generations", json={**body, "fit": "auto"})
        assert waited.status_code == 504 and waited.json()["error"]["code"] == "job_timeout"
        record = client.get(waited.headers["Location"]).json()
        assert record["fitted"]["original"]["width"] == 2048 and record["parameters"]["width"] < 2048
        bad = client.post("/v1/images/generations", json={**body, "fit": "maybe"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "fit"
    assert len(stored(db, model)) == 1


def test_fit_and_the_record_are_in_the_schema(db, database_url, redis_url):  # noqa: F811
    with make_api(database_url, redis_url) as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]
    prop = schema["JobCreate"]["properties"]["fit"]
    assert prop["default"] == "refuse" and prop["enum"] == ["refuse", "auto"] and prop["description"]
    assert "fit" not in schema["JobCreate"].get("required", [])
    assert set(schema["FitRecord"]["properties"]) == {"changes", "original", "reason", "hint"}
    assert "fitted" in schema["JobPublic"]["properties"] and "fit" in schema["PlanPublic"]["properties"]
