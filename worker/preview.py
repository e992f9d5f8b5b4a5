"""Live previews: a small picture of the latents a job is denoising, by a linear projection of the latent
channels to RGB with the coefficients known for the model's latent space (SD 1.x/2.x's VAE; SDXL's), at the
latents' own size (an eighth of the image's side), encoded as a small JPEG.

No decoder runs: a projection of SD 1.5's 64x64 latents takes well under a millisecond, where the tiny VAE
(TAESD) takes 0.34 s at 512x512 (bench/README.md, "Tiny VAE"), 7-15% of an SD 1.5 step on a 2-core host, and
would hold its activations beside the UNet's in the denoising phase (the phase memory profiles measure). A
latent layout with no known coefficients (16 channels: SD 3, Flux) has no preview.

The denoising thread pays only for a copy of the latents when a preview is due (the pipeline's `preview()`,
from inside on_step, returns a function that renders it); the worker's monitor thread renders, encodes and
writes it (worker/tasks.py)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

MEDIA_TYPE = "image/jpeg"
JPEG_QUALITY = 85


@dataclass(frozen=True)
class Projection:
    """RGB = latents' channels x `factors` + `bias`, in [-1, 1]; applied to the latents the denoising loop
    holds (the VAE's latents times its scaling factor)."""

    name: str
    factors: tuple[tuple[float, float, float], ...]  # one row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def render(self, latents) -> Image.Image | None:
        """An RGB image of latents shaped (1, C, h, w) or (C, h, w); None for another number of channels."""
        a = np.asarray(latents, dtype=np.float32)
        if a.ndim == 4 and a.shape[0] >= 1:
            a = a[0]
        if a.ndim != 3 or a.shape[0] != len(self.factors) or min(a.shape[1:]) < 1:
            return None
        rgb = np.einsum("chw,ck->hwk", a, np.asarray(self.factors, dtype=np.float32))
        rgb += np.asarray(self.bias, dtype=np.float32)
        pixels = np.clip((rgb + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "RGB")


# The published latent-to-RGB coefficients (as ComfyUI's latent_formats has them, fitted on each VAE's latents)
SD = Projection("sd", ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
                       (-0.2120, -0.2616, -0.7177)))
SDXL = Projection("sdxl", ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                           (-0.3165, -0.2492, -0.2188)), (0.1084, -0.0175, -0.0011))


def projection_for(pipeline_class: str) -> Projection | None:
    """The projection for a diffusers (or optimum-intel OV...) pipeline class: the SD 1.x/2.x family and LCMs
    on it share SD's VAE; the XL pipelines have SDXL's; SD 3, Flux and anything else: none."""
    name = pipeline_class.removeprefix("OV")
    if name.startswith("StableDiffusion3") or not name.startswith(("StableDiffusion", "LatentConsistency")):
        return None
    return SDXL if "XL" in name else SD


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
