"""Live previews on the worker. The projection: the published coefficients (a latent of one channel renders the
colour its row says), none for a layout without coefficients. The pipelines, in this process, on the tiny SD
and SDXL (both backends): from inside on_step a preview of that step's latents at an eighth of the image's side,
a copy that later steps leave alone, and the last one of the very latents the VAE decodes. Real workers: a long
job shows a preview while it runs (a JPEG of that size, its step in the headers, newer ones as it goes on) and
none once it has ended; a worker with SDFLEET_PREVIEW_INTERVAL_S=0 writes none.

Whether a preview's colours resemble the final image's cannot be checked fairly here: the tiny models' VAEs have
random weights, which the published coefficients (fitted on SD's and SDXL's trained VAEs) do not describe. What
is checked instead is that the last preview is the projection of the latents the image is decoded from."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from worker.pipelines import GenaiPipeline, ImageRequest, OptimumPipeline
from worker.preview import SD, SDXL, projection_for

pytestmark = pytest.mark.one_database  # processes, not SQL (the SQL: tests/shared/test_previews.py, both databases)


def test_the_projection_is_the_published_coefficients():
    for projection in (SD, SDXL):
        for channel, row in enumerate(projection.factors):
            latents = np.zeros((1, 4, 3, 5), dtype=np.float32)
            latents[0, channel] = 1.0
            image = projection.render(latents)
            assert image.size == (5, 3) and image.mode == "RGB"
            expected = np.clip((np.add(row, projection.bias) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
            assert (np.asarray(image) == expected).all(), (projection.name, channel)
    # zero latents: mid-grey (SD), shifted by SDXL's bias; far out of range: clipped, not wrapped
    assert np.asarray(SD.render(np.zeros((4, 2, 2))))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(SD.render(np.full((4, 2, 2), 50.0)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(SD.render(np.full((4, 2, 2), -50.0)))[0, 0].tolist() == [0, 0, 0]
    assert SD.render(np.zeros((1, 16, 8, 8))) is None  # 16 channels (SD 3, Flux): no preview


@pytest.mark.parametrize("cls,expected", [
    ("OVStableDiffusionPipeline", SD), ("StableDiffusionPipeline", SD), ("OVLatentConsistencyModelPipeline", SD),
    ("OVStableDiffusionXLPipeline", SDXL), ("StableDiffusionXLImg2ImgPipeline", SDXL),
    ("OVStableDiffusion3Pipeline", None), ("OVFluxPipeline", None), ("unknown", None)])
def test_which_projection_a_pipeline_class_gets(cls, expected):
    assert projection_for(cls) is expected


BACKENDS = {"optimum": OptimumPipeline, "genai": GenaiPipeline}


@pytest.fixture(scope="module", params=[(b, a) for b in BACKENDS for a in ("sd", "sdxl")], ids=lambda p: "-".join(p))
def pipeline(request, tiny_model, tiny_sdxl_model):
    backend, arch = request.param
    return arch, BACKENDS[backend](str(tiny_model if arch == "sd" else tiny_sdxl_model))


def test_a_pipeline_previews_each_steps_latents_from_inside_on_step(pipeline):
    arch, p = pipeline
    assert p.preview() is None  # outside on_step: nothing to show
    kept, at_once = [], []

    def on_step(step, total):
        render = p.preview()
        kept.append(render)
        at_once.append(np.asarray(render()))

    request = ImageRequest("a lighthouse at dusk", None, 128, 96, 4, 7.5, 5)
    image = p.generate(request, on_step)
    assert image.size == (128, 96) and p.preview() is None
    later = [render() for render in kept]  # rendered after the loop went on, as the worker's monitor does
    assert all(pic.size == (16, 12) and pic.mode == "RGB" for pic in later)
    assert all((np.asarray(a) == b).all() for a, b in zip(later, at_once))  # a copy, not the loop's buffer
    assert len({np.asarray(pic).tobytes() for pic in later}) > 1  # the latents change as it denoises
    assert p._projection is (SDXL if arch == "sdxl" else SD)


def test_the_last_preview_is_the_latents_the_image_is_decoded_from(tiny_model):
    p = OptimumPipeline(str(tiny_model))
    decoder = p._parts["vae_decoder"]
    decoded, forward = [], decoder.forward

    def spy(latent_sample, *args, **kwargs):
        decoded.append(np.array(getattr(latent_sample, "numpy", lambda: latent_sample)(), dtype=np.float32))
        return forward(latent_sample, *args, **kwargs)

    decoder.forward = spy
    last = []
    p.generate(ImageRequest("a red barn", None, 96, 64, 3, 7.5, 9),
               lambda step, total: last.append(p.preview()) if step == total else None)
    scaling = p._pipe.vae_decoder.config.get("scaling_factor", 0.18215)
    expected = SD.render(decoded[-1] * scaling)  # the pipeline divides by the VAE's scale before decoding
    diff = np.abs(np.asarray(last[0]()).astype(int) - np.asarray(expected).astype(int))
    assert diff.max() <= 1, diff.max()  # float rounding of the division and back


# -- real workers ----------------------------------------------------------------------------------------

def _jpeg(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    image.load()
    return image


def test_a_long_job_shows_a_newer_preview_as_it_runs_and_none_once_it_has_ended(stack):
    job = stack.api.submit(prompt="a lighthouse in a storm", width=256, height=192, steps=150, num_images=4,
                           guidance_scale=7.5)
    try:
        seen, deadline = set(), time.monotonic() + 90
        while len(seen) < 2:  # the first preview, then a newer one (every SDFLEET_PREVIEW_INTERVAL_S: 2 s)
            record = stack.api.job(job["id"])
            assert record["status"] in ("queued", "running") and time.monotonic() < deadline, record
            p = record["preview"]
            if p:
                assert p["url"] == f"/v1/jobs/{job['id']}/preview" and p["steps"] == 150
                assert (p["width"], p["height"]) == (32, 24) and 0 <= p["image"] < 4 and 1 <= p["step"] <= 150
                seen.add((p["image"], p["step"]))
                r = stack.api.http.get(p["url"])
                if r.status_code == 200:
                    assert r.headers["content-type"] == "image/jpeg" and r.headers["cache-control"] == "no-store"
                    shown = (int(r.headers["x-preview-image"]), int(r.headers["x-preview-step"]))
                    assert shown >= (p["image"], p["step"]) and r.headers["x-preview-steps"] == "150"
                    assert _jpeg(r.content).size == (32, 24)
            time.sleep(0.1)
    finally:
        stack.api.http.delete(f"/v1/jobs/{job['id']}")
    ended = stack.api.wait(job["id"], timeout=60)
    assert ended["status"] == "cancelled" and ended["preview"] is None
    r = stack.api.http.get(f"/v1/jobs/{job['id']}/preview")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # one that ran to the end: its images are what is read
    done = stack.api.wait(stack.api.submit(prompt="a short one", width=64, height=64, steps=3)["id"])
    assert done["status"] == "succeeded" and done["preview"] is None
    assert stack.api.http.get(f"/v1/jobs/{done['id']}/preview").status_code == 404


def test_a_worker_with_previews_off_writes_none(stack, spawn_worker):
    model, _ = spawn_worker("tiny-nopreview", SDFLEET_PREVIEW_INTERVAL_S=0)
    job = stack.api.submit(prompt="no preview", model=model, width=256, height=192, steps=150, num_images=2)
    try:
        steps = set()
        deadline = time.monotonic() + 90
        while len(steps) < 3:  # watched across several progress writes
            record = stack.api.job(job["id"])
            assert record["status"] in ("queued", "running") and time.monotonic() < deadline, record
            assert record["preview"] is None
            if record["progress"] and record["progress"]["step"] >= 1:
                steps.add((record["progress"]["image"], record["progress"]["step"]))
                assert stack.api.http.get(f"/v1/jobs/{job['id']}/preview").status_code == 404
            time.sleep(0.2)
    finally:
        stack.api.http.delete(f"/v1/jobs/{job['id']}")
