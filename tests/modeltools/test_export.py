"""`sdfleet model export`: a diffusers folder to OpenVINO IR one component per process, int8/int4 by NNCF, an IR
folder compressed in place of an export, a LoRA fused before conversion (from a hub ID in the Hugging Face
cache), and clear refusals that leave nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.settings import Settings
from worker.pipelines import GenaiPipeline, ImageRequest, OptimumPipeline

ROOT = Path(__file__).resolve().parents[2]


def sdfleet(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfleet", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def torch_pipeline(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline as a diffusers folder (what a user downloads), built here."""
    import torch

    from modeltools.tiny import build_sdxl

    tmp = tmp_path_factory.mktemp("torch-src")
    torch.manual_seed(0)
    build_sdxl(tmp).save_pretrained(tmp / "pipe")
    return tmp / "pipe"


@pytest.fixture(scope="module")
def exported(torch_pipeline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ir") / "tiny-fp16"
    r = sdfleet("model", "export", torch_pipeline, out, "--weight-format", "fp16", "--split", "always")
    assert r.returncode == 0, r.stderr
    return out


def _bin_bytes(folder: Path, component: str) -> int:
    return (folder / component / "openvino_model.bin").stat().st_size


def _fixed_feed(model, latent_hw: tuple[int, int], pixels: bool) -> dict:
    """A fixed input for each of `model`'s inputs: batch 1, 77 tokens, a latent of `latent_hw` (or its image,
    8x, for a VAE encoder's `pixels`), timestep 500."""
    rng = np.random.default_rng(0)
    feed = {}
    for port in model.inputs:
        dims = port.get_partial_shape()
        hw = [side * 8 for side in latent_hw] if pixels else list(latent_hw)
        shape = [d.get_length() if d.is_static else 1 if i == 0 else hw[i - 2] if len(dims) == 4 else 77
                 for i, d in enumerate(dims)]
        dtype = port.get_element_type().to_dtype()
        if port.get_any_name() == "timestep":
            feed[port.get_any_name()] = np.full(shape, 500, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feed[port.get_any_name()] = rng.integers(0, 1000, shape).astype(dtype)
        else:
            feed[port.get_any_name()] = rng.standard_normal(shape).astype(dtype)
    return feed


def test_every_component_computes_what_optimum_cli_exports(exported, torch_pipeline, tmp_path):
    """`sdfleet model export` traces the UNet and the VAE with small inputs (modeltools.steps.TRACE_LATENT_SIDE: the
    tiny model's own size is twice that), where optimum-cli traces them at the model's sample size, to convert at
    a fraction of the memory. The IR must not depend on it: on the same input, at a size neither traced (and not
    square), each component gives what optimum-cli's own fp16 export gives."""
    import openvino as ov

    from modeltools.steps import TRACE_LATENT_SIDE

    assert json.loads((torch_pipeline / "unet" / "config.json").read_text())["sample_size"] > TRACE_LATENT_SIDE
    cli = tmp_path / "cli"
    r = subprocess.run([str(Path(sys.executable).parent / "optimum-cli"), "export", "openvino", "--model",
                        str(torch_pipeline), "--task", "text-to-image", "--weight-format", "fp16", str(cli)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    core = ov.Core()
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        outs = []
        for folder in (exported, cli):
            model = core.read_model(folder / comp / "openvino_model.xml")
            feed = _fixed_feed(model, (24, 40), pixels=comp == "vae_encoder")
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            outs.append(compiled(feed)[compiled.outputs[0]])
        ours, theirs = outs
        assert ours.shape == theirs.shape, comp
        if comp == "unet":
            assert ours.shape == (1, 4, 24, 40)
        assert np.abs(ours - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), comp


def test_an_exported_folder_serves_both_backends_and_records_each_step(exported):
    stamp = json.loads((exported / "sdfleet_export.json").read_text())
    assert stamp["weight_format"] == "fp16"
    assert set(stamp["steps"]) == {"convert text_encoder+text_encoder_2", "convert unet", "convert vae_decoder",
                                   "convert vae_encoder"}
    assert all(s["peak_mb"] > 0 and s["seconds"] > 0 for s in stamp["steps"].values())
    assert (exported / "tokenizer" / "openvino_tokenizer.xml").is_file()  # openvino-genai needs it
    job = ImageRequest("a red car", None, 64, 64, 2, 7.5, 1)
    levers = Settings(memory_mode="low").levers
    assert OptimumPipeline(str(exported), levers=levers).generate(job).size == (64, 64)
    assert GenaiPipeline(str(exported), levers=Settings(memory_mode="fast").levers).generate(job).size == (64, 64)


def _unet_at_f32(ir: Path):
    """The IR folder's UNet compiled at f32 (as on a CPU without bf16)."""
    import openvino as ov

    return ov.Core().compile_model(ir / "unet" / "openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _unet_output(ir: Path, feed: dict) -> np.ndarray:
    compiled = _unet_at_f32(ir)
    return compiled(feed)[compiled.outputs[0]]


def _convolutions_run_at(ir: Path) -> set[str]:
    """The precisions the UNet's convolutions run at, compiled at f32."""
    compiled = _unet_at_f32(ir)
    return {info["runtimePrecision"].astype(str) for info in
            (op.get_rt_info() for op in compiled.get_runtime_model().get_ops())
            if info["layerType"].astype(str) == "Convolution"}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_an_ir_folder_compresses_to_int8_or_int4_and_still_generates(exported, tmp_path, fmt):
    out = tmp_path / f"tiny-{fmt}"
    r = sdfleet("model", "export", exported, out, "--weight-format", fmt)
    assert r.returncode == 0, r.stderr
    stamp = json.loads((out / "sdfleet_export.json").read_text())
    # a small IR is compressed in one child (a large one one component per child)
    assert stamp["weight_format"] == fmt and "compress text_encoder+text_encoder_2+unet+vae_decoder+vae_encoder" \
        in stamp["steps"]
    assert _bin_bytes(out, "unet") < 0.75 * _bin_bytes(exported, "unet")
    if fmt == "int8":  # weights-only: the CPU decompresses the convolutions' weights and runs them at f32
        assert _convolutions_run_at(out) == {"f32"}
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "model_index.json").is_file()
    image = OptimumPipeline(str(out)).generate(ImageRequest("a red car", None, 64, 64, 2, 1.0, 1))
    assert np.asarray(image).std() > 0


def test_int8_hybrid_runs_the_unets_convolutions_in_8_bits_calibrated_on_the_prompts_given(exported, tmp_path):
    """int8-hybrid: int8 weights, and the UNet's convolutions quantized fully (activations too, calibrated by
    running the pipeline on the prompts given), so that the CPU keeps their weights in 8 bits and runs them in
    int8 where an int8 IR's convolutions are decompressed to the inference precision."""
    import openvino as ov

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na lighthouse in a storm\n")
    out = tmp_path / "tiny-hybrid"
    r = sdfleet("model", "export", exported, out, "--weight-format", "int8-hybrid", "--calibration-prompts", prompts,
                "--calibration-samples", 6, "--calibration-size", 128)
    assert r.returncode == 0, r.stderr
    assert "calibrated on 6 UNet calls at 128px" in r.stdout
    stamp = json.loads((out / "sdfleet_export.json").read_text())
    assert stamp["weight_format"] == "int8-hybrid"
    calibration = stamp["calibration"]
    assert calibration["samples"] == 6 and calibration["width"] == calibration["height"] == 128
    assert 1 <= calibration["prompts"] <= 2 and calibration["runs"] * calibration["steps"] >= 6
    assert {"calibrate unet", "quantize unet convolutions"} <= set(stamp["steps"])
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".npz", ".json") and p.name != "model_index.json") \
        == ["sdfleet_export.json"]  # the calibration's files are gone

    core = ov.Core()
    assert _convolutions_run_at(out) <= {"u8", "i8"}  # every convolution in 8 bits (int8's: f32, tested above)

    # the same UNet, within quantization's error of the fp16 IR, on a fixed input it was not calibrated on (random
    # text embeddings; 6 samples of a random-weight model): 14 % mean error here, 1.5 % for int8, correlation 0.99
    feed = _fixed_feed(core.read_model(exported / "unet" / "openvino_model.xml"), (16, 24), pixels=False)
    reference, hybrid = _unet_output(exported, feed), _unet_output(out, feed)
    assert hybrid.shape == reference.shape == (1, 4, 16, 24)
    assert np.corrcoef(hybrid.ravel(), reference.ravel())[0, 1] >= 0.97
    assert np.abs(hybrid - reference).mean() <= 0.25 * np.abs(reference).mean()
    image = OptimumPipeline(str(out), levers=Settings(memory_mode="low", inference_precision="f32").levers).generate(
        ImageRequest("a red car", None, 64, 64, 2, 7.5, 1))
    assert image.size == (64, 64) and np.asarray(image).std() > 0


def test_export_refuses_clearly_and_leaves_nothing_behind(exported, torch_pipeline, tmp_path):
    r = sdfleet("model", "export", torch_pipeline, exported)
    assert r.returncode == 2 and "exists" in r.stderr
    r = sdfleet("model", "export", exported, tmp_path / "again", "--weight-format", "fp16")
    assert r.returncode == 2 and "already OpenVINO IR" in r.stderr
    (tmp_path / "empty").mkdir()
    r = sdfleet("model", "export", tmp_path / "empty", tmp_path / "out")
    assert r.returncode == 2 and "model_index.json" in r.stderr
    r = sdfleet("model", "export", torch_pipeline, tmp_path / "out", "--weight-format", "int2")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = sdfleet("model", "export", exported, tmp_path / "out", "--weight-format", "int8", "--calibration-samples", 8)
    assert r.returncode == 2 and "only int8-hybrid is calibrated" in r.stderr
    for option, value, reason in (("--calibration-samples", 0, "1 to 10000 UNet calls"),
                                  ("--calibration-size", 100, "multiple of 8"),
                                  ("--calibration-prompts", tmp_path / "empty", "cannot be read"),
                                  ("--calibration-prompts", tmp_path / "blank.txt", "no prompt in it")):
        if option == "--calibration-prompts" and value.name == "blank.txt":
            value.write_text("\n  \n")
        r = sdfleet("model", "export", exported, tmp_path / "out", "--weight-format", "int8-hybrid", option, value)
        assert r.returncode == 2 and reason in r.stderr, (option, r.stderr)
    (tmp_path / "blank.txt").unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.fixture(scope="module")
def lora_exports(torch_pipeline, tmp_path_factory) -> dict:
    """An LCM-LoRA-style export of the tiny SDXL pipeline, both taken from a Hugging Face cache by hub ID:
    a random LoRA fused at scale 1, and at scale 0, each with the LCM scheduler; and the base export's copy
    with that same scheduler (what --scheduler changes: the scheduler's config and model_index.json)."""
    from tests.conftest import hub_cache
    from modeltools.tiny import make_tiny_lora

    tmp = tmp_path_factory.mktemp("lora")
    home = tmp / "hf-home"
    hub_cache(home, "sdfleet-test/tiny-sdxl", torch_pipeline)
    hub_cache(home, "sdfleet-test/tiny-lora", make_tiny_lora(tmp / "lora-src", "sdxl"))
    out = {}
    for name, scale in (("lora", "1"), ("lora0", "0")):
        r = subprocess.run([sys.executable, "-m", "sdfleet", "model", "export", "sdfleet-test/tiny-sdxl", tmp / name,
                            "--lora", "sdfleet-test/tiny-lora", "--lora-scale", scale, "--scheduler", "lcm"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr
        assert "LoRA fused into unet" in r.stdout
        out[name] = tmp / name
    return out


def test_a_fused_lora_changes_the_images_and_at_scale_0_changes_nothing(exported, lora_exports, tmp_path):
    import shutil

    from worker.family import read_defaults

    lora, lora0 = lora_exports["lora"], lora_exports["lora0"]
    stamp = json.loads((lora / "sdfleet_export.json").read_text())
    assert stamp["lora"]["scale"] == 1.0 and stamp["lora"]["fused_into"] == ["unet"]
    assert stamp["scheduler"] == "LCMScheduler" and "/snapshots/" in stamp["source"]
    # an LCM-LoRA: the LCM scheduler on a UNet without a guidance embedding -> 4 steps, guidance 1
    d = read_defaults(lora)
    assert (d.family, d.steps, d.guidance_scale, d.guidance_doubles_batch) == ("lcm-lora", 4, 1.0, True)
    base = tmp_path / "base-lcm"  # the base export with the same scheduler
    shutil.copytree(exported, base)
    for rel in ("model_index.json", "scheduler/scheduler_config.json"):
        shutil.copyfile(lora0 / rel, base / rel)

    job = ImageRequest("a red car", None, 128, 128, 4, 1.0, 7)
    images = {name: np.asarray(OptimumPipeline(str(path)).generate(job)).astype(int)
              for name, path in (("base", base), ("lora", lora), ("lora0", lora0))}
    assert np.abs(images["lora"] - images["base"]).mean() > 1.0  # the LoRA's weights are in the UNet
    assert np.array_equal(images["lora0"], images["base"])  # at scale 0 the fused UNet is the base's
    assert _bin_bytes(lora, "unet") == _bin_bytes(exported, "unet")  # fused, not added: no extra weights


def test_lora_and_hub_sources_are_refused_clearly(exported, torch_pipeline, tmp_path):
    (tmp_path / "l.safetensors").write_bytes(b"")
    r = sdfleet("model", "export", exported, tmp_path / "x", "--weight-format", "int8", "--lora",
                tmp_path / "l.safetensors")
    assert r.returncode == 2 and "--lora and --scheduler need the diffusers pipeline" in r.stderr
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "two" / name).write_bytes(b"")
    r = sdfleet("model", "export", torch_pipeline, tmp_path / "y", "--lora", tmp_path / "two")
    assert r.returncode == 2 and "holds 2 .safetensors files" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sdfleet", "model", "export", "sdfleet-test/absent", tmp_path / "z"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "sdfleet-test/absent: not in the Hugging Face cache" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.safetensors", "two"]  # nothing half-written
