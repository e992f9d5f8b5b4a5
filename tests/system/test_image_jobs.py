"""Jobs that take an image, end to end: the real API, Redis, a real worker process and the tiny OpenVINO model
(SQLite and PostgreSQL). Image-to-image, inpainting and upscaling, given as base64 JSON, as multipart files, or
as an earlier job's image; what a user checks of each: the size, the pixels kept, the pixels changed."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from shared.models import JobInput

PROMPT = "a lighthouse on a cliff"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def png_of(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def init_png() -> bytes:
    """A smooth picture (gradients and a disc), 96x64: not square, so a swapped size shows."""
    y, x = np.mgrid[0:64, 0:96]
    image = np.stack([x * 255 / 95, y * 255 / 63, 128 + 0 * x], axis=-1)
    image[(x - 48) ** 2 + (y - 32) ** 2 < 20 ** 2] = (250, 200, 40)
    return png_of(image)


@pytest.fixture(scope="module")
def mask_png() -> bytes:
    """White (repainted) in the middle of the 96x64 image, black (kept) around it."""
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[16:48, 32:64] = 255
    return png_of(mask, "L")


def run(stack, **body) -> dict:
    r = stack.api.http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    done = stack.api.wait(r.json()["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    return done


def first_image(stack, job: dict) -> np.ndarray:
    return pixels(stack.api.image(job["images"][0]["url"]))


def test_image_to_image_and_inpainting_differ_from_text_to_image_and_each_other_and_keep_the_input_size(
        stack, init_png, mask_png):
    common = dict(prompt=PROMPT, steps=8, seed=7, guidance_scale=7.5)
    t2i = run(stack, **common, width=96, height=64)
    i2i = run(stack, **common, image=b64(init_png), strength=0.6)
    inpaint = run(stack, **common, image=b64(init_png), mask=b64(mask_png))
    assert (i2i["parameters"]["kind"], inpaint["parameters"]["kind"]) == ("img2img", "inpaint")
    assert i2i["parameters"]["strength"] == 0.6 and inpaint["parameters"]["strength"] == 1.0
    images = {name: first_image(stack, job) for name, job in (("t2i", t2i), ("i2i", i2i), ("inpaint", inpaint))}
    for name, image in images.items():
        assert image.shape == (64, 96, 3), name  # the input's size, not the model's default
    assert np.abs(images["t2i"] - images["i2i"]).mean() > 5
    assert np.abs(images["i2i"] - images["inpaint"]).mean() > 5
    # the record lists what it was given, served back as stored
    given = {i["role"]: i for i in inpaint["inputs"]}
    assert set(given) == {"image", "mask"} and given["image"]["source_format"] == "PNG"
    assert (given["image"]["width"], given["image"]["height"]) == (96, 64)
    assert np.array_equal(pixels(stack.api.image(given["image"]["url"])), pixels(init_png))
    # image-to-image at strength 0.6 runs int(8 x 0.6) = 4 denoising steps
    memory = stack.api.http.get(f"/v1/jobs/{i2i['id']}/memory").json()
    assert "encode_image" in {s["phase"] for s in memory["samples"]}


def test_inpainting_leaves_the_unmasked_pixels_exactly_as_they_were(stack, init_png, mask_png):
    job = run(stack, prompt=PROMPT, steps=6, seed=3, image=b64(init_png), mask=b64(mask_png))
    out, original = first_image(stack, job), pixels(init_png)
    kept = np.asarray(Image.open(io.BytesIO(mask_png))) < 128
    assert np.array_equal(out[kept], original[kept])  # PNG both ways: no tolerance needed
    assert np.abs(out[~kept] - original[~kept]).mean() > 5  # and the masked part was repainted


def test_strength_0_gives_the_input_back(stack, init_png):
    job = run(stack, prompt=PROMPT, steps=4, seed=1, image=b64(init_png), strength=0.0)
    assert np.array_equal(first_image(stack, job), pixels(init_png))


def test_multipart_upload_and_an_earlier_jobs_image_as_input(stack, init_png, mask_png):
    r = stack.api.http.post("/v1/jobs", data={"prompt": PROMPT, "steps": "4", "seed": "5", "strength": "0.5"},
                            files={"image": ("in.png", init_png, "image/png")})
    assert r.status_code == 202, r.text
    first = stack.api.wait(r.json()["id"], timeout=180)
    assert first["status"] == "succeeded" and first["parameters"]["kind"] == "img2img"
    assert first["parameters"]["steps"] == 4 and first["parameters"]["seed"] == 5
    # the same job as JSON base64 makes the same image
    same = run(stack, prompt=PROMPT, steps=4, seed=5, strength=0.5, image=b64(init_png))
    assert np.array_equal(first_image(stack, first), first_image(stack, same))
    # an earlier job's output as the next job's input
    chained = run(stack, prompt=PROMPT, steps=4, seed=5, strength=0.0, image={"job_id": first["id"], "index": 0})
    assert np.array_equal(first_image(stack, chained), first_image(stack, first))


def test_upscale_doubles_the_size_tile_by_tile(stack, init_png):
    job = run(stack, image=b64(init_png), upscale=2, steps=4, seed=2)
    params = job["parameters"]
    assert params["kind"] == "upscale" and (params["width"], params["height"]) == (192, 128)
    assert params["tile"] and params["tile"] <= 128  # no larger than the output's shorter side
    out = first_image(stack, job)
    assert out.shape == (128, 192, 3)
    plain = np.asarray(Image.open(io.BytesIO(init_png)).convert("RGB").resize((192, 128), Image.LANCZOS),
                       dtype=np.int16)
    assert np.abs(out - plain).mean() > 5  # refined (the tiny model's random VAE makes it noise: no more to see)
    # at strength 0 each tile comes back as it went in: the overlapping tiles blend back into exactly the
    # plain enlargement, with no seam
    untouched = run(stack, image=b64(init_png), upscale=2, steps=4, seed=2, strength=0.0)
    assert np.abs(first_image(stack, untouched) - plain).max() <= 1


def inputs_stored(stack) -> int:
    with stack.sessions() as session:
        return session.scalar(select(func.count()).select_from(JobInput))


def test_refused_kinds_and_strengths_store_nothing(stack, init_png):
    before = inputs_stored(stack)
    r = stack.api.http.post("/v1/jobs", json={"prompt": PROMPT, "image": b64(init_png), "strength": 0.1,
                                              "steps": 4})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "strength"
    assert "at least 10 steps" in r.json()["error"]["message"]
    r = stack.api.http.post("/v1/jobs", json={"prompt": PROMPT, "mask": b64(init_png)})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "mask"
    assert inputs_stored(stack) == before
