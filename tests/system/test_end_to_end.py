"""Through the real API, real Redis, a real Celery worker process and the real tiny OpenVINO model."""

from __future__ import annotations

import io

import numpy as np
import psutil
import pytest
from PIL import Image



def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def run(stack, **params) -> dict:
    submitted = stack.api.submit(**params)
    assert submitted["status"] == "queued"
    return stack.api.wait(submitted["id"], timeout=120)


def test_submit_returns_202_at_once_and_the_job_succeeds_with_a_png_of_the_requested_size(stack):
    r = stack.api.http.post("/v1/jobs", json={"prompt": "a lighthouse in a storm", "width": 192,
                                              "height": 128, "steps": 3})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "queued" and job["started_at"] is None
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["parameters"]["model"] == stack.model and 0 <= job["parameters"]["seed"] < 2**32

    done = stack.api.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 1 and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["queue_wait_s"] >= 0 and done["generation_s"] > 0
    assert done["worker_host"]
    assert len(done["images"]) == 1
    png = stack.api.image(done["images"][0]["url"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    assert image.size == (192, 128) == (done["images"][0]["width"], done["images"][0]["height"])
    assert pixels(png).std() > 0  # not a blank canvas


def test_num_images_3_gives_3_different_images_with_consecutive_seeds(stack):
    job = run(stack, prompt="a red car", width=128, height=128, steps=2, seed=1234, num_images=3)
    assert job["status"] == "succeeded", job["error"]
    assert [i["seed"] for i in job["images"]] == [1234, 1235, 1236]
    imgs = [pixels(stack.api.image(i["url"])) for i in job["images"]]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.array_equal(imgs[a], imgs[b])
    # image i is exactly what a one-image job with seed + i makes: one pass per image
    alone = run(stack, prompt="a red car", width=128, height=128, steps=2, seed=1235)
    assert np.array_equal(pixels(stack.api.image(alone["images"][0]["url"])), imgs[1])


def test_same_seed_and_parameters_give_identical_pixels(stack):
    params = dict(prompt="a castle in a forest", negative_prompt="blurry", width=128, height=192, steps=3,
                  guidance_scale=5.0, seed=99)
    first, second = run(stack, **params), run(stack, **params)
    assert first["id"] != second["id"]
    a = pixels(stack.api.image(first["images"][0]["url"]))
    b = pixels(stack.api.image(second["images"][0]["url"]))
    assert np.array_equal(a, b)
    other = run(stack, **{**params, "seed": 100})
    assert not np.array_equal(a, pixels(stack.api.image(other["images"][0]["url"])))


def test_peak_rss_is_recorded_and_above_the_idle_workers_rss(stack):
    (child,) = stack.pool_children()
    idle_rss = psutil.Process(child).memory_info().rss
    job = run(stack, prompt="a city street at night", width=256, height=256, steps=2, guidance_scale=7.5)
    assert job["status"] == "succeeded", job["error"]
    assert job["peak_rss_method"] == "vmhwm"
    assert job["peak_rss_bytes"] > idle_rss
    assert job["peak_rss_bytes"] >= job["rss_before_bytes"] > 100 * 2**20  # the model stack is loaded
    assert job["peak_rss_bytes"] < 8 * 2**30  # a tiny model: anything near this is a measuring bug
    assert job["peak_rss_anon_bytes"] > 0 and job["peak_rss_file_bytes"] > 0
    # the split is of the same resident set: each part is at most the peak
    assert job["peak_rss_anon_bytes"] <= job["peak_rss_bytes"]
    assert job["peak_rss_file_bytes"] <= job["peak_rss_bytes"]
    # A bigger job on the same worker peaks higher, and a small one after it lower again: the meter sees
    # each job, not the process's history (the worker returns freed heap to the kernel between jobs).
    big = run(stack, prompt="a city street at night", width=1024, height=1024, steps=1, guidance_scale=7.5)
    assert big["peak_rss_bytes"] > job["peak_rss_bytes"]
    again = run(stack, prompt="a city street at night", width=256, height=256, steps=2, guidance_scale=7.5)
    assert again["peak_rss_bytes"] < big["peak_rss_bytes"]


@pytest.mark.one_database
def test_the_genai_backend_serves_jobs_the_same_way(stack, spawn_worker):
    model, _ = spawn_worker("genai", SDFLEET_BACKEND="genai")
    (w,) = [w for w in stack.api.workers() if w["model"] == model]
    assert w["backend"] == "genai"
    params = dict(prompt="a red car", model=model, width=128, height=96, steps=2, seed=7, num_images=2)
    first, second = run(stack, **params), run(stack, **params)
    assert first["status"] == "succeeded" and first["peak_rss_method"] == "vmhwm"
    a = [pixels(stack.api.image(i["url"])) for i in first["images"]]
    b = [pixels(stack.api.image(i["url"])) for i in second["images"]]
    assert a[0].shape == (96, 128, 3) and not np.array_equal(a[0], a[1])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
