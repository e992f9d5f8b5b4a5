"""`sdfleet model export-tiny-vae SRC OUT`: a diffusers AutoencoderTiny (TAESD, TAESDXL) to OpenVINO IR, in the
layout the worker reads for SDFLEET_TINY_VAE (worker/tiny_vae.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from modeltools.errors import ExportError
from modeltools.source import resolve
from modeltools.steps import maxrss_mb
from worker.tiny_vae import TinyVaeError, tiny_vae_config

TINY_VAE_FILE = "sdfleet_tiny_vae.json"


def convert_vae_decoder(vae, latent_channels: int):
    """A diffusers VAE's decoder (AutoencoderKL or AutoencoderTiny) as an OpenVINO model, traced as optimum-intel
    traces it (`vae.decode`): input `latent_sample` of any batch and size, output `sample`."""
    import openvino as ov
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample):
            return self.vae.decode(latent_sample, return_dict=False)[0]

    with torch.no_grad():
        model = ov.convert_model(Decoder(), example_input={"latent_sample": torch.randn(1, latent_channels, 8, 8)},
                                 input=[("latent_sample", ov.PartialShape([-1, latent_channels, -1, -1]))])
    model.outputs[0].get_tensor().set_names({"sample"})
    return model


def export_tiny_vae(src: str | Path, out: str | Path) -> dict:
    """Convert a diffusers AutoencoderTiny (TAESD for SD 1.x/2.x, TAESDXL for SDXL; a folder or a hub ID) to
    OpenVINO IR: its decoder, fp16 weights, dynamic batch and size, in `out/vae_decoder` with its config.json
    (input `latent_sample`, output `sample`, as optimum-intel's VAE decoder). One process: ~10 MB of weights."""
    import openvino as ov
    import torch
    from diffusers import AutoencoderTiny

    out = Path(out).absolute()
    if out.exists():
        raise ExportError(f"{out} exists: remove it or choose another folder")
    src = resolve(src, "source")
    try:
        tiny_vae_config(src, "not a diffusers model folder (config.json)")
    except TinyVaeError as exc:
        raise ExportError(str(exc)) from None
    t0 = time.perf_counter()
    vae = AutoencoderTiny.from_pretrained(src, torch_dtype=torch.float32).eval()
    model = convert_vae_decoder(vae, vae.config.latent_channels)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "vae_decoder").mkdir(parents=True)
        ov.save_model(model, staging / "vae_decoder" / "openvino_model.xml", compress_to_fp16=True)
        vae.save_config(staging / "vae_decoder")
        stamp = {"source": str(src), "weight_format": "fp16", "seconds": round(time.perf_counter() - t0, 1),
                 "peak_mb": maxrss_mb()}
        (staging / TINY_VAE_FILE).write_text(json.dumps(stamp, indent=2))
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stamp
