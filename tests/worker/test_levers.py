"""Memory modes and levers: what each mode switches on, that every lever still makes the right image on the
tiny models (release and recompile, file pages dropped, tiled decode, static shapes that know guidance), and
that the fleet keeps profiles apart by memory mode. What each lever is worth in bytes is measured in
bench/memory.py on full-size models, not asserted here."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import text

from shared.db import engine_for, migrate, session_factory
from shared.settings import Settings, decodes_in_tiles, lever_set_keys
from tests.conftest import POSTGRES_URL, postgres_database, wait_for
from worker.meter import drop_file_pages
from worker.pipelines import GenaiPipeline, ImageRequest, OptimumPipeline, load_pipeline, one_by_one, tiled_decode


def test_modes_pick_their_levers_and_a_lever_set_apart_shows_in_the_profile_key():
    fast, balanced, low = (Settings(memory_mode=m).levers for m in ("fast", "balanced", "low"))
    assert not (fast.release_encoders or fast.release_all or fast.drop_file_pages or fast.vae_tiles)
    assert balanced.release_encoders and balanced.drop_file_pages and not balanced.release_all
    assert low.release_all and low.vae_tiles and low.drop_file_pages
    assert [fast.key, balanced.key, low.key] == ["fast", "balanced", "low"]
    custom = Settings(memory_mode="low", vae_tiles=False, static_shape=True).levers
    assert not custom.vae_tiles and custom.release_all
    assert custom.key == "low-vae_tiles+static"
    assert Settings(memory_mode="fast", inference_precision="f32").levers.precision == "f32"


def test_auto_runs_in_every_mode_s_lever_set_and_reads_which_decode_in_tiles():
    settings = Settings(memory_mode="auto", static_shape=True)
    assert [lv.key for lv in settings.lever_sets] == ["fast+static", "balanced+static", "low+static"]
    assert settings.levers.key == "low+static"  # it starts in the cheapest, which admission judges it by
    assert settings.announced_mode == "auto+static"
    assert lever_set_keys("auto+static") == ["fast+static", "balanced+static", "low+static"]
    assert lever_set_keys("balanced-release_encoders") == ["balanced-release_encoders"]
    assert Settings(memory_mode="low").announced_mode == "low"
    assert [decodes_in_tiles(k) for k in ("fast", "balanced", "low", "low-vae_tiles+static", "fast+vae_tiles",
                                          "my-own-pipeline")] == [False, False, True, False, True, False]


def test_auto_refuses_a_lever_fixed_for_all_its_sets():
    with pytest.raises(ValidationError, match="SDFLEET_VAE_TILES would fix a lever"):
        Settings(memory_mode="auto", vae_tiles=False)


@pytest.mark.parametrize("field,value", [("memory_mode", "tiny"), ("inference_precision", "int8"),
                                         ("compile_threads", 0)])
def test_a_bad_lever_value_is_refused_with_its_name(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def model(request, tiny_model, tiny_sdxl_model):
    return str(tiny_model if request.param == "sd" else tiny_sdxl_model)


def _load(model, tmp_path_factory, **levers) -> OptimumPipeline:
    settings = Settings(**levers)
    cache = tmp_path_factory.mktemp("ov-cache")
    return OptimumPipeline(model, "CPU", {"CACHE_DIR": str(cache)}, settings.levers)


JOBS = [ImageRequest("a cat", None, 64, 64, 2, 1.0, 3), ImageRequest("a dog", "blurry", 96, 64, 2, 7.5, 4),
        ImageRequest("a cat", None, 64, 64, 2, 1.0, 3)]


def test_every_mode_makes_the_same_images_job_after_job(model, tmp_path_factory):
    # releasing and recompiling components (balanced, low) changes when things are compiled, not what they
    # compute: images up to 512x512 (one VAE tile) are identical to the all-resident mode's
    images = {}
    for mode in ("fast", "balanced", "low"):
        pipe = _load(model, tmp_path_factory, memory_mode=mode)
        images[mode] = [np.asarray(pipe.generate(job)) for job in JOBS]
        assert pipe.memory_mode == mode and pipe.precision in ("bf16", "f32", "f16")
    for mode in ("balanced", "low"):
        assert all(np.array_equal(a, b) for a, b in zip(images["fast"], images[mode])), mode
    assert np.array_equal(images["low"][0], images["low"][2])


def test_one_auto_pipeline_switches_lever_sets_between_jobs_and_makes_each_mode_s_images(model, tmp_path_factory):
    """SDFLEET_MEMORY_MODE=auto: one pipeline switched between jobs makes the images the fixed modes make; a
    switch to a set that keeps less releases what it does not keep at once (each component has one compiled
    model or none, never two), and the runtime's buffers given back after a job change no image."""
    fast, balanced, low = Settings(memory_mode="auto").lever_sets
    pipe = _load(model, tmp_path_factory, memory_mode="auto")
    assert pipe.levers == low
    reference = _load(model, tmp_path_factory, memory_mode="fast")
    want = [np.asarray(reference.generate(job)) for job in JOBS]

    def compiled() -> set[str]:
        return {name for name, part in pipe._parts.items() if part.request is not None}

    encoders = {n for n in pipe._parts if n.startswith("text_encoder")}
    for levers, job, expected in zip((fast, low, balanced, fast), (*JOBS, JOBS[1]), (*want, want[1])):
        pipe.use_levers(levers)
        if levers is low:
            assert compiled() == set(), "what low mode does not keep between jobs is released at the switch"
        assert pipe.levers.key == levers.key
        assert np.array_equal(np.asarray(pipe.generate(job)), expected), levers.key
        kept = {"fast": set(pipe._parts) - {"vae_encoder"}, "balanced": {"unet", "vae_decoder"}, "low": set()}
        assert compiled() == kept[levers.key] - (set() if levers is fast else encoders)
        pipe.release_buffers()  # what the worker does after each job
    assert np.array_equal(np.asarray(pipe.generate(JOBS[0])), want[0])


def test_low_mode_keeps_what_it_is_told_to_compiled_between_jobs_and_makes_the_same_images(model, tmp_path_factory):
    """What low mode releases after each phase and the next job loads again can stay compiled (the worker keeps
    what its budget has room for): the images stay low mode's, bitwise; what stays is measured as it is first
    compiled (the warm-up), and what is no longer kept goes at once."""
    pipe = _load(model, tmp_path_factory, memory_mode="low")
    pipe.warm_up()
    encoders = {n for n in pipe._parts if n.startswith("text_encoder")}
    held = pipe.releasable(pipe.levers, "txt2img", None)
    assert set(held) == encoders | {"unet", "vae_decoder"} and all(size > 0 for size in held.values())
    # the VAE encoder (image jobs only) is measured by the first job that encodes an image, not by the warm-up
    assert "vae_encoder" not in pipe.releasable(pipe.levers, "img2img", None)
    assert set(pipe.releasable(Settings(memory_mode="balanced").levers, "txt2img", None)) == encoders
    assert pipe.releasable(Settings(memory_mode="fast").levers, "txt2img", None) == {}  # fast releases nothing
    plain = [np.asarray(pipe.generate(job)) for job in JOBS]

    def compiled() -> set[str]:
        return {name for name, part in pipe._parts.items() if part.request is not None}

    pipe.keep(tuple(held))
    for job, expected in zip(JOBS, plain):
        assert np.array_equal(np.asarray(pipe.generate(job)), expected)
        pipe.release_buffers()
        assert compiled() == set(held)  # nothing of it loaded again by the next job
    assert pipe.kept_compiled() == held
    pipe.keep(("vae_decoder",))  # the budget has room for less: the rest goes now, not after the next job
    assert compiled() == {"vae_decoder"} and pipe.kept_compiled() == {"vae_decoder": held["vae_decoder"]}
    assert np.array_equal(np.asarray(pipe.generate(JOBS[1])), plain[1])
    assert compiled() == {"vae_decoder"}
    pipe.keep(())
    assert compiled() == set()


def test_kept_components_keep_their_buffers_past_their_phase_once_measured_at_the_job_s_shape(model,
                                                                                             tmp_path_factory):
    """A kept component gives its runtime buffers back as its phase ends, which measures what they held at the
    job's shape; told to keep them too, it holds them through the other phases and the next job of that shape
    (counted in what it holds), and the images stay low mode's, bitwise. Buffers no longer kept go back at once."""
    pipe = _load(model, tmp_path_factory, memory_mode="low")
    pipe.warm_up()
    held = pipe.releasable(pipe.levers, "txt2img", None)
    job, kind = ImageRequest("a cat", None, 256, 256, 2, 7.5, 3), ("low", "full", (256, 256, True))
    pipe.keep(tuple(held), (), kind)
    assert pipe.buffer_sizes(tuple(held), kind) == {}  # nothing measured in this kind of job yet
    plain = np.asarray(pipe.generate(job))
    sizes = pipe.buffer_sizes(tuple(held), kind)
    assert set(sizes) == set(held) and sizes["vae_decoder"] > 0  # each gave its buffers back as its phase ended
    assert pipe.buffer_sizes(tuple(held), ("low", "full", (64, 64, False))) == {}  # per kind (lever set, decoder, shape)
    assert pipe.kept_compiled() == held and pipe.held_buffers() == 0

    pipe.keep(tuple(held), tuple(held), kind)
    for _ in range(2):
        assert np.array_equal(np.asarray(pipe.generate(job)), plain)
        # past every phase, each kept component holds its buffers as measured
        assert pipe.held_buffers() == sum(sizes.values())
        assert pipe.kept_compiled() == {n: held[n] + sizes[n] for n in held}
    pipe.keep(tuple(held), ("unet",), kind)  # room for less: the others' buffers go now
    assert pipe.held_buffers() == sizes["unet"]
    pipe.release_buffers()  # (a job of another kind) every buffer goes back
    assert pipe.held_buffers() == 0 and pipe.kept_compiled() == held


def test_static_shapes_follow_guidance_and_size_from_job_to_job(model, tmp_path_factory):
    # optimum-intel's own reshape fixes the UNet batch at 2, and a guidance-1 job then fails; here each
    # job's shape (guidance included) is compiled for, and a different next job recompiles
    pipe = _load(model, tmp_path_factory, memory_mode="low", static_shape=True)
    assert pipe.memory_mode == "low+static"
    for w, h, g in [(64, 64, 1.0), (64, 64, 7.5), (128, 64, 1.0), (64, 64, 1.0)]:
        assert pipe.generate(ImageRequest("a tree", None, w, h, 2, g, 0)).size == (w, h)
    a = np.asarray(pipe.generate(JOBS[0]))
    b = np.asarray(pipe.generate(JOBS[0]))
    assert np.array_equal(a, b)


def test_genai_static_shapes_follow_guidance_too(tiny_model, tmp_path):
    pipe = GenaiPipeline(str(tiny_model), "CPU", {"CACHE_DIR": str(tmp_path)},
                         Settings(memory_mode="fast", static_shape=True).levers)
    for w, h, g in [(64, 64, 1.0), (64, 64, 7.5), (96, 64, 1.0)]:
        assert pipe.generate(ImageRequest("a tree", None, w, h, 2, g, 0)).size == (w, h)


def test_a_tiled_decode_stitches_tiles_back_exactly():
    # a decoder that upsamples 8x is position-wise: blending overlapping tiles must give back the whole
    calls = []

    def decode(latent_sample):
        calls.append(tuple(latent_sample.shape))
        return {"sample": latent_sample.repeat_interleave(8, -1).repeat_interleave(8, -2)[:, :3]}

    latents = torch.randn(1, 4, 128, 96)
    whole = decode(latents)["sample"]
    calls.clear()
    tiled = tiled_decode(decode, latents)["sample"]
    assert tiled.shape == whole.shape == (1, 3, 1024, 768)
    assert torch.allclose(tiled, whole, atol=1e-5)
    assert len(calls) > 1 and all(c[-2] <= 64 and c[-1] <= 64 for c in calls)
    calls.clear()
    small = torch.randn(1, 4, 64, 48)
    assert torch.equal(tiled_decode(decode, small)["sample"], decode(small)["sample"])


def _counting_decoder(pipe: OptimumPipeline) -> list:
    """Count the decoder's calls under the vae_tiles wrapper (one per tile, or one for a whole decode)."""
    decoder, calls = pipe._parts["vae_decoder"], []
    inner = decoder.forward.args[0]

    def counting(latent_sample, *args, **kwargs):
        calls.append(tuple(latent_sample.shape[-2:]))
        return inner(latent_sample, *args, **kwargs)

    decoder.forward = functools.partial(pipe._decode, counting)
    return calls


def test_tiled_vae_decode_of_a_large_image_matches_the_whole_decode_closely(tiny_sdxl_model, tmp_path_factory):
    job = ImageRequest("a castle", None, 1024, 768, 1, 1.0, 5)
    whole = np.asarray(_load(str(tiny_sdxl_model), tmp_path_factory, memory_mode="fast").generate(job), float)
    pipe = _load(str(tiny_sdxl_model), tmp_path_factory, memory_mode="fast", vae_tiles=True)
    calls = _counting_decoder(pipe)
    pipe.decode_bytes_per_pixel = 1e12  # a whole decode would raise the peak: tiles
    tiled = np.asarray(pipe.generate(job), float)
    assert calls == [(64, 64)] * 6  # 128x96 latents: 3 x 2 overlapping tiles
    assert tiled.shape == whole.shape == (768, 1024, 3)
    assert np.abs(tiled - whole).mean() < 3  # of 255: group norms see a tile, not the image
    # where the job's peak so far leaves room for a whole decode, it decodes whole: the same image as without
    # the lever, in one call
    calls.clear()
    pipe.decode_bytes_per_pixel = 1e-9
    assert np.array_equal(np.asarray(pipe.generate(job), float), whole) and calls == [(96, 128)]


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile"))


def test_dropping_the_weights_file_pages_lowers_rss_and_the_next_image_is_the_same(tiny_sdxl_model, tmp_path_factory):
    pipe = _load(str(tiny_sdxl_model), tmp_path_factory, memory_mode="fast")
    before_image = np.asarray(pipe.generate(JOBS[1]))
    before = _rss_file()
    dropped = drop_file_pages(pipe.model_files())
    assert dropped > 1 << 20 and _rss_file() <= before - dropped // 2
    assert np.array_equal(np.asarray(pipe.generate(JOBS[1])), before_image)


@pytest.mark.one_database
def test_a_low_memory_worker_reports_its_mode_and_its_jobs_teach_that_mode_s_profile(stack, spawn_worker, tiny_vae):
    # low mode with a tiny VAE: the profile key names both, and the job decodes through the TAESD
    model, _ = spawn_worker("low", SDFLEET_MEMORY_MODE="low", SDFLEET_TINY_VAE=tiny_vae)
    (w,) = [w for w in stack.api.workers() if w["model"] == model]
    assert w["memory_mode"] == "low+tiny_vae"
    job = stack.api.submit(prompt="a red car", model=model, width=128, height=96, steps=2, seed=1)
    done = wait_for(stack, job["id"], "status", "succeeded")
    assert done["peak_rss_bytes"] > 0
    assert "decode" in {s["phase"] for s in stack.api.memory(job["id"])["samples"]}
    (m,) = [m for m in stack.api.models() if m["name"] == model]
    assert [p["memory_mode"] for p in m["profiles"]] == ["low+tiny_vae"]
    assert m["runtimes"] == [f"optimum/{w['precision']}/low+tiny_vae"]
    assert done["parameters"]["decoder"] is None  # the worker's default: its tiny VAE

    # the same job asking for the model's own VAE: another image, its own profile (the key without the tiny VAE)
    full = wait_for(stack, stack.api.submit(prompt="a red car", model=model, width=128, height=96, steps=2, seed=1,
                                            decoder="full")["id"], "status", "succeeded")
    assert full["parameters"]["decoder"] == "full"
    assert stack.api.image(full["images"][0]["url"]) != stack.api.image(done["images"][0]["url"])
    (m,) = [m for m in stack.api.models() if m["name"] == model]
    assert sorted(p["memory_mode"] for p in m["profiles"]) == ["low", "low+tiny_vae"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    """A random-weight TAESD (diffusers folder, as madebyollin/taesd is), exported by the CLI as a user would."""
    from modeltools.tiny import make_tiny_taesd

    root = tmp_path_factory.mktemp("taesd")
    make_tiny_taesd(root / "taesd")
    out = subprocess.run([sys.executable, "-m", "sdfleet", "model", "export-tiny-vae", str(root / "taesd"),
                          str(root / "taesd-ov")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"SDFLEET_TINY_VAE={root / 'taesd-ov'}" in out.stdout
    return str(root / "taesd-ov")


def test_a_worker_with_a_tiny_vae_decodes_with_either_per_job(model, tiny_vae, tmp_path_factory):
    """With a tiny VAE a pipeline has two decoders: text-to-image jobs decode with the tiny one unless they ask
    for the model's own ("full", the image a worker without the tiny VAE makes, bitwise); image jobs decode
    with the model's own (its encoder's latents are scaled for it), and cannot ask for the tiny one."""
    job = ImageRequest("a lighthouse", None, 128, 96, 2, 7.5, 5)
    full = _load(model, tmp_path_factory, memory_mode="low")
    both = _load(model, tmp_path_factory, memory_mode="low", tiny_vae=tiny_vae)
    assert full.decoders == ("full",) and both.decoders == ("full", "tiny")
    own = np.asarray(full.generate(job))
    assert np.array_equal(np.asarray(both.generate(dataclasses.replace(job, decoder="full"))), own)
    tiny = np.asarray(both.generate(job))
    assert np.array_equal(np.asarray(both.generate(dataclasses.replace(job, decoder="tiny"))), tiny)
    assert np.abs(tiny.astype(int) - own).mean() > 10  # the tiny VAE decoded it
    assert np.array_equal(np.asarray(both.generate(job)), tiny)  # and again after a full decode: no state left
    # image-to-image on the pipeline with both: the model's own VAE, as on one without the tiny VAE
    assert "img2img" in both.tasks
    edit = ImageRequest("a lighthouse", None, 128, 96, 4, 7.5, 6, image=Image.fromarray(own), strength=0.5)
    assert np.array_equal(np.asarray(both.generate(edit)), np.asarray(full.generate(edit)))
    with pytest.raises(ValueError, match="text-to-image jobs only"):
        both.generate(dataclasses.replace(edit, decoder="tiny"))
    with pytest.raises(ValueError, match="no tiny VAE"):
        full.generate(dataclasses.replace(job, decoder="tiny"))


def _taesd_decode(tiny_vae: str, latents) -> np.ndarray:
    """What diffusers' own AutoencoderTiny (torch, the source weights) makes of the latents, as 8-bit pixels."""
    from diffusers import AutoencoderTiny

    source = json.loads((Path(tiny_vae) / "sdfleet_tiny_vae.json").read_text())["source"]
    with torch.no_grad():
        x = AutoencoderTiny.from_pretrained(source).decode(torch.as_tensor(latents)).sample
    return ((x[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().numpy()


def test_a_tiny_vae_decodes_the_unets_latents_as_torch_taesd_does(model, tiny_vae, tmp_path_factory):
    # SD in fast mode (whole decode), SDXL in low mode (the decoder compiled per phase, tiles above 512 px)
    mode = "low" if "sdxl" in Path(model).name else "fast"
    job = ImageRequest("a lighthouse", None, 128, 96, 3, 7.5, 5)
    full = _load(model, tmp_path_factory, memory_mode=mode)
    tiny = _load(model, tmp_path_factory, memory_mode=mode, tiny_vae=tiny_vae)
    assert tiny.memory_mode == f"{mode}+tiny_vae" and full.memory_mode == mode
    image = np.asarray(tiny.generate(job)).astype(int)
    assert image.shape == (96, 128, 3) and image.std() > 1
    assert np.abs(image - np.asarray(full.generate(job))).mean() > 10, "the model's own VAE did the decoding"
    # the same latents, decoded by torch's TAESD: the UNet's latents reach the tiny decoder unscaled
    latents = tiny._pipe(prompt=job.prompt, width=job.width, height=job.height, num_inference_steps=job.steps,
                         guidance_scale=job.guidance_scale, generator=torch.Generator("cpu").manual_seed(job.seed),
                         output_type="latent").images
    assert np.abs(image - _taesd_decode(tiny_vae, latents)).max() <= 2
    assert np.array_equal(np.asarray(tiny.generate(job)), image), "job after job"


def test_a_tiny_vae_that_is_not_one_is_refused_with_the_reason(tiny_model, tiny_vae, tmp_path):
    with pytest.raises(ValueError, match="no TAESD decoder in OpenVINO IR here"):
        OptimumPipeline(str(tiny_model), levers=Settings(tiny_vae=str(tmp_path)).levers)
    # the model's own (full) VAE decoder is not a tiny one
    with pytest.raises(ValueError, match="not a tiny autoencoder .*AutoencoderKL"):
        OptimumPipeline(str(tiny_model), levers=Settings(tiny_vae=str(Path(tiny_model) / "vae_decoder")).levers)
    with pytest.raises(ValueError, match="genai backend decodes with the model's own VAE only"):
        GenaiPipeline(str(tiny_model), levers=Settings(tiny_vae=tiny_vae).levers)
    out = subprocess.run([sys.executable, "-m", "sdfleet", "model", "export-tiny-vae", str(Path(tiny_model)),
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "not a diffusers model folder" in out.stderr, out.stderr
    assert not (tmp_path / "x").exists()
    # a worker told to use one refuses to start, with the reason, before touching anything
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
    env.update(SDFLEET_MODEL=str(tiny_model), SDFLEET_TINY_VAE=str(Path(tiny_model) / "vae_decoder"),
               SDFLEET_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    worker = subprocess.run([sys.executable, "-m", "sdfleet", "worker"], capture_output=True, text=True, timeout=120,
                            env=env)
    assert worker.returncode != 0 and "not a tiny autoencoder" in worker.stderr, worker.stderr
    assert not (tmp_path / "x.db").exists()


@contextlib.contextmanager
def _fresh_database(kind: str, tmp_path):
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    if not POSTGRES_URL:
        pytest.skip("SDFLEET_TEST_POSTGRES_URL is not set")
    gen = postgres_database()
    try:
        yield next(gen)
    finally:
        gen.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_worker_with_every_lever_set_apart_beats_and_learns_on_both_databases(kind, tmp_path):
    """The longest memory-mode key (every lever against its mode, static shapes, a tiny VAE) fits the columns
    that hold it: PostgreSQL enforces their length (64 before migration 0010 refused such a worker)."""
    from shared import fleet
    from shared.fleet_contract import WorkerState
    from shared.memory import Shape
    from shared.models import utcnow

    flips = dict(release_encoders=True, release_all=True, drop_file_pages=True, vae_tiles=True, split_guidance=True)
    key = Settings(memory_mode="fast", static_shape=True, tiny_vae="/some/taesd", **flips).levers.key
    assert len(key) > 64 and key.endswith("+static+tiny_vae")
    with _fresh_database(kind, tmp_path) as url:
        migrate(engine_for(url))
        sessions = session_factory(url)
        hb = WorkerState(name="w1", host="h", model="m", backend="optimum", precision="bf16", memory_mode=key,
                             budget_bytes=1 << 30, cgroup_limit_bytes=None, total_ram_bytes=1 << 34,
                             available_bytes=1 << 33, resident_bytes=1 << 28, current_job_id=None, state="ready",
                             state_reason=None, max_budget_bytes=1 << 30, defaults=None)
        with sessions.begin() as s:
            fleet.beat(s, hb, utcnow())
            fleet.record_profile(s, "m", "optimum", "bf16", key, Shape(512, 512, True), 3 << 30, 2 << 30)
        with sessions() as s:
            assert [p.peak_bytes for p in fleet.profiles(s, "m", "optimum", "bf16", key)] == [3 << 30]
            assert [w.memory_mode for w in fleet.live_workers(s, 60, "m")] == [key]
        engine_for(url).dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_profiles_stored_before_memory_modes_are_kept_as_the_fast_mode_s(kind, tmp_path):
    with _fresh_database(kind, tmp_path) as url:
        engine = engine_for(url)
        migrate(engine, "0003")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO memory_profiles (model, backend, precision, width, height, images_per_pass, guidance,"
                " peak_bytes, base_bytes, samples, updated_at) VALUES ('m', 'optimum', 'bf16', 512, 512, 1, true,"
                " 123, 45, 3, CURRENT_TIMESTAMP)"))
        migrate(engine)
        with engine.begin() as conn:
            rows = conn.execute(text("SELECT model, memory_mode, peak_bytes, samples FROM memory_profiles")).all()
            assert [tuple(r) for r in rows] == [("m", "fast", 123, 3)]
            # the same shape measured in another mode is a row of its own
            conn.execute(text(
                "INSERT INTO memory_profiles (model, backend, precision, memory_mode, width, height, images_per_pass,"
                " guidance, peak_bytes, base_bytes, samples, updated_at) VALUES ('m', 'optimum', 'bf16', 'low', 512,"
                " 512, 1, true, 99, 40, 1, CURRENT_TIMESTAMP)"))
            assert conn.execute(text("SELECT count(*) FROM memory_profiles")).scalar() == 2
        engine.dispose()


def test_the_compile_cache_is_kept_apart_by_precision_and_the_real_precision_is_read_back(tiny_model, tmp_path):
    # OpenVINO's CPU plugin keys a cached blob by the device name only: a worker switched from bf16 to f32
    # must not import the bf16 blobs, so each precision compiles into its own folder. And what the worker
    # reports is what the compiled UNet runs at: a bf16 hint on a CPU without bf16 runs f32.
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    folders = {}
    for asked, runs in (("bf16", "bf16" if has_bf16 else "f32"), ("f32", "f32")):
        settings = Settings(model=str(tiny_model), cache_dir=tmp_path, inference_precision=asked, warmup=False)
        pipe = load_pipeline(settings)
        pipe.generate(ImageRequest("a cat", None, 64, 64, 1, 1.0, 3))
        assert pipe.precision == runs
        (folder,) = [f for f in pipe.model_files() if str(tmp_path) in f]
        assert folder.endswith(f"CPU-{asked}-threads_auto-dynamic")
        assert any(Path(folder).glob("*.blob")), "the compiled blobs are cached in the keyed folder"
        folders[asked] = folder
    assert folders["bf16"] != folders["f32"]


def test_split_guidance_runs_the_unet_one_image_at_a_time_and_makes_the_same_image(model, tmp_path_factory):
    job = ImageRequest("a dog", "blurry", 96, 64, 3, 7.5, 4)
    whole = _load(model, tmp_path_factory, memory_mode="fast")
    split = _load(model, tmp_path_factory, memory_mode="fast", split_guidance=True)
    assert split.memory_mode == "fast+split_guidance" and _load(model, tmp_path_factory, memory_mode="low").levers.split_guidance
    unet = split._parts["unet"]
    inner, batches = unet.forward.__wrapped__.args[0], []  # inside the resume's step skipper

    def counting(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return inner(sample, *args, **kwargs)

    unet.forward = functools.partial(one_by_one, counting)
    a, b = np.asarray(whole.generate(job)).astype(int), np.asarray(split.generate(job)).astype(int)
    assert batches == [1] * 6  # 3 steps, each an unconditional and a conditional pass
    assert np.abs(a - b).max() <= 2, "the same image, up to rounding"
    # without guidance nothing is split: one pass per step
    batches.clear()
    split.generate(ImageRequest("a dog", None, 96, 64, 3, 1.0, 4))
    assert batches == [1] * 3
