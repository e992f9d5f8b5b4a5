"""The memory model: cgroup limits from fixture files (v1, v2, "max"), the host budget, predictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.memory import (
    GB, MB, PRIOR_FIXED_BYTES, LeverSet, Profile, Shape, cgroup_memory_limit, choose_kept, choose_lever_set,
    host_budget, predict,
)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_limit(tmp_path):
    _write(tmp_path, "system.slice/worker.service/memory.max", str(12 * GB))
    assert cgroup_memory_limit("0::/system.slice/worker.service\n", tmp_path) == 12 * GB


def test_cgroup_v2_max_means_no_limit_and_an_ancestor_can_still_limit(tmp_path):
    _write(tmp_path, "a/b/memory.max", "max")
    assert cgroup_memory_limit("0::/a/b", tmp_path) is None
    _write(tmp_path, "a/memory.max", str(8 * GB))
    assert cgroup_memory_limit("0::/a/b", tmp_path) == 8 * GB


def test_cgroup_v2_in_a_container_root(tmp_path):
    _write(tmp_path, "memory.max", str(6 * GB))
    assert cgroup_memory_limit("0::/\n", tmp_path) == 6 * GB


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    text = "12:pids:/docker/abc\n5:memory:/docker/abc\n1:name=systemd:/docker/abc\n"
    _write(tmp_path, "memory/docker/abc/memory.limit_in_bytes", str(4 * GB))
    assert cgroup_memory_limit(text, tmp_path) == 4 * GB
    _write(tmp_path, "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_memory_limit(text, tmp_path) is None


def test_no_cgroup_files(tmp_path):
    assert cgroup_memory_limit("0::/nowhere", tmp_path) is None
    assert cgroup_memory_limit("", tmp_path) is None


def test_host_budget():
    assert host_budget(32 * GB, None, 2 * GB) == 30 * GB
    assert host_budget(32 * GB, 8 * GB, 1 * GB) == 7 * GB  # the container's limit, not the host's RAM
    assert host_budget(4 * GB, 8 * GB, 1 * GB) == 3 * GB
    assert host_budget(32 * GB, 8 * GB, 1 * GB, explicit=5 * GB) == 5 * GB


def test_predictions_profile_then_scaled_then_prior():
    seen = Profile(Shape(512, 512, True), peak_bytes=6 * GB, base_bytes=5 * GB, samples=3)
    exact = predict(Shape(512, 512, True), [seen], 5 * GB)
    assert (exact.bytes, exact.source) == (6 * GB, "profile")
    # 4x the latent pixels: 4x what the job used above the loaded pipeline
    bigger = predict(Shape(1024, 1024, True), [seen], 5 * GB)
    assert bigger.source == "scaled" and bigger.bytes == 5 * GB + 4 * GB
    # guidance off halves the UNet batch
    assert predict(Shape(512, 512, False), [seen], 5 * GB).bytes == 5 * GB + GB // 2
    prior = predict(Shape(512, 512, False), [], 600 * MB)
    assert prior.source == "prior" and prior.bytes > 600 * MB + PRIOR_FIXED_BYTES
    assert predict(Shape(1024, 1024, True), [], 600 * MB).bytes > prior.bytes


def test_an_init_images_encode_is_part_of_the_shape_and_its_prediction():
    from shared.memory import ENCODE_BYTES_PER_LATENT_PIXEL, latent_pixels

    t2i = Profile(Shape(512, 512, True), peak_bytes=5 * GB, base_bytes=4 * GB, samples=1)
    # no job with an init image measured: text-to-image's profile scaled, or its base plus the encode prior
    small = predict(Shape(512, 512, True, encodes=True), [t2i], resident_bytes=4 * GB)
    assert small.source == "scaled" and "encode prior" in small.detail
    assert small.bytes == max(5 * GB, 4 * GB + ENCODE_BYTES_PER_LATENT_PIXEL * latent_pixels(512, 512))
    large = predict(Shape(1536, 1536, False, encodes=True), [t2i], resident_bytes=4 * GB)
    assert large.bytes >= 4 * GB + ENCODE_BYTES_PER_LATENT_PIXEL * latent_pixels(1536, 1536)
    # once one was measured, jobs with an init image scale from it, not from text-to-image's
    i2i = Profile(Shape(512, 512, True, encodes=True), peak_bytes=6 * GB, base_bytes=4 * GB, samples=1)
    assert predict(Shape(512, 512, True, encodes=True), [t2i, i2i], 4 * GB).bytes == 6 * GB
    scaled = predict(Shape(768, 512, True, encodes=True), [t2i, i2i], 4 * GB)
    assert scaled.bytes == 4 * GB + int(2 * GB / 2) * 3 and "encode prior" not in scaled.detail
    # and text-to-image keeps its own
    assert predict(Shape(512, 512, True), [t2i, i2i], 4 * GB).bytes == 5 * GB
    # the prior (nothing measured) covers the encode too
    assert predict(Shape(1024, 1024, False, encodes=True), [], GB).bytes >= \
        GB + PRIOR_FIXED_BYTES + ENCODE_BYTES_PER_LATENT_PIXEL * latent_pixels(1024, 1024)


def test_a_jobs_work_by_kind():
    from shared.jobs import JobParameters, denoising_steps, job_work, upscale_tiles

    base = dict(prompt="p", negative_prompt=None, steps=20, guidance_scale=7.5, seed=1, num_images=2, model="m")
    t2i = job_work(JobParameters(**base, width=512, height=768))
    assert (t2i.shape, t2i.steps, t2i.passes) == (Shape(512, 768, True), 20, 2)
    i2i = job_work(JobParameters(**base, width=512, height=768, kind="img2img", strength=0.5))
    assert (i2i.shape, i2i.steps, i2i.passes) == (Shape(512, 768, True, encodes=True), 10, 2)
    # an LCM's schedule takes its steps from the part the strength leaves: all of them run
    assert job_work(JobParameters(**base, width=512, height=512, kind="img2img", strength=0.5),
                    family="lcm").steps == 20
    assert denoising_steps("img2img", 20, 0.0) == 0 and denoising_steps("inpaint", 20, 1.0) == 20
    # an upscale's shape is its tile's, its passes the tiles
    up = job_work(JobParameters(**{**base, "num_images": 1}, width=2048, height=1024, kind="upscale",
                                strength=0.3, upscale=2, tile=512))
    tiles = upscale_tiles(2048, 1024, 512)
    assert up.shape == Shape(512, 512, True, encodes=True) and up.passes == len(tiles) == 5 * 3 and up.steps == 6
    # the tiles cover the output, each inside it, overlapping their neighbours
    covered = set()
    for x, y in tiles:
        assert 0 <= x <= 2048 - 512 and 0 <= y <= 1024 - 512
        covered |= {(x + dx, y + dy) for dx in (0, 511) for dy in (0, 511)}
    assert {(0, 0), (2047, 1023), (2047, 0), (0, 1023)} <= covered


# Full-size SD 1.5 in balanced mode (bf16, bench/predictions.py --updown): a 512x512 job with guidance started at
# 2.50 GiB, its steps peaked at 3.08 and its whole VAE decode, on top of the UNet's kept buffers, at 3.69.
SD15_512 = Profile(Shape(512, 512, True), peak_bytes=int(3.69 * GB), base_bytes=int(2.50 * GB), samples=1,
                   steps_peak_bytes=int(3.08 * GB), decode_peak_bytes=int(3.69 * GB))


def test_a_decode_grows_with_the_pixels_whatever_the_guidance():
    # The whole rise scaled by the UNet's work halves without guidance; the decode's share does not: a 768x768
    # job without guidance decodes 2.25x the pixels of the measured 512x512 one
    big = predict(Shape(768, 768, False), [SD15_512], None)
    steps = (3.08 - 2.50) * GB * (96 * 96) / (64 * 64 * 2)
    decode = (3.69 - 3.08) * GB * (96 * 96) / (64 * 64)
    assert big.source == "scaled" and big.bytes == int(2.50 * GB) + int(steps + decode)
    whole = int(2.50 * GB + (3.69 - 2.50) * GB * (96 * 96) / (64 * 64 * 2))
    assert big.bytes > whole + int(0.5 * GB)  # what the rise scaled as one would have missed
    # a profile from before phases were measured scales as it did
    old = Profile(SD15_512.shape, SD15_512.peak_bytes, SD15_512.base_bytes, 1)
    assert predict(Shape(768, 768, False), [old], None).bytes == whole


def test_a_decode_in_tiles_costs_one_tile_at_any_size():
    tiled = predict(Shape(1024, 1024, True), [SD15_512], None, tiled_decode=True)
    whole = predict(Shape(1024, 1024, True), [SD15_512], None)
    assert whole.bytes - tiled.bytes == pytest.approx((3.69 - 3.08) * GB * 3, abs=4)  # three tiles more, whole
    # what the job peaked at above its steps and decode (the prompt's encoders, later images) stays as measured
    prompt = Profile(SD15_512.shape, int(3.9 * GB), SD15_512.base_bytes, 1, steps_peak_bytes=int(3.08 * GB),
                     decode_peak_bytes=int(3.69 * GB))
    assert predict(Shape(640, 640, True), [prompt], None).bytes - predict(Shape(640, 640, True), [SD15_512], None).bytes \
        == pytest.approx(0.21 * GB, abs=4)


def test_auto_chooses_the_fastest_lever_set_that_fits_and_says_why():
    fast = LeverSet("fast", [Profile(Shape(512, 512, True), 6 * GB, 5 * GB, 1)], 5 * GB)
    balanced = LeverSet("balanced", [Profile(Shape(512, 512, True), 4 * GB, 3 * GB, 1)], 3 * GB)
    low = LeverSet("low", [Profile(Shape(512, 512, True), 2 * GB, GB, 1)], GB, tiled_decode=True)
    shape = Shape(512, 512, True)
    assert choose_lever_set(shape, [fast, balanced, low], 8 * GB).key == "fast"
    chosen = choose_lever_set(shape, [fast, balanced, low], 5 * GB)
    assert chosen.key == "balanced" and chosen.prediction.bytes == 4 * GB
    assert chosen.reason == "auto: balanced, predicted 4.0 GiB (profile), fits the budget of 5.0 GiB; fast would need 6.0 GiB"
    none = choose_lever_set(shape, [fast, balanced, low], GB)
    assert none.key == "low" and none.prediction.bytes > GB and "is past the budget" in none.reason
    only = choose_lever_set(shape, [balanced], GB)  # a worker of one mode runs in it, fitting or not
    assert only.key == "balanced" and only.reason == "the worker's memory mode, balanced"


def test_what_a_lever_set_releases_stays_compiled_smallest_first_while_the_budget_has_room():
    held = {"unet": int(1.7 * GB), "text_encoder": 600 * MB, "vae_decoder": 120 * MB}
    assert choose_kept(int(2.5 * GB), 8 * GB, held) == (("vae_decoder", "text_encoder", "unet"), sum(held.values()))
    # room for the two small ones after the job's predicted peak, not for the UNet: it goes first
    assert choose_kept(int(2.5 * GB), int(3.5 * GB), held) == (("vae_decoder", "text_encoder"), 720 * MB)
    assert choose_kept(int(2.5 * GB), int(2.65 * GB), held) == (("vae_decoder",), 120 * MB)
    assert choose_kept(int(2.5 * GB), int(2.5 * GB), held) == ((), 0)  # no room: low mode as it is
    assert choose_kept(3 * GB, 2 * GB, held) == ((), 0)  # a job past the budget keeps nothing
