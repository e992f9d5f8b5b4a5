"""POST /v1/images/generations with the official `openai` package as the client, against the live stack."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import uuid

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from sdfleet.stack import stop
from shared import fleet, jobstore
from shared.fleet_contract import WorkerState
from shared.memory import GB
from tests.conftest import ROOT, stack_env, start_api

pytestmark = pytest.mark.one_database  # HTTP shapes and a client: the SQL under them runs on both elsewhere


def _client(base_url: str, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, **kw)


def _png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


def _jobs(stack) -> int:
    with stack.sessions() as s:
        return jobstore.count_jobs(s)


def test_generate_b64_two_images_of_the_asked_size_recorded_as_a_normal_job(stack):
    client = _client(stack.api_url)
    result = client.images.generate(prompt="a lighthouse", size="128x64", n=2, response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 7})
    assert len(result.data) == 2 and result.created > 0
    images = [_png(base64.b64decode(d.b64_json)) for d in result.data]
    assert [im.size for im in images] == [(128, 64), (128, 64)]
    a, b = (np.asarray(im.convert("RGB")) for im in images)
    assert not np.array_equal(a, b)  # seeds 7 and 8

    # the same job as POST /v1/jobs makes: its record is there, with the parameters asked for
    job_id = result.model_extra["sdfleet"]["job_id"]
    record = stack.api.job(job_id)
    assert record["status"] == "succeeded" and record["peak_rss_bytes"] > 0
    p = record["parameters"]
    assert (p["width"], p["height"], p["num_images"], p["steps"], p["seed"]) == (128, 64, 2, 2, 7)
    assert base64.b64decode(result.data[1].b64_json) == stack.api.image(record["images"][1]["url"])


def test_generate_url_points_at_the_png(stack):
    result = _client(stack.api_url).images.generate(prompt="a red car", size="64x64", extra_body={"steps": 1})
    (item,) = result.data
    assert item.url.startswith(stack.api_url + "/v1/jobs/") and item.b64_json is None
    assert _png(httpx.get(item.url).content).size == (64, 64)


def test_bad_input_raises_the_clients_own_errors_with_the_apis_message(stack):
    client = _client(stack.api_url, max_retries=0)
    before = _jobs(stack)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", size="100x100")
    assert e.value.status_code == 400 and "multiple of 8" in e.value.message
    assert e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", size="big")
    assert "WIDTHxHEIGHT" in e.value.message and e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", n=9)
    assert "less than or equal to 8" in e.value.message and e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="a cat", extra_body={"sampler": "euler"})
    assert "sampler" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="a cat", model="dall-e-3")
    assert e.value.code == "model_not_found" and "dall-e-3" in e.value.message
    assert _jobs(stack) == before  # nothing was stored


def test_insufficient_memory_is_a_400_whose_message_keeps_the_hints(stack):
    # a worker of 1.5 GiB serving its own model (a heartbeat row: admission only reads the fleet's rows)
    model = f"small-{uuid.uuid4().hex[:6]}"
    with stack.sessions.begin() as s:
        fleet.beat(s, WorkerState(name=f"small-host:{model}", host="small-host", model=model, backend="optimum",
                                  precision="bf16", memory_mode="balanced", budget_bytes=int(1.5 * GB),
                                  cgroup_limit_bytes=None, total_ram_bytes=2 * GB, available_bytes=2 * GB,
                                  resident_bytes=GB // 2, current_job_id=None), fleet.db_now(s))
    with pytest.raises(openai.BadRequestError) as e:
        _client(stack.api_url, max_retries=0).images.generate(prompt="a mural", model=model, size="1024x1024",
                                                              extra_body={"guidance_scale": 7.5})
    assert e.value.code == "insufficient_memory"
    assert "predicted to need" in e.value.message and "Would fit: " in e.value.message
    assert "512x512" in e.value.message


def test_a_job_that_outlives_the_wait_answers_with_its_id_and_goes_on(stack, tmp_path):
    env = stack_env(stack.database_url, stack.redis_url, SDFLEET_DEFAULT_MODEL=stack.model,
                    SDFLEET_IMAGES_WAIT_S="0.3")
    api, base = start_api(env, tmp_path / "api.log")
    try:
        before = _jobs(stack)
        with pytest.raises(openai.InternalServerError) as e:  # default retries: the answer says not to
            _client(base).images.generate(prompt="a slow one", size="256x256", n=3, extra_body={"steps": 40})
        assert e.value.status_code == 504 and e.value.code == "job_timeout"
        assert e.value.response.headers["x-should-retry"] == "false"
        assert _jobs(stack) == before + 1  # one job, not one per retry
        job_id = e.value.response.headers["location"].rsplit("/", 1)[1]
        assert job_id in e.value.message and f"GET /v1/jobs/{job_id}" in e.value.message
        done = stack.api.wait(job_id, timeout=120)
        assert done["status"] == "succeeded" and len(done["images"]) == 3
    finally:
        stop([api])


def test_bearer_keys_work_as_on_the_rest_of_the_api(tmp_path, redis_url):
    """An API with keys required, on its own database (a key in the shared stack's database would turn its
    open API into a keyed one): no key or a wrong one is the client's AuthenticationError; a right one gets
    through to admission (no worker serves that database: model_not_found)."""
    db = f"sqlite:///{tmp_path / 'keys.db'}"
    env = stack_env(db, redis_url, SDFLEET_AUTH="required", SDFLEET_DEFAULT_MODEL="tiny")
    made = subprocess.run([sys.executable, "-m", "sdfleet", "keys", "create", "alice"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    key = json.loads(made.stdout)["key"]
    api, base = start_api(env, tmp_path / "api.log")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            _client(base, "sk-not-a-key", max_retries=0).images.generate(prompt="a cat")
        assert e.value.code == "invalid_api_key"
        with pytest.raises(openai.NotFoundError) as e:
            _client(base, key, max_retries=0).images.generate(prompt="a cat")
        assert e.value.code == "model_not_found" and "no worker is live" in e.value.message
    finally:
        stop([api])


# --- POST /v1/images/edits -----------------------------------------------------------------------------------

def _file(tmp_path, name: str, image: Image.Image) -> str:
    path = tmp_path / name
    image.save(path, format="PNG")
    return str(path)


def _noise(size: tuple[int, int]) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB").point(lambda v: v // 2 + 60)


def test_edit_repaints_the_masks_transparent_part_and_keeps_the_rest_exactly(stack, tmp_path):
    image = _noise((64, 64))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 40))  # OpenAI's meaning: transparent is what is edited
    with open(_file(tmp_path, "in.png", image), "rb") as im, open(_file(tmp_path, "mask.png", mask), "rb") as ma:
        result = _client(stack.api_url).images.edit(image=im, mask=ma, prompt="a red door", n=2, size="64x64",
                                                    response_format="b64_json", extra_body={"steps": 2, "seed": 3})
    assert len(result.data) == 2
    outs = [_png(base64.b64decode(d.b64_json)).convert("RGB") for d in result.data]
    assert [o.size for o in outs] == [(64, 64), (64, 64)]
    kept = np.asarray(mask.getchannel("A")) == 255
    src = np.asarray(image)
    for out in outs:
        px = np.asarray(out)
        assert np.array_equal(px[kept], src[kept])  # outside the mask: the input's pixels, exactly
        assert not np.array_equal(px[~kept], src[~kept])  # inside: repainted
    assert not np.array_equal(*(np.asarray(o) for o in outs))  # seeds 3 and 4

    record = stack.api.job(result.model_extra["sdfleet"]["job_id"])
    p = record["parameters"]
    assert (p["kind"], p["width"], p["height"], p["num_images"], p["strength"]) == ("inpaint", 64, 64, 2, 1.0)
    assert {i["role"] for i in record["inputs"]} == {"image", "mask"}


def test_edit_without_a_mask_repaints_the_images_own_transparent_part_at_its_size(stack, tmp_path):
    image = _noise((96, 64)).convert("RGBA")
    image.paste((0, 0, 0, 0), (0, 0, 32, 64))
    with open(_file(tmp_path, "in.png", image), "rb") as im:
        result = _client(stack.api_url).images.edit(image=[im], prompt="a window", response_format="b64_json",
                                                    extra_body={"steps": 2, "seed": 5})  # (sent as image[])
    (item,) = result.data
    out = np.asarray(_png(base64.b64decode(item.b64_json)).convert("RGB"))
    assert out.shape == (64, 96, 3)  # no size: the input's
    src = np.asarray(image.convert("RGB"))
    assert np.array_equal(out[:, 32:], src[:, 32:]) and not np.array_equal(out[:, :32], src[:, :32])
    assert stack.api.job(result.model_extra["sdfleet"]["job_id"])["parameters"]["kind"] == "inpaint"


def test_edit_of_an_opaque_image_without_a_mask_is_image_to_image(stack, tmp_path):
    image = _noise((64, 64))
    client = _client(stack.api_url)
    with open(_file(tmp_path, "in.png", image), "rb") as im:
        same = client.images.edit(image=im, prompt="a cat", size="auto", response_format="b64_json",
                                  extra_body={"strength": 0})  # strength 0: the image back as it is
    assert np.array_equal(np.asarray(_png(base64.b64decode(same.data[0].b64_json)).convert("RGB")), np.asarray(image))
    with open(_file(tmp_path, "in.png", image), "rb") as im:
        result = client.images.edit(image=im, prompt="a cat", extra_body={"steps": 4, "seed": 1})  # url
    (item,) = result.data
    out = _png(httpx.get(item.url).content)
    assert out.size == (64, 64) and not np.array_equal(np.asarray(out.convert("RGB")), np.asarray(image))
    p = stack.api.job(result.model_extra["sdfleet"]["job_id"])["parameters"]
    assert (p["kind"], p["strength"]) == ("img2img", 0.75)


def test_bad_edits_raise_the_clients_own_errors_naming_the_field(stack, tmp_path):
    client = _client(stack.api_url, max_retries=0)
    good = _file(tmp_path, "in.png", _noise((64, 64)))
    small_mask = _file(tmp_path, "small.png", Image.new("RGBA", (32, 32)))
    opaque_mask = _file(tmp_path, "opaque.png", Image.new("RGB", (64, 64), (255, 255, 255)))
    text = tmp_path / "notes.png"
    text.write_bytes(b"not an image at all")
    before = _jobs(stack)
    cases = [({"image": good, "mask": small_mask}, "mask", "32x32, not the image's 64x64"),
             ({"image": str(text)}, "image", "not a PNG, JPEG or WebP"),
             ({"image": good, "mask": str(text)}, "mask", "not a PNG, JPEG or WebP"),
             ({"image": good, "mask": opaque_mask}, "mask", "no transparent pixels"),
             ({"image": [good, good]}, "image", "2 images given"),
             ({"image": good, "size": "100x100"}, "size", "multiple of 8")]
    for files, param, reason in cases:
        opened = {k: [open(p, "rb") for p in v] if isinstance(v, list) else open(v, "rb")
                  for k, v in files.items() if k in ("image", "mask")}
        try:
            with pytest.raises(openai.BadRequestError) as e:
                client.images.edit(prompt="a cat", **opened, **{k: v for k, v in files.items() if k == "size"})
        finally:
            for f in opened.values():
                for one in f if isinstance(f, list) else [f]:
                    one.close()
        assert e.value.status_code == 400 and e.value.code == "invalid_value", e.value.body
        assert e.value.body["param"] == param and reason in e.value.message, e.value.body
    assert _jobs(stack) == before  # nothing was stored
