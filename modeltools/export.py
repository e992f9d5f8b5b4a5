"""`sdfleet model export SRC OUT --weight-format fp16|int8|int4|int8-hybrid`: a diffusers pipeline to OpenVINO IR, one
component per process, so that the export's peak is the largest component's, not the whole pipeline's
(a pipeline under 1 GiB of weights, where that saves nothing, is converted and compressed in one child:
`--split`).

optimum-cli exports every component in one process: on a 24 GB machine an SDXL export is killed once the
UNet has been written (the allocator keeps what the UNet's conversion used, and the VAE comes on top). Here
each component (text encoders and tokenizers, UNet, VAE decoder, VAE encoder) is converted by optimum-intel's
own export code in a fresh child process, which returns everything to the OS when it exits. int8 and int4
are NNCF weight compression of the fp16 IR, again one component per process. SRC may also be an OpenVINO IR
folder (from optimum-cli or an earlier export): then only the compression runs.

int8-hybrid is int8 with the UNet's convolutions quantized fully, activations too, as optimum-intel's hybrid
quantization does: OpenVINO's CPU plugin has no convolution with compressed weights, so an int8 IR's
convolution weights are decompressed to the inference precision (f32 on a CPU without bf16: ~1 GiB more than
their 8 bits for SDXL), where a quantized convolution keeps them in 8 bits and runs in int8. The activations'
ranges are calibrated on UNet inputs collected by running the pipeline (int8 weights) on prompts.

`--lora PATH [--lora-scale S]` fuses a LoRA (diffusers/PEFT or kohya safetensors: a file, a folder, or a hub
ID) into the UNet, and into the text encoders it has weights for, before they are converted, as fastsdcpu does
for LCM-LoRA; `--scheduler lcm` swaps the pipeline's scheduler (what an LCM-LoRA needs). SRC may be a hub ID
(ORG/NAME), resolved through the Hugging Face cache (modeltools/hub.py).

The result is written beside OUT and moved into place whole, with a stamp (sdfleet_export.json) recording the
weight format, the LoRA and scheduler, and what each step measured.

This module is the driver: it checks the arguments, plans the children and runs them. What each child runs is
in modeltools/steps.py, the LoRA in modeltools/lora.py, the source in modeltools/source.py;
`sdfleet model export-tiny-vae` is modeltools/tiny_vae.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modeltools import steps
from modeltools.errors import ExportError
from modeltools.lora import lora_file
from modeltools.source import is_ir_folder, pipeline_components, resolve, weight_bytes
from modeltools.steps import SCHEDULERS
from modeltools.tiny_vae import convert_vae_decoder, export_tiny_vae

# ExportError and the tiny VAE's export are imported from here (sdfleet/cli.py, bench/taesd.py)
__all__ = ["ExportError", "export", "export_tiny_vae", "convert_vae_decoder"]

WEIGHT_FORMATS = ("fp16", "int8", "int4", "int8-hybrid")
# int8-hybrid's calibration: the UNet inputs of this many UNet calls (optimum-intel's default), collected by
# running the pipeline at its own steps and guidance on these prompts (cycled, one seed per run), at the model's
# size up to steps.CALIBRATION_MAX_SIDE
CALIBRATION_SAMPLES = 200
CALIBRATION_PROMPTS = (
    "a lighthouse on a cliff in a storm, oil painting",
    "portrait photo of an old fisherman, weathered face, natural light, 85mm",
    "a bowl of ramen on a wooden table, steam, food photography",
    "an isometric pixel-art city at night with neon signs",
    "a red fox in fresh snow, wildlife photography, shallow depth of field",
    "watercolor painting of a village by a river in spring",
    "a futuristic sports car in a glass showroom, studio lighting",
    "a cozy reading nook with a cat asleep on a pile of books",
    "aerial view of terraced rice fields at sunrise",
    "a medieval knight in ornate armor, dramatic lighting, concept art",
    "macro photo of a dewdrop on a green leaf",
    "a minimalist logo of a mountain and the sun, flat vector",
    "an astronaut riding a horse on mars, digital art",
    "a crowded street market in marrakesh, vivid colors",
    "black and white photo of a jazz trio in a smoky club",
    "a fantasy castle floating above the clouds, matte painting",
    "a golden retriever puppy playing in autumn leaves",
    "the interior of a gothic cathedral, light through stained glass",
    "a plate of sushi, top view, high detail",
    "an abandoned factory overgrown with plants, moody",
    "a child's crayon drawing of a family in front of a house",
    "a snowy mountain lake reflecting the milky way",
    "an anime girl with blue hair in a school uniform, cherry blossoms",
    "a steampunk airship over victorian london",
)
STAMP_FILE = "sdfleet_export.json"
# A diffusers folder with at least this much weight is converted one component per child process ("auto");
# below it (a tiny test model, say) one child converts all, which saves three children's imports (~10 s each).
SPLIT_ABOVE_BYTES = 1 << 30
SPLITS = ("auto", "always", "never")
IR_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


@dataclass(frozen=True)
class _Request:
    """What `export` was asked for, checked, with the source and the LoRA resolved to local paths."""
    src: Path
    out: Path
    weight_format: str
    split: str
    lora: Path | None
    lora_scale: float
    scheduler: str | None
    prompts: list[str]  # prompts, samples and size: int8-hybrid's calibration
    samples: int
    size: int | None

    @property
    def hybrid(self) -> bool:
        return self.weight_format == "int8-hybrid"


def export(src: str | Path, out: str | Path, weight_format: str = "fp16", on_step=print, lora: str | Path | None = None,
           lora_scale: float = 1.0, scheduler: str | None = None, split: str = "auto",
           calibration_prompts: str | Path | None = None, calibration_samples: int | None = None,
           calibration_size: int | None = None) -> dict:
    """Export `src` (a diffusers folder, or an IR folder to compress; either may be a hub ID) to `out`, with a
    LoRA fused and the scheduler swapped if asked; returns the stamp. The calibration options are int8-hybrid's
    (see the module's docstring and CALIBRATION_SAMPLES)."""
    req = _checked(src, out, weight_format, lora, lora_scale, scheduler, split, calibration_prompts,
                   calibration_samples, calibration_size)
    staging = req.out.with_name(f".{req.out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    stamp = _new_stamp(req)
    t0 = time.perf_counter()
    try:
        ir = _stage_ir(req, staging) if is_ir_folder(req.src) else _convert(req, staging, stamp, on_step)
        if req.weight_format != "fp16":
            _compress(req, ir, staging, stamp, on_step)
        if req.hybrid:
            _quantize_unet(staging, req.prompts, req.samples, req.size, stamp, on_step)
        _move_into_place(staging, req.out, stamp, t0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stamp


def _checked(src, out, weight_format, lora, lora_scale, scheduler, split, calibration_prompts, calibration_samples,
             calibration_size) -> _Request:
    """`export`'s arguments checked (ExportError says what is wrong with the first that is), the source and the
    LoRA resolved (a hub ID to its snapshot in the Hugging Face cache)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ExportError(f"--weight-format must be one of {', '.join(WEIGHT_FORMATS)}, not {weight_format!r}")
    prompts = _checked_calibration(weight_format == "int8-hybrid", calibration_prompts, calibration_samples,
                                   calibration_size)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ExportError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {scheduler!r}")
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not math.isfinite(lora_scale):
        raise ExportError(f"--lora-scale must be a number, not {lora_scale}")
    out = Path(out).absolute()
    if out.exists():
        raise ExportError(f"{out} exists: remove it or choose another folder")
    src = resolve(src, "source")
    if not src.is_dir():
        raise ExportError(f"{src} is not a folder (a diffusers pipeline or an OpenVINO IR)")
    lora = lora_file(resolve(lora, "--lora")) if lora is not None else None
    return _Request(src, out, weight_format, split, lora, lora_scale, scheduler, prompts,
                    calibration_samples or CALIBRATION_SAMPLES, calibration_size)


def _checked_calibration(hybrid: bool, prompts: str | Path | None, samples: int | None,
                         size: int | None) -> list[str]:
    """The calibration options checked; the prompts to calibrate on (none but for int8-hybrid)."""
    calibrating = [name for name, value in (("--calibration-prompts", prompts), ("--calibration-samples", samples),
                                            ("--calibration-size", size)) if value is not None]
    if calibrating and not hybrid:
        raise ExportError(f"{', '.join(calibrating)}: only int8-hybrid is calibrated (--weight-format int8-hybrid)")
    if samples is not None and not 1 <= samples <= 10_000:
        raise ExportError(f"--calibration-samples must be 1 to 10000 UNet calls, not {samples}")
    if size is not None and not (64 <= size <= 2048 and size % 8 == 0):
        raise ExportError(f"--calibration-size must be a multiple of 8 from 64 to 2048 pixels, not {size}")
    return _calibration_prompts(prompts) if hybrid else []


def _calibration_prompts(path: str | Path | None) -> list[str]:
    """--calibration-prompts: a text file, one prompt per line (blank lines skipped); the built-in list without."""
    if path is None:
        return list(CALIBRATION_PROMPTS)
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--calibration-prompts {path}: cannot be read ({exc})") from None
    if not prompts:
        raise ExportError(f"--calibration-prompts {path}: no prompt in it (one per line)")
    return prompts


def _new_stamp(req: _Request) -> dict:
    """The stamp as far as the request says; the steps add what they measured."""
    stamp: dict = {"source": str(req.src), "weight_format": req.weight_format, "steps": {}}
    if req.lora is not None:
        stamp["lora"] = {"path": str(req.lora), "scale": req.lora_scale, "fused_into": []}
    if req.scheduler is not None:
        stamp["scheduler"] = SCHEDULERS[req.scheduler]
    return stamp


def _per_component(split: str, weight_bytes: int) -> bool:
    """Whether each component gets its own child process (see SPLIT_ABOVE_BYTES)."""
    return split == "always" or split == "auto" and weight_bytes >= SPLIT_ABOVE_BYTES


def _stage_ir(req: _Request, staging: Path) -> Path:
    """An IR source, which is only compressed: staged with everything but the weights the compression writes.
    Returns the IR to compress (the source itself)."""
    if req.weight_format == "fp16":
        raise ExportError(f"{req.src} is already OpenVINO IR: ask for int8 or int4 to compress it")
    if req.lora is not None or req.scheduler is not None:
        raise ExportError(f"{req.src} is already OpenVINO IR: --lora and --scheduler need the diffusers "
                          f"pipeline (the LoRA is fused into its weights before conversion)")
    staging.mkdir(parents=True)
    _copy_non_weights(req.src, staging)
    return req.src


def _copy_non_weights(src: Path, dest: Path) -> None:
    """Everything of an IR folder but the components' weights (configs, tokenizers, scheduler)."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.is_dir() or rel.parts[0] in IR_COMPONENTS and path.suffix in (".xml", ".bin"):
            continue
        if rel.name == STAMP_FILE:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)


def _conversion_groups(src: Path, split: str) -> list[list[str]]:
    """The components each child converts: one group per child."""
    parts = pipeline_components(src)
    if _per_component(split, weight_bytes(src)):
        return [[p for p in parts if p.startswith("text_encoder")], ["unet"], ["vae_decoder"], ["vae_encoder"]]
    return [parts]  # a small pipeline: one child (the split saves memory, and costs the imports per child)


def _convert(req: _Request, staging: Path, stamp: dict, on_step) -> Path:
    """A diffusers source converted to fp16 IR in `staging`, a child per group of components (the first also
    saves the tokenizers, the scheduler and the pipeline's config; the LoRA and the scheduler go to all but the
    VAE's). Returns the IR to compress (`staging`)."""
    groups = _conversion_groups(req.src, req.split)
    stamp["processes"] = len(groups)
    for i, group in enumerate(groups):
        lora, scheduler = (None, None) if group[0].startswith("vae") else (req.lora, req.scheduler)
        args = steps.convert_args(req.src, staging, group, i == 0, lora, req.lora_scale, scheduler)
        stamp["steps"][f"convert {'+'.join(group)}"] = figures = _child(args)
        if req.lora is not None:
            stamp["lora"]["fused_into"] += figures.pop("lora_fused", [])
        on_step(f"converted {'+'.join(group)}: {figures['seconds']} s, peak {figures['peak_mb']} MB")
    if req.lora is not None and not stamp["lora"]["fused_into"]:
        raise ExportError(f"--lora {req.lora}: it has no weights for this pipeline's UNet or text encoders "
                          f"(a LoRA made for another architecture?)")
    return staging


def _compression_plan(req: _Request, ir: Path) -> list[tuple[str, list[str]]]:
    """(weight format, components) for each compress child."""
    comps = [c for c in IR_COMPONENTS if (ir / c / "openvino_model.xml").is_file()]
    size = sum((ir / c / "openvino_model.bin").stat().st_size for c in comps
               if (ir / c / "openvino_model.bin").is_file())
    # one component per child (the peak is one component's), but one child for a small IR (as in _convert)
    groups = [[c] for c in comps] if _per_component(req.split, size) else [comps]
    if req.hybrid and "unet" not in comps:
        raise ExportError(f"{req.src}: int8-hybrid quantizes a UNet's convolutions, and this pipeline has none")
    # int8-hybrid: int8 weights but the UNet's convolutions, which are quantized after, once calibrated
    formats = {c: "int8-noconv" if req.hybrid and c == "unet" else "int8" if req.hybrid else req.weight_format
               for c in comps}
    return [(fmt, [c for c in group if formats[c] == fmt])
            for group in groups for fmt in dict.fromkeys(formats[c] for c in group)]


def _compress(req: _Request, ir: Path, staging: Path, stamp: dict, on_step) -> None:
    """The IR's weights compressed (NNCF) into `staging`, a child per group of components."""
    for fmt, part in _compression_plan(req, ir):
        pairs = [(ir / c / "openvino_model.xml", staging / c / f"openvino_model.{fmt}.xml") for c in part]
        stamp["steps"][f"compress {'+'.join(part)}"] = figures = _child(steps.compress_args(fmt, pairs))
        for comp, (_, dest) in zip(part, pairs):
            _replace(dest, staging / comp / "openvino_model.xml")
        on_step(f"compressed {'+'.join(part)} to {fmt}: {figures['seconds']} s, peak {figures['peak_mb']} MB")


def _quantize_unet(staging: Path, prompts: list[str], samples: int, side: int | None, stamp: dict, on_step) -> None:
    """int8-hybrid's last two steps, each in a child: collect calibration samples by running the staged
    pipeline (int8 weights everywhere, the UNet's convolutions still 16-bit), then quantize the convolutions."""
    data = staging / "calibration.npz"
    listed = staging / "calibration-prompts.json"
    listed.write_text(json.dumps(prompts))
    try:
        stamp["steps"]["calibrate unet"] = figures = _child(
            steps.calibrate_args(staging, data, listed, samples, side))
        stamp["calibration"] = figures.pop("calibration")
        on_step(f"collected {samples} UNet calls on {stamp['calibration']['prompts']} prompt(s): "
                f"{figures['seconds']} s, peak {figures['peak_mb']} MB")
        unet = staging / "unet" / "openvino_model.xml"
        dest = unet.with_name("openvino_model.int8-hybrid.xml")
        stamp["steps"]["quantize unet convolutions"] = figures = _child(
            steps.quantize_convolutions_args(unet, data, dest))
        _replace(dest, unet)
        on_step(f"quantized the UNet's convolutions: {figures['seconds']} s, peak {figures['peak_mb']} MB")
    finally:
        data.unlink(missing_ok=True)
        listed.unlink(missing_ok=True)


def _replace(new: Path, final: Path) -> None:
    """An IR written beside `final` (xml and bin) moved into its place."""
    for suffix in (".xml", ".bin"):
        os.replace(new.with_suffix(suffix), final.with_suffix(suffix))


def _move_into_place(staging: Path, out: Path, stamp: dict, t0: float) -> None:
    """The stamp completed and written, and the staged export moved to `out` whole."""
    stamp["seconds"] = round(time.perf_counter() - t0, 1)
    stamp["peak_mb"] = max((s["peak_mb"] for s in stamp["steps"].values()), default=0)
    (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
    os.replace(staging, out)


def _child(args: list[str]) -> dict:
    """Run one step (modeltools/steps.py; `args` from its *_args functions) in a fresh interpreter; returns what
    it reported, with its wall time."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "modeltools.steps", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"step {' '.join(args[:1] + args[3:])} failed (exit {proc.returncode}):\n{tail}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    return figures
