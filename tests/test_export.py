"""`sdfleet model export`: a diffusers folder to OpenVINO IR one component per process, int8/int4 by NNCF, an IR
folder compressed in place of an export, and clear refusals that leave nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.settings import Settings
from worker.pipelines import GenaiPipeline, ImageRequest, OptimumPipeline

ROOT = Path(__file__).resolve().parents[1]


def sdfleet(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfleet", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def torch_pipeline(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline as a diffusers folder (what a user downloads), built here."""
    import torch

    from worker.tiny import build_sdxl

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


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_an_ir_folder_compresses_to_int8_or_int4_and_still_generates(exported, tmp_path, fmt):
    out = tmp_path / f"tiny-{fmt}"
    r = sdfleet("model", "export", exported, out, "--weight-format", fmt)
    assert r.returncode == 0, r.stderr
    stamp = json.loads((out / "sdfleet_export.json").read_text())
    assert stamp["weight_format"] == fmt and "compress unet" in stamp["steps"]
    assert _bin_bytes(out, "unet") < 0.75 * _bin_bytes(exported, "unet")
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "model_index.json").is_file()
    image = OptimumPipeline(str(out)).generate(ImageRequest("a red car", None, 64, 64, 2, 1.0, 1))
    assert np.asarray(image).std() > 0


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
