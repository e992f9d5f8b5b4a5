"""Pipeline backends behind one interface (optimum-intel, openvino-genai, or a factory of your own), and
the per-process cache that loads a model once per host.

`Pipeline.generate(request, on_step)` makes exactly one image: the worker runs one image per pass
(seed, seed + 1, ...) so that N images cost the peak memory of one.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from PIL import Image

from shared.settings import Settings

log = logging.getLogger(__name__)

OnStep = Callable[[int, int], None]  # (step done, steps in all)


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int


class Pipeline(Protocol):
    backend: str
    precision: str  # the inference precision OpenVINO runs the UNet at (bf16 on AMX CPUs, else f32)

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image: ...


class OptimumPipeline:
    """optimum-intel's OVDiffusionPipeline family: the class (SD 1.x/2.x, SDXL, LCM, ...) is read from the
    folder's model_index.json, so one loader serves every architecture, from a local IR folder or a hub ID."""

    backend = "optimum"

    def __init__(self, model: str, device: str = "CPU", ov_config: dict | None = None):
        from optimum.intel import OVDiffusionPipeline

        t0 = time.perf_counter()
        self._pipe = OVDiffusionPipeline.from_pretrained(model, device=device, ov_config=ov_config or {}, compile=True)
        self._pipe.set_progress_bar_config(disable=True)
        self.precision = self._unet_precision()
        log.info("loaded %s (%s, %s) in %.1f s", model, type(self._pipe).__name__, self.precision,
                 time.perf_counter() - t0)

    def _unet_precision(self) -> str:
        try:
            return self._pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string()
        except Exception:  # not every OpenVINO device reports it
            return "unknown"

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image:
        import torch

        kwargs = {}
        if on_step is not None:
            def _callback(_pipe, i, _t, tensors):
                on_step(i + 1, request.steps)
                return tensors

            kwargs["callback_on_step_end"] = _callback
        out = self._pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="pil",
            **kwargs,
        )
        return out.images[0]


class GenaiPipeline:
    """openvino-genai's Text2ImagePipeline on the same exported folder (it needs the OpenVINO tokenizer that
    `sdfleet model make-tiny` and optimum-cli write). No torch in the process: the C++ generator is used."""

    backend = "genai"

    def __init__(self, model: str, device: str = "CPU", properties: dict | None = None):
        import openvino as ov
        import openvino_genai

        self._genai = openvino_genai
        t0 = time.perf_counter()
        self._pipe = openvino_genai.Text2ImagePipeline(model, device, **(properties or {}))
        hint = (properties or {}).get("INFERENCE_PRECISION_HINT")
        self.precision = str(hint) if hint else ov.Core().get_property(device, "INFERENCE_PRECISION_HINT").to_string()
        log.info("loaded %s with openvino-genai (%s) in %.1f s", model, self.precision, time.perf_counter() - t0)

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image:
        raised: list[BaseException] = []

        def callback(step: int, num_steps: int, _latent) -> bool:
            # an exception cannot cross the C++ loop: keep it, stop the loop (True), and raise it after
            try:
                if on_step is not None:
                    on_step(step + 1, num_steps)
            except BaseException as exc:
                raised.append(exc)
                return True
            return False

        kwargs = {"negative_prompt": request.negative_prompt} if request.negative_prompt else {}
        tensor = self._pipe.generate(
            request.prompt, width=request.width, height=request.height, num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale, num_images_per_prompt=1,
            generator=self._genai.CppStdGenerator(request.seed), callback=callback, **kwargs,
        )
        if raised:
            raise raised[0]
        return Image.fromarray(tensor.data[0])


def _load_factory(spec: str) -> Callable[[Settings], Pipeline]:
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"SDFLEET_BACKEND={spec!r}: expected 'optimum' or 'package.module:factory'")
    return getattr(importlib.import_module(module), attr)


def load_pipeline(settings: Settings) -> Pipeline:
    if not settings.model:
        raise ValueError("SDFLEET_MODEL is not set: a worker must be told which model it serves")
    # Compiled blobs are cached per model, so a restarted worker (or a replaced pool child) skips compiling.
    cache = str(settings.cache_dir / "ov-cache" / settings.served_model_name.replace("/", "--"))
    if settings.backend == "optimum":
        return OptimumPipeline(settings.model, settings.device, {"CACHE_DIR": cache})
    if settings.backend == "genai":
        return GenaiPipeline(settings.model, settings.device, {"CACHE_DIR": cache})
    return _load_factory(settings.backend)(settings)


_loaded: Pipeline | None = None


def get_pipeline(settings: Settings) -> Pipeline:
    """The host's pipeline, loaded once per worker process and reused job after job."""
    global _loaded
    if _loaded is None:
        _loaded = load_pipeline(settings)
        if settings.warmup:
            # OpenVINO materialises (repacks) weights at the first inference, not at compile: warm up once
            # so that the first job's measured peak is the job's, not the model's arrival.
            t0 = time.perf_counter()
            _loaded.generate(ImageRequest("warm up", None, 64, 64, 1, 1.0, 0))
            log.info("warm-up in %.1f s", time.perf_counter() - t0)
        # The model stack's objects live as long as the process: move them out of the collector's sight.
        # A full collection then costs ~0 ms instead of ~325 ms (torch + transformers + diffusers graphs),
        # which the worker would otherwise pay after every job (measured: bench/overhead.py).
        gc.collect()
        gc.freeze()
    return _loaded
