"""The few-step models CPU users run: an LCM (guidance as an embedding), an SD-Turbo-like and an SDXL-Turbo-like
model (one step, no guidance), each exported by `sdfleet model export` and served end to end on both backends
through the real API, Redis and worker processes; each job takes the model's own defaults when it leaves
them out. A hub ID is served from a Hugging Face cache the test lays out (offline)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from PIL import Image

from sdfleet.client import ApiError
from shared.settings import Settings
from tests.conftest import ROOT, free_port, hub_cache, kill_tree, stack_env, start_worker, tiny, wait_worker_ready
from worker.family import model_defaults, read_defaults

FEW_STEP = ("lcm", "sd-turbo", "sdxl-turbo")
# family, steps, guidance, side, whether guidance doubles the UNet's batch, whether a negative prompt is taken
EXPECTED = {
    "sd": ("sd", 20, 7.5, 512, True, True),
    "sdxl": ("sdxl", 25, 5.0, 512, True, True),  # the tiny SDXL's UNet is 64 latents (a real one's 128: 1024)
    "lcm": ("lcm", 4, 8.0, 512, False, False),
    "sd-turbo": ("sd-turbo", 1, 0.0, 512, True, True),
    "sdxl-turbo": ("sdxl-turbo", 1, 0.0, 512, True, True),
}
HUB_ID = "sdfleet-test/tiny-lcm-openvino"


def _defaults_tuple(d) -> tuple:
    return d.family, d.steps, d.guidance_scale, d.width, d.guidance_doubles_batch, d.negative_prompt


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_a_model_s_family_and_defaults_are_read_from_its_pipeline_files(arch):
    folder = tiny(arch)
    defaults = read_defaults(folder)
    assert _defaults_tuple(defaults) == EXPECTED[arch]
    assert defaults.width == defaults.height and defaults.overridden == []
    if arch in FEW_STEP:  # exported by sdfleet's own exporter, the way a user converts a downloaded model
        assert (folder / "sdfleet_export.json").is_file()


def test_the_operator_s_defaults_override_the_model_s_and_say_so(tmp_path):
    settings = Settings(default_steps=2, default_width=256)
    d = model_defaults(tiny("sd-turbo"), settings)
    assert (d.family, d.steps, d.guidance_scale, d.width, d.height) == ("sd-turbo", 2, 0.0, 256, 512)
    assert d.overridden == ["steps", "width"]
    # a folder that is no pipeline: SD 1.5's defaults, not a crash
    d = model_defaults(tmp_path, Settings())
    assert (d.family, d.steps, d.guidance_scale, d.guidance_doubles_batch) == ("unknown", 20, 7.5, True)
    with pytest.raises(ValueError, match="multiple of 8"):
        Settings(default_width=250)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """A Hugging Face cache holding the tiny LCM's IR under a hub ID, as a download would have left it."""
    home = tmp_path_factory.mktemp("hf-home")
    hub_cache(home, HUB_ID, tiny("lcm"))
    return home


def _png(stack, url: str) -> Image.Image:
    return Image.open(io.BytesIO(stack.api.image(url)))


@pytest.mark.one_database  # admission and the job record's SQL run on both databases elsewhere
@pytest.mark.parametrize("backend", ["optimum", "genai"])
def test_lcm_and_turbo_jobs_run_end_to_end_with_the_model_s_defaults(stack, tmp_path, hf_home, backend):
    workers, names = [], {}
    try:
        for arch in FEW_STEP:
            names[arch] = f"{arch}-{backend}-{uuid.uuid4().hex[:6]}"
            extra = {"SDFLEET_MODEL": str(tiny(arch)), "SDFLEET_BACKEND": backend}
            if arch == "lcm":  # served by its hub ID, from the cache (offline)
                extra.update(SDFLEET_MODEL=HUB_ID, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
            if arch == "sd-turbo":  # the operator's own defaults over the model's
                extra.update(SDFLEET_DEFAULT_STEPS="2", SDFLEET_DEFAULT_WIDTH="256")
            env = stack_env(stack.database_url, stack.redis_url, SDFLEET_MODEL_NAME=names[arch], **extra)
            workers.append(start_worker(env, tmp_path / f"{arch}.log"))
        for arch, proc in zip(FEW_STEP, workers):
            wait_worker_ready(proc, tmp_path / f"{arch}.log", stack.database_url, names[arch])

        models = {m["name"]: m for m in stack.api.models()}
        for arch in FEW_STEP:
            family, steps, guidance, side, doubles, _ = EXPECTED[arch]
            defaults = models[names[arch]]["defaults"]
            if arch == "sd-turbo":
                steps, width = 2, 256
                assert defaults["overridden"] == ["steps", "width"]
            else:
                width = side
            assert (defaults["family"], defaults["steps"], defaults["guidance_scale"], defaults["width"],
                    defaults["height"], defaults["guidance_doubles_batch"]) == (family, steps, guidance, width, side,
                                                                                doubles)
            # a job that names only its prompt gets the model's steps, guidance and size, and its record says so
            done = stack.api.wait(stack.api.submit(prompt="a lighthouse", model=names[arch])["id"], timeout=180)
            assert done["status"] == "succeeded", done["error"]
            p = done["parameters"]
            assert (p["steps"], p["guidance_scale"], p["width"], p["height"]) == (steps, guidance, width, side)
            image = _png(stack, done["images"][0]["url"])
            assert image.size == (width, side) and np.asarray(image.convert("RGB")).std() > 0
            assert done["peak_rss_bytes"] > done["rss_before_bytes"] > 0 and done["peak_rss_method"] == "vmhwm"
            # what the job sends is kept: an explicit value is never replaced by a default
            done = stack.api.wait(stack.api.submit(prompt="a lighthouse", model=names[arch], steps=3, width=128,
                                                   height=128, guidance_scale=1.0)["id"], timeout=180)
            assert done["status"] == "succeeded", done["error"]
            p = done["parameters"]
            assert (p["steps"], p["guidance_scale"], p["width"], p["height"]) == (3, 1.0, 128, 128)

        table = subprocess.run([sys.executable, "-m", "sdfleet", "models", "--api", stack.api_url], cwd=ROOT,
                               capture_output=True, text=True, timeout=60, check=True).stdout
        row = next(line for line in table.splitlines() if line.startswith(names["lcm"] + " "))
        assert row.split()[1:6] == ["lcm", "4", "(2-8)", "8", "(embedding)"]
        lcm = names["lcm"]
        # an LCM's guidance is an embedding: guidance 8 does not double the UNet's batch, so admission predicts
        # (and the profile records) the shape of a job without classifier-free guidance
        plan = stack.api.plan(model=lcm)
        assert plan["guidance_scale"] == 8.0 and plan["guidance"] is False
        profiles = {(p["width"], p["height"], p["guidance"]) for p in
                    next(m for m in stack.api.models() if m["name"] == lcm)["profiles"]}
        assert profiles == {(512, 512, False), (128, 128, False)}
        turbo = stack.api.plan(model=names["sdxl-turbo"], guidance_scale=7.5)
        assert turbo["guidance"] is True  # a turbo model asked for guidance does run it (twice the work)
        with pytest.raises(ApiError) as refused:
            stack.api.submit(prompt="a lighthouse", model=lcm, negative_prompt="fog")
        assert refused.value.status == 422 and "negative_prompt" in str(refused.value.body)
        assert "embedding" in refused.value.body["error"]["message"]
        # an LCM takes image-to-image; optimum-intel has no LCM inpainting pipeline: refused with the reason
        init = base64.b64encode(stack.api.image(done["images"][0]["url"])).decode()
        done = stack.api.wait(stack.api.submit(prompt="a lighthouse", model=lcm, image=init, strength=0.5)["id"],
                              timeout=180)
        assert done["status"] == "succeeded" and done["parameters"]["kind"] == "img2img", done["error"]
        assert _png(stack, done["images"][0]["url"]).size == (128, 128)
        if backend == "optimum":
            assert "inpaint" not in models[lcm]["defaults"]["tasks"]
            with pytest.raises(ApiError) as refused:
                stack.api.submit(prompt="a lighthouse", model=lcm, image=init, mask=init)
            assert refused.value.status == 422 and "not inpaint" in refused.value.body["error"]["message"]
    finally:
        kill_tree(workers)


def test_a_hub_id_that_is_not_cached_stops_the_worker_with_the_id_and_the_reason(tmp_path):
    def worker(**env) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SDFLEET_", "HF_"))}
        env = {**base, "HF_HOME": str(tmp_path), "SDFLEET_MODEL": "sdfleet-test/absent",
               "SDFLEET_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", **env}
        return subprocess.run([sys.executable, "-m", "sdfleet", "worker"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=env)

    offline = worker(HF_HUB_OFFLINE="1")
    assert offline.returncode != 0
    assert "sdfleet-test/absent: not in the Hugging Face cache" in offline.stderr
    assert "HF_HUB_OFFLINE=1" in offline.stderr
    # online, but the hub does not answer (a closed port on loopback stands for it)
    unreachable = worker(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode != 0
    assert "sdfleet-test/absent: not in the Hugging Face cache" in unreachable.stderr
    assert "the hub is unreachable" in unreachable.stderr
    assert not (tmp_path / "x.db").exists()  # refused before touching anything
