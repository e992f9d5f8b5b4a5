"""A model's family and defaults, read from its pipeline's own files: model_index.json (the pipeline class),
the UNet's config (`time_cond_proj_dim`: guidance as an embedding, LCM) and the scheduler's (LCMScheduler;
trailing timesteps: a turbo model). Nothing is loaded: the same answer for either backend, before the
pipeline is.

| family | how it is recognised | steps | guidance | guidance doubles the UNet batch |
|---|---|---|---|---|
| lcm | the UNet has `time_cond_proj_dim` (LCM_Dreamshaper) | 4 | 8.0 (an embedding) | no |
| lcm-lora | LCMScheduler without it (an LCM-LoRA fused into SD/SDXL) | 4 | 1.0 | above 1 |
| sd-turbo, sdxl-turbo | Euler or Euler ancestral on trailing timesteps | 1 | 0.0 | above 1 |
| sdxl | the SDXL pipeline | 25 | 5.0 | above 1 |
| sd | anything else | 20 | 7.5 | above 1 |

The size is the UNet's sample size times the VAE's scale factor (SD 1.5 and the turbo models: 512, SDXL:
1024), as diffusers' own default.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared.jobs import FALLBACK_DEFAULTS, MAX_SIDE, MIN_SIDE, ModelDefaults
from shared.settings import Settings

log = logging.getLogger(__name__)

# family: steps, guidance, recommended steps (the models' cards: LCM 2-8 steps, turbo 1-4)
_FAMILIES = {
    "lcm": (4, 8.0, (2, 8)),
    "lcm-lora": (4, 1.0, (2, 8)),
    "sd-turbo": (1, 0.0, (1, 4)),
    "sdxl-turbo": (1, 0.0, (1, 4)),
    "sdxl": (25, 5.0, (20, 50)),
    "sd": (20, 7.5, (15, 50)),
}
_TRAILING_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _first(folder: Path, *names: str) -> dict:
    """The first of these component configs that exists ({} if none: the folder may be partial)."""
    for name in names:
        path = folder / name
        if path.is_file():
            return _json(path)
    return {}


def family_of(pipeline: str, unet: dict, scheduler: dict) -> str:
    sdxl = "XL" in pipeline
    if unet.get("time_cond_proj_dim") or "LatentConsistency" in pipeline:
        return "lcm"
    if scheduler.get("_class_name") == "LCMScheduler":
        return "lcm-lora"
    if scheduler.get("_class_name") in _TRAILING_SCHEDULERS and scheduler.get("timestep_spacing") == "trailing":
        return "sdxl-turbo" if sdxl else "sd-turbo"
    return "sdxl" if sdxl else "sd"


def read_defaults(folder: str | Path) -> ModelDefaults:
    """The defaults of the pipeline in `folder` (an OpenVINO IR or diffusers folder). Raises OSError or
    ValueError when its model_index.json cannot be read."""
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    pipeline = str(index.get("_class_name", "unknown"))
    unet = _first(folder, "unet/config.json")
    scheduler = _first(folder, "scheduler/scheduler_config.json")
    vae = _first(folder, "vae_decoder/config.json", "vae/config.json")
    family = family_of(pipeline, unet, scheduler)
    steps, guidance, recommended = _FAMILIES[family]
    scale = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    side = unet.get("sample_size")
    side = side[0] if isinstance(side, (list, tuple)) else side
    size = int(side) * scale if isinstance(side, int) and side > 0 else (1024 if "XL" in pipeline else 512)
    size = min(MAX_SIDE, max(MIN_SIDE, size - size % 8))
    return ModelDefaults(
        family=family, pipeline=pipeline, scheduler=str(scheduler.get("_class_name", "unknown")), steps=steps,
        guidance_scale=guidance, width=size, height=size, recommended_steps=recommended,
        guidance_doubles_batch=family != "lcm", negative_prompt=family != "lcm")


def model_defaults(folder: str | Path | None, settings: Settings) -> ModelDefaults:
    """What the worker announces: the model's defaults (SD 1.5's when its files cannot be read, as for a
    custom backend's model), with the operator's SDFLEET_DEFAULT_* overrides on top."""
    defaults = FALLBACK_DEFAULTS
    if folder is not None:
        try:
            defaults = read_defaults(folder)
        except (OSError, ValueError) as exc:
            log.warning("the model's defaults could not be read from %s (%s): SD 1.5's are used", folder, exc)
    if all(lv.split_guidance for lv in settings.lever_sets) and settings.backend == "optimum":
        # guidance runs as two batch-1 passes here: it costs time, not the UNet's memory (an auto worker's fast
        # and balanced sets run it as one batch-2 pass: its jobs' shapes keep guidance apart)
        defaults = defaults.model_copy(update={"guidance_doubles_batch": False})
    overrides = {name: getattr(settings, f"default_{name}") for name in ("steps", "guidance_scale", "width", "height")
                 if getattr(settings, f"default_{name}") is not None}
    if not overrides:
        return defaults
    return defaults.model_copy(update={**overrides, "overridden": sorted(overrides)})


def worker_defaults(settings: Settings) -> ModelDefaults:
    """The defaults a worker announces for its SDFLEET_MODEL (a folder or a cached hub ID)."""
    from modeltools import hub

    folder = None
    if settings.model:
        try:
            folder = hub.resolve(settings.model)
        except hub.SourceError as exc:  # a custom backend's model may be anything
            log.warning("%s", exc)
    return model_defaults(folder, settings)
