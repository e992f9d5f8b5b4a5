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
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from worker.tiny_vae import TinyVaeError, tiny_vae_config

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp16", "int8", "int4", "int8-hybrid")
# int8-hybrid's calibration: the UNet inputs of this many UNet calls (optimum-intel's default), collected by
# running the pipeline at its own steps and guidance on these prompts (cycled, one seed per run), at the model's
# size up to this side (optimum-intel calibrates at 512 at most too)
CALIBRATION_SAMPLES = 200
CALIBRATION_MAX_SIDE = 512
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
# --scheduler: the name a user gives -> diffusers' class (from the pipeline's own scheduler config)
SCHEDULERS = {"lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-ancestral": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
              "dpm++": "DPMSolverMultistepScheduler"}
STAMP_FILE = "sdfleet_export.json"
# A diffusers folder with at least this much weight is converted one component per child process ("auto");
# below it (a tiny test model, say) one child converts all, which saves three children's imports (~10 s each).
SPLIT_ABOVE_BYTES = 1 << 30
SPLITS = ("auto", "always", "never")


def _per_component(split: str, weight_bytes: int) -> bool:
    """Whether each component gets its own child process (see SPLIT_ABOVE_BYTES)."""
    return split == "always" or split == "auto" and weight_bytes >= SPLIT_ABOVE_BYTES
IR_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
# optimum-intel traces each image model once with a dummy input of the model's own sample size (SDXL's UNet: a
# 127x127 latent at batch 2, its VAE encoder a 1023x1023 image). The IR does not depend on that size (height and
# width are dynamic, and the trace records them as shape ops, as it must for the IR to run at any size), but the
# trace's memory does: SDXL's UNet trace held ~9 GiB of activations that the allocator kept through the save,
# 16 GiB in all. Traced at most this big (a latent's side; x8 for the VAE encoder's pixels), the same UNet
# converts at under half of that (bench/README.md, "Export"). An odd side stays odd: optimum-intel makes the
# UNet's odd on purpose, so that the trace takes the upsampling path that follows the skip connections' sizes.
TRACE_LATENT_SIDE = 32


class ExportError(RuntimeError):
    pass


def is_ir_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "unet" / "openvino_model.xml").is_file()


def _source_components(src: Path) -> list[str]:
    try:
        index = json.loads((src / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{src} is not a diffusers pipeline folder (model_index.json: {exc})") from None
    have = [k for k in ("text_encoder", "text_encoder_2") if (index.get(k) or [None])[0]]
    if not (index.get("unet") or [None])[0] or not (index.get("vae") or [None])[0]:
        raise ExportError(f"{src}: only UNet pipelines (SD 1.x/2.x, SDXL, LCM) are exported component by component")
    return have + ["unet", "vae_decoder", "vae_encoder"]


def _is_16bit(src: Path) -> bool:
    """Whether the UNet's safetensors hold fp16/bf16 weights (then it is loaded as such, not upcast to fp32)."""
    for f in sorted((src / "unet").glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        return bool(dtypes) and dtypes <= {"F16", "BF16"}
    return False


def _maxrss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _empty_module(src: Path, name: str, entry: list):
    """A pipeline component with its real configuration and no weights (parameters on the meta device)."""
    import importlib

    from accelerate import init_empty_weights

    library, cls_name = entry
    cls = getattr(importlib.import_module(library), cls_name)
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config(cls.load_config(src / name))
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(src / name))


def _fuse_lora(pipe, lora: str, scale: float, names: list[str]) -> list[str]:
    """Load the LoRA into those of `names` (UNet, text encoders) it has weights for, fuse it into their weights
    at `scale` and remove its layers, so they convert as plain modules. Returns the components it changed."""
    path = Path(lora)
    state_dict, alphas = pipe.lora_state_dict(str(path.parent), weight_name=path.name)
    if not state_dict or not all("lora" in k for k in state_dict):
        raise ExportError(f"{lora}: not a LoRA (its keys do not name LoRA layers)")
    fused = []
    for name in names:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if name == "unet":
            pipe.load_lora_into_unet(dict(state_dict), alphas, unet=module, adapter_name="sdfleet", _pipeline=pipe)
        else:
            pipe.load_lora_into_text_encoder(dict(state_dict), alphas, text_encoder=module, prefix=name,
                                             adapter_name="sdfleet", _pipeline=pipe)
        if getattr(module, "peft_config", None):
            fused.append(name)
    if fused:
        pipe.fuse_lora(components=fused, lora_scale=scale, adapter_names=["sdfleet"])
        pipe.unload_lora_weights()
    return fused


def _small_trace_inputs(export_config, side: int) -> None:
    """Make `export_config` (an optimum-intel export config) trace with image inputs of at most side x side
    (see TRACE_LATENT_SIDE)."""
    import torch

    generate = export_config.generate_dummy_inputs

    def small(*args, **kwargs):
        inputs = generate(*args, **kwargs)
        for name in ("sample", "latent_sample"):
            t = inputs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() == 4 and max(t.shape[-2:]) > side:
                h, w = (min(d, side - d % 2) for d in t.shape[-2:])
                inputs[name] = torch.randn(*t.shape[:2], h, w, dtype=t.dtype)
        return inputs

    export_config.generate_dummy_inputs = small


def convert(src: Path, out: Path, parts: list[str], with_tokenizers: bool, lora: str | None = None,
            lora_scale: float = 1.0, scheduler: str | None = None) -> dict:
    """Child process: convert `parts` of the pipeline at `src` to fp16 IR in `out` with optimum-intel; with a
    LoRA, fused first. Returns what it did beyond converting (the components the LoRA changed)."""
    import gc

    import torch
    from diffusers import DiffusionPipeline
    from optimum.exporters.openvino.__main__ import maybe_convert_tokenizers
    from optimum.exporters.openvino.convert import (
        _set_runtime_options,
        export_models,
        get_diffusion_models_for_export_ext,
    )
    from optimum.intel import OVConfig

    half = _is_16bit(src)
    index = json.loads((src / "model_index.json").read_text())
    # What this process does not convert is not even loaded: it is built on the meta device (optimum's
    # export configs read every component's config, and the VAE is deep-copied for its two halves).
    wanted = {"text_encoder": with_tokenizers, "text_encoder_2": with_tokenizers, "unet": "unet" in parts,
              "vae": "vae_decoder" in parts or "vae_encoder" in parts}
    empty = {name: _empty_module(src, name, index[name]) for name, want in wanted.items()
             if not want and (index.get(name) or [None])[0]}
    pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch.float16 if half else torch.float32,
                                             local_files_only=True, **empty)
    done: dict = {}
    if lora:
        done["lora_fused"] = _fuse_lora(pipe, lora, lora_scale, [n for n, want in wanted.items() if want])
    if scheduler and with_tokenizers:
        import inspect

        import diffusers

        cls = getattr(diffusers, SCHEDULERS[scheduler])
        takes = inspect.signature(cls.__init__).parameters  # the old scheduler's own settings are not carried over
        pipe.scheduler = cls.from_config({k: v for k, v in pipe.scheduler.config.items() if k in takes})
    _, models = get_diffusion_models_for_export_ext(pipe, exporter="openvino")
    models = {k: v for k, v in models.items() if k in parts}
    out.mkdir(parents=True, exist_ok=True)
    for name, (sub, _) in models.items():
        if hasattr(sub, "save_config"):
            sub.save_config(out / name)
        elif hasattr(getattr(sub, "config", None), "save_pretrained"):
            sub.config.save_pretrained(out / name)
    if with_tokenizers:
        pipe.scheduler.save_pretrained(out / "scheduler")
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).save_pretrained(out / name)
        pipe.save_config(out)
        maybe_convert_tokenizers("diffusers", out, pipe)  # openvino_tokenizer.xml, which openvino-genai needs
    keep = [m for m, _ in models.values()]
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if not any(m is getattr(pipe, name, None) for m in keep):
            setattr(pipe, name, None)
    del pipe, keep
    gc.collect()
    for name, (_, export_config) in models.items():
        if name in ("unet", "vae_decoder", "vae_encoder"):
            _small_trace_inputs(export_config, TRACE_LATENT_SIDE * (8 if name == "vae_encoder" else 1))
    _set_runtime_options(models, "text-to-image", "diffusers", False)
    export_models(models_and_export_configs=models, output_dir=out,
                  output_names=[os.path.join(n, "openvino_model.xml") for n in models],
                  ov_config=OVConfig(dtype="fp16"), stateful=False, patch_16bit_model=half,
                  library_name="diffusers")
    return done


def compress(pairs: list[tuple[Path, Path]], weight_format: str) -> None:
    """Child process: NNCF weight compression of IR components (xml -> dest, one after the other)."""
    for xml, dest in pairs:
        _compress_one(xml, dest, weight_format)


def _compress_one(xml: Path, dest: Path, weight_format: str) -> None:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(xml)
    if weight_format == "int8":
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif weight_format == "int8-noconv":  # int8-hybrid's first step: the convolutions are quantized after it
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
    else:
        # int4 for the linear layers (group-wise), int8 for the rest (embeddings, convolutions); a layer whose
        # width the group does not divide gets a smaller group, or stays int8
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

        model = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=64, ratio=1.0,
            advanced_parameters=AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16))
    dest.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, dest, compress_to_fp16=False)


def calibrate(folder: Path, out: Path, prompts: list[str], samples: int, side: int | None) -> dict:
    """Child process: run the pipeline in `folder` on `prompts` (cycled, a seed per run) at its own steps and
    guidance, whole runs until the UNet has been called at least `samples` times, and save the UNet's inputs of
    `samples` of those calls, evenly spaced (so that every part of a run's schedule is in the sample, with
    few samples too), to `out` (.npz, keys "CALL/INPUT"). The images are not decoded."""
    import numpy as np
    import torch
    from optimum.intel import OVDiffusionPipeline
    from optimum.intel.openvino.quantization import InferRequestWrapper

    from worker.family import read_defaults
    from worker.meter import FilePageTrimmer

    defaults = read_defaults(folder)
    side = side or min(defaults.width, CALIBRATION_MAX_SIDE)
    # compiled as used (the text encoders at the first prompt): the VAE, which a latent output does not need, never
    pipe = OVDiffusionPipeline.from_pretrained(folder, device="CPU", compile=False)
    pipe.set_progress_bar_config(disable=True)
    collected: list[dict] = []
    runs = 0
    # the IR's read pages go as OpenVINO repacks them (as a worker's FilePageTrimmer does)
    with FilePageTrimmer([str(folder)]):
        pipe.unet.compile()
        pipe.unet.request = InferRequestWrapper(pipe.unet.request, collected, apply_caching=False)
        while len(collected) < samples:
            pipe(prompt=prompts[runs % len(prompts)], height=side, width=side, num_inference_steps=defaults.steps,
                 guidance_scale=defaults.guidance_scale, output_type="latent",
                 generator=torch.Generator().manual_seed(runs))
            runs += 1
    picked = [collected[round(i * (len(collected) - 1) / max(1, samples - 1))] for i in range(samples)]
    arrays = {}
    for i, call in enumerate(picked):
        for name, value in call.items():
            arrays[f"{i}/{name}"] = np.asarray(getattr(value, "data", value))
    np.savez(out, **arrays)
    return {"calibration": {"samples": samples, "runs": runs, "prompts": min(runs, len(prompts)),
                            "steps": defaults.steps, "guidance_scale": defaults.guidance_scale,
                            "width": side, "height": side}}


def quantize_convolutions(xml: Path, data: Path, dest: Path) -> None:
    """Child process: int8-hybrid's last step, on a UNet whose other weights are int8 already (`int8-noconv`):
    NNCF post-training quantization of what is left with weights, the convolutions (weights and input
    activations, ranges from the calibration samples in `data`), as optimum-intel's hybrid quantization does
    it (the transformer preset, no SmoothQuant, the weighted MatMuls and embeddings left alone)."""
    import nncf
    import numpy as np
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from optimum.intel.openvino.quantization import _collect_ops_with_weights

    from worker.meter import FilePageTrimmer

    with np.load(data) as npz:
        calls: dict[int, dict] = {}
        for key in npz.files:
            i, name = key.split("/", 1)
            calls.setdefault(int(i), {})[name] = npz[key]
    # Each call split into batch-1 samples (guidance's batch of 2 as two, the unconditional and the conditional
    # pass, as low mode's split guidance runs them): NNCF's f32 statistics model then holds half the activations
    # (SDXL at 512x512: 12.4 -> 9.6 GiB for this step), and a range is the mean over batch-1 samples of their
    # min and max (over pairs before)
    dataset = []
    for i in sorted(calls):
        batch = calls[i]["sample"].shape[0]
        for j in range(batch):
            dataset.append({name: value[j:j + 1] if value.ndim and value.shape[0] == batch else value
                            for name, value in calls[i].items()})
    model = ov.Core().read_model(xml)
    # the IR's weights are mmapped: NNCF reads them (statistics, ranges) while OpenVINO and NNCF make their own
    # copies, and read pages would stay resident beside those (reclaimable, but counted in the peak)
    with FilePageTrimmer([str(xml.parent)]):
        model = nncf.quantize(
            model, nncf.Dataset(dataset), subset_size=len(dataset), model_type=nncf.ModelType.TRANSFORMER,
            preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=nncf.IgnoredScope(names=_collect_ops_with_weights(model)),
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, dest, compress_to_fp16=False)


def _child(step: list[str]) -> dict:
    """Run one step in a fresh interpreter; returns its wall time and peak RSS."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "modeltools.export", *step]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ExportError(f"step {' '.join(step[:1] + step[3:])} failed (exit {proc.returncode}):\n{tail}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    return figures


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


def _lora_file(path: Path) -> Path:
    """The LoRA's safetensors file: the path itself, or the one in a folder (diffusers' name first)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ExportError(f"--lora {path}: not a .safetensors file (pickled weights are not loaded)")
        return path
    found = sorted(path.glob("*.safetensors"))
    named = [f for f in found if f.name == "pytorch_lora_weights.safetensors"]
    if named or len(found) == 1:
        return (named or found)[0]
    raise ExportError(f"--lora {path}: " + (f"holds {len(found)} .safetensors files; name the one to fuse" if found
                                            else "holds no .safetensors file"))


def _source(spec: str | Path, what: str) -> Path:
    """A local folder or file, or a hub ID's snapshot folder in the Hugging Face cache."""
    from modeltools import hub

    if os.path.exists(spec):
        return Path(spec).absolute()
    try:
        return Path(hub.resolve(str(spec)))
    except hub.SourceError as exc:
        raise ExportError(f"{what} {exc}") from None


def _replace(new: Path, final: Path) -> None:
    """An IR written beside `final` (xml and bin) moved into its place."""
    for suffix in (".xml", ".bin"):
        os.replace(new.with_suffix(suffix), final.with_suffix(suffix))


def _quantize_unet(staging: Path, prompts: list[str], samples: int, side: int | None, stamp: dict, on_step) -> None:
    """int8-hybrid's last two steps, each in a child: collect calibration samples by running the staged
    pipeline (int8 weights everywhere, the UNet's convolutions still 16-bit), then quantize the convolutions."""
    data = staging / "calibration.npz"
    listed = staging / "calibration-prompts.json"
    listed.write_text(json.dumps(prompts))
    try:
        stamp["steps"]["calibrate unet"] = figures = _child(
            ["calibrate", str(staging), str(data), str(listed), str(samples), str(side or 0)])
        stamp["calibration"] = figures.pop("calibration")
        on_step(f"collected {samples} UNet calls on {stamp['calibration']['prompts']} prompt(s): "
                f"{figures['seconds']} s, peak {figures['peak_mb']} MB")
        unet = staging / "unet" / "openvino_model.xml"
        dest = unet.with_name("openvino_model.int8-hybrid.xml")
        stamp["steps"]["quantize unet convolutions"] = figures = _child(
            ["quantize-convolutions", str(unet), str(data), str(dest)])
        _replace(dest, unet)
        on_step(f"quantized the UNet's convolutions: {figures['seconds']} s, peak {figures['peak_mb']} MB")
    finally:
        data.unlink(missing_ok=True)
        listed.unlink(missing_ok=True)


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


def export(src: str | Path, out: str | Path, weight_format: str = "fp16", on_step=print, lora: str | Path | None = None,
           lora_scale: float = 1.0, scheduler: str | None = None, split: str = "auto",
           calibration_prompts: str | Path | None = None, calibration_samples: int | None = None,
           calibration_size: int | None = None) -> dict:
    """Export `src` (a diffusers folder, or an IR folder to compress; either may be a hub ID) to `out`, with a
    LoRA fused and the scheduler swapped if asked; returns the stamp. The calibration options are int8-hybrid's
    (see the module's docstring and CALIBRATION_SAMPLES)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ExportError(f"--weight-format must be one of {', '.join(WEIGHT_FORMATS)}, not {weight_format!r}")
    hybrid = weight_format == "int8-hybrid"
    calibrating = [name for name, value in (("--calibration-prompts", calibration_prompts),
                                            ("--calibration-samples", calibration_samples),
                                            ("--calibration-size", calibration_size)) if value is not None]
    if calibrating and not hybrid:
        raise ExportError(f"{', '.join(calibrating)}: only int8-hybrid is calibrated (--weight-format int8-hybrid)")
    if calibration_samples is not None and not 1 <= calibration_samples <= 10_000:
        raise ExportError(f"--calibration-samples must be 1 to 10000 UNet calls, not {calibration_samples}")
    if calibration_size is not None and not (64 <= calibration_size <= 2048 and calibration_size % 8 == 0):
        raise ExportError(f"--calibration-size must be a multiple of 8 from 64 to 2048 pixels, not {calibration_size}")
    prompts = _calibration_prompts(calibration_prompts) if hybrid else []
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ExportError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {scheduler!r}")
    if split not in SPLITS:
        raise ExportError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not math.isfinite(lora_scale):
        raise ExportError(f"--lora-scale must be a number, not {lora_scale}")
    out = Path(out).absolute()
    if out.exists():
        raise ExportError(f"{out} exists: remove it or choose another folder")
    src = _source(src, "source")
    if not src.is_dir():
        raise ExportError(f"{src} is not a folder (a diffusers pipeline or an OpenVINO IR)")
    lora = _lora_file(_source(lora, "--lora")) if lora is not None else None
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    stamp: dict = {"source": str(src), "weight_format": weight_format, "steps": {}}
    if lora is not None:
        stamp["lora"] = {"path": str(lora), "scale": lora_scale, "fused_into": []}
    if scheduler is not None:
        stamp["scheduler"] = SCHEDULERS[scheduler]
    t0 = time.perf_counter()
    try:
        if is_ir_folder(src):
            if weight_format == "fp16":
                raise ExportError(f"{src} is already OpenVINO IR: ask for int8 or int4 to compress it")
            if lora is not None or scheduler is not None:
                raise ExportError(f"{src} is already OpenVINO IR: --lora and --scheduler need the diffusers "
                                  f"pipeline (the LoRA is fused into its weights before conversion)")
            ir = src
            staging.mkdir(parents=True)
            _copy_non_weights(src, staging)
        else:
            parts = _source_components(src)
            weights = sum(f.stat().st_size for f in src.rglob("*") if f.suffix in (".safetensors", ".bin"))
            if _per_component(split, weights):
                groups = [[p for p in parts if p.startswith("text_encoder")], ["unet"], ["vae_decoder"],
                          ["vae_encoder"]]
            else:  # a small pipeline: one child (the split saves memory, and costs the imports per child)
                groups = [parts]
            stamp["processes"] = len(groups)
            extra = (["--lora", str(lora), "--lora-scale", repr(lora_scale)] if lora is not None else []) + \
                (["--scheduler", scheduler] if scheduler else [])
            for i, group in enumerate(groups):
                step = ["convert", str(src), str(staging), ",".join(group)] + (["--tokenizers"] if i == 0 else []) + \
                    (extra if not group[0].startswith("vae") else [])
                stamp["steps"][f"convert {'+'.join(group)}"] = figures = _child(step)
                if lora is not None:
                    stamp["lora"]["fused_into"] += figures.pop("lora_fused", [])
                on_step(f"converted {'+'.join(group)}: {figures['seconds']} s, peak {figures['peak_mb']} MB")
            if lora is not None and not stamp["lora"]["fused_into"]:
                raise ExportError(f"--lora {lora}: it has no weights for this pipeline's UNet or text encoders "
                                  f"(a LoRA made for another architecture?)")
            ir = staging
        if weight_format != "fp16":
            comps = [c for c in IR_COMPONENTS if (ir / c / "openvino_model.xml").is_file()]
            size = sum((ir / c / "openvino_model.bin").stat().st_size for c in comps
                       if (ir / c / "openvino_model.bin").is_file())
            # one component per child (the peak is one component's), but one child for a small IR (as above)
            groups = [[c] for c in comps] if _per_component(split, size) else [comps]
            if hybrid and "unet" not in comps:
                raise ExportError(f"{src}: int8-hybrid quantizes a UNet's convolutions, and this pipeline has none")
            # int8-hybrid: int8 weights but the UNet's convolutions, which are quantized below, once calibrated
            formats = {c: "int8-noconv" if hybrid and c == "unet" else "int8" if hybrid else weight_format
                       for c in comps}
            for group in groups:
                for fmt in dict.fromkeys(formats[c] for c in group):
                    part = [c for c in group if formats[c] == fmt]
                    pairs = [(ir / c / "openvino_model.xml", staging / c / f"openvino_model.{fmt}.xml") for c in part]
                    step = ["compress", fmt, *(str(path) for pair in pairs for path in pair)]
                    stamp["steps"][f"compress {'+'.join(part)}"] = figures = _child(step)
                    for comp, (_, dest) in zip(part, pairs):
                        _replace(dest, staging / comp / "openvino_model.xml")
                    on_step(f"compressed {'+'.join(part)} to {fmt}: {figures['seconds']} s, "
                            f"peak {figures['peak_mb']} MB")
            if hybrid:
                _quantize_unet(staging, prompts, calibration_samples or CALIBRATION_SAMPLES, calibration_size,
                               stamp, on_step)
        stamp["seconds"] = round(time.perf_counter() - t0, 1)
        stamp["peak_mb"] = max((s["peak_mb"] for s in stamp["steps"].values()), default=0)
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2))
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stamp


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
    src = _source(src, "source")
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
                 "peak_mb": _maxrss_mb()}
        (staging / TINY_VAE_FILE).write_text(json.dumps(stamp, indent=2))
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return stamp


def _main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING)
    cmd, args = argv[0], argv[1:]
    done: dict = {}
    if cmd == "convert":
        def opt(name: str) -> str | None:
            return args[args.index(name) + 1] if name in args else None

        done = convert(Path(args[0]), Path(args[1]), args[2].split(","), "--tokenizers" in args, lora=opt("--lora"),
                       lora_scale=float(opt("--lora-scale") or 1.0), scheduler=opt("--scheduler"))
    elif cmd == "compress":
        compress([(Path(x), Path(d)) for x, d in zip(args[1::2], args[2::2])], args[0])
    elif cmd == "calibrate":
        prompts = json.loads(Path(args[2]).read_text())
        done = calibrate(Path(args[0]), Path(args[1]), prompts, int(args[3]), int(args[4]) or None)
    elif cmd == "quantize-convolutions":
        quantize_convolutions(Path(args[0]), Path(args[1]), Path(args[2]))
    else:
        raise SystemExit(f"unknown step {cmd!r}")
    print(json.dumps({"peak_mb": _maxrss_mb(), **done}), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
