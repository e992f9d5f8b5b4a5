"""The steps of `sdfleet model export` (modeltools/export.py), each run in a fresh child process,
`python -m modeltools.steps STEP ...`, which returns everything it allocated to the OS when it exits, so that
the export's peak is its largest step's: convert (optimum-intel's own export code, some of a pipeline's
components to fp16 IR), compress (NNCF weight compression of IR components), and int8-hybrid's two steps for the
UNet, calibrate and quantize-convolutions. A step prints one JSON line on stdout: its peak RSS ("peak_mb") and
what it found beyond that."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
from pathlib import Path

from modeltools.lora import fuse_lora
from modeltools.source import is_16bit

# --scheduler: the name a user gives -> diffusers' class (from the pipeline's own scheduler config)
SCHEDULERS = {"lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler",
              "euler-ancestral": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
              "dpm++": "DPMSolverMultistepScheduler"}
# optimum-intel traces each image model once with a dummy input of the model's own sample size (SDXL's UNet: a
# 127x127 latent at batch 2, its VAE encoder a 1023x1023 image). The IR does not depend on that size (height and
# width are dynamic, and the trace records them as shape ops, as it must for the IR to run at any size), but the
# trace's memory does: SDXL's UNet trace held ~9 GiB of activations that the allocator kept through the save,
# 16 GiB in all. Traced at most this big (a latent's side; x8 for the VAE encoder's pixels), the same UNet
# converts at under half of that (bench/README.md, "Export"). An odd side stays odd: optimum-intel makes the
# UNet's odd on purpose, so that the trace takes the upsampling path that follows the skip connections' sizes.
TRACE_LATENT_SIDE = 32
# calibrate's images: the model's size up to this side (optimum-intel calibrates at 512 at most too)
CALIBRATION_MAX_SIDE = 512
# int8-noconv is int8-hybrid's first step: int8 weights but the convolutions', which quantize-convolutions takes
COMPRESSED_FORMATS = ("int8", "int8-noconv", "int4")


def maxrss_mb() -> int:
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

    half = is_16bit(src)
    wanted = {"text_encoder": with_tokenizers, "text_encoder_2": with_tokenizers, "unet": "unet" in parts,
              "vae": "vae_decoder" in parts or "vae_encoder" in parts}
    pipe = _load_pipeline(src, wanted, half)
    done: dict = {}
    if lora:
        done["lora_fused"] = fuse_lora(pipe, lora, lora_scale, [n for n, want in wanted.items() if want])
    if scheduler and with_tokenizers:
        _swap_scheduler(pipe, scheduler)
    models = _models_for_export(pipe, parts)
    _save_configs(pipe, models, out, with_tokenizers)
    _drop_unconverted(pipe, models)
    del pipe
    gc.collect()
    _export_models(models, out, half)
    return done


def _load_pipeline(src: Path, wanted: dict[str, bool], half: bool):
    """The pipeline at `src`, its components that are not `wanted` not even loaded: built on the meta device
    (optimum's export configs read every component's config, and the VAE is deep-copied for its two halves)."""
    import torch
    from diffusers import DiffusionPipeline

    index = json.loads((src / "model_index.json").read_text())
    empty = {name: _empty_module(src, name, index[name]) for name, want in wanted.items()
             if not want and (index.get(name) or [None])[0]}
    return DiffusionPipeline.from_pretrained(src, torch_dtype=torch.float16 if half else torch.float32,
                                             local_files_only=True, **empty)


def _swap_scheduler(pipe, scheduler: str) -> None:
    import inspect

    import diffusers

    cls = getattr(diffusers, SCHEDULERS[scheduler])
    takes = inspect.signature(cls.__init__).parameters  # the old scheduler's own settings are not carried over
    pipe.scheduler = cls.from_config({k: v for k, v in pipe.scheduler.config.items() if k in takes})


def _models_for_export(pipe, parts: list[str]) -> dict:
    """optimum-intel's (module, export config) of each of `parts`."""
    from optimum.exporters.openvino.convert import get_diffusion_models_for_export_ext

    _, models = get_diffusion_models_for_export_ext(pipe, exporter="openvino")
    return {k: v for k, v in models.items() if k in parts}


def _save_configs(pipe, models: dict, out: Path, with_tokenizers: bool) -> None:
    """The converted components' configs; with the tokenizers (the first child), also the scheduler, the
    tokenizers and the pipeline's own config."""
    from optimum.exporters.openvino.__main__ import maybe_convert_tokenizers

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


def _drop_unconverted(pipe, models: dict) -> None:
    """Detach from `pipe` the components not in `models`, so that they are freed before the conversion."""
    keep = [m for m, _ in models.values()]
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if not any(m is getattr(pipe, name, None) for m in keep):
            setattr(pipe, name, None)


def _export_models(models: dict, out: Path, half: bool) -> None:
    from optimum.exporters.openvino.convert import _set_runtime_options, export_models
    from optimum.intel import OVConfig

    for name, (_, export_config) in models.items():
        if name in ("unet", "vae_decoder", "vae_encoder"):
            _small_trace_inputs(export_config, TRACE_LATENT_SIDE * (8 if name == "vae_encoder" else 1))
    _set_runtime_options(models, "text-to-image", "diffusers", False)
    export_models(models_and_export_configs=models, output_dir=out,
                  output_names=[os.path.join(n, "openvino_model.xml") for n in models],
                  ov_config=OVConfig(dtype="fp16"), stateful=False, patch_16bit_model=half,
                  library_name="diffusers")


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
    `samples` of those calls (see _save_samples) to `out`. The images are not decoded."""
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
    _save_samples(collected, samples, out)
    return {"calibration": {"samples": samples, "runs": runs, "prompts": min(runs, len(prompts)),
                            "steps": defaults.steps, "guidance_scale": defaults.guidance_scale,
                            "width": side, "height": side}}


def _save_samples(collected: list[dict], samples: int, out: Path) -> None:
    """`samples` of the `collected` UNet calls' inputs, evenly spaced (so that every part of a run's schedule is
    in the sample, with few samples too), saved to `out` (.npz, keys "CALL/INPUT")."""
    import numpy as np

    picked = [collected[round(i * (len(collected) - 1) / max(1, samples - 1))] for i in range(samples)]
    arrays = {}
    for i, call in enumerate(picked):
        for name, value in call.items():
            arrays[f"{i}/{name}"] = np.asarray(getattr(value, "data", value))
    np.savez(out, **arrays)


def quantize_convolutions(xml: Path, data: Path, dest: Path) -> None:
    """Child process: int8-hybrid's last step, on a UNet whose other weights are int8 already (`int8-noconv`):
    NNCF post-training quantization of what is left with weights, the convolutions (weights and input
    activations, ranges from the calibration samples in `data`), as optimum-intel's hybrid quantization does
    it (the transformer preset, no SmoothQuant, the weighted MatMuls and embeddings left alone)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from optimum.intel.openvino.quantization import _collect_ops_with_weights

    from worker.meter import FilePageTrimmer

    dataset = _batch_1_samples(data)
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


def _batch_1_samples(data: Path) -> list[dict]:
    """The calibration samples calibrate saved in `data`, each call split into batch-1 samples (guidance's
    batch of 2 as two, the unconditional and the conditional pass, as low mode's split guidance runs them):
    NNCF's f32 statistics model then holds half the activations (SDXL at 512x512: 12.4 -> 9.6 GiB for
    quantize-convolutions), and a range is the mean over batch-1 samples of their min and max (over pairs
    before)."""
    import numpy as np

    with np.load(data) as npz:
        calls: dict[int, dict] = {}
        for key in npz.files:
            i, name = key.split("/", 1)
            calls.setdefault(int(i), {})[name] = npz[key]
    dataset = []
    for i in sorted(calls):
        batch = calls[i]["sample"].shape[0]
        for j in range(batch):
            dataset.append({name: value[j:j + 1] if value.ndim and value.shape[0] == batch else value
                            for name, value in calls[i].items()})
    return dataset


# The steps' command lines: what the parser below reads, built by the export (modeltools/export.py's _child)


def convert_args(src: Path, out: Path, parts: list[str], tokenizers: bool, lora: Path | None = None,
                 lora_scale: float = 1.0, scheduler: str | None = None) -> list[str]:
    return (["convert", str(src), str(out), ",".join(parts)] + (["--tokenizers"] if tokenizers else [])
            + (["--lora", str(lora), "--lora-scale", repr(lora_scale)] if lora is not None else [])
            + (["--scheduler", scheduler] if scheduler else []))


def compress_args(weight_format: str, pairs: list[tuple[Path, Path]]) -> list[str]:
    return ["compress", weight_format, *(str(path) for pair in pairs for path in pair)]


def calibrate_args(folder: Path, out: Path, prompts: Path, samples: int, side: int | None) -> list[str]:
    return ["calibrate", str(folder), str(out), str(prompts), str(samples), str(side or 0)]


def quantize_convolutions_args(xml: Path, data: Path, dest: Path) -> list[str]:
    return ["quantize-convolutions", str(xml), str(data), str(dest)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modeltools.steps",
                                description="One step of `sdfleet model export`, in a process of its own: it "
                                            "prints a JSON line, its peak RSS (peak_mb) and what it found.")
    steps = p.add_subparsers(dest="step", required=True, metavar="STEP")
    s = steps.add_parser("convert", help="PARTS (components, comma-separated) of the pipeline at SRC to fp16 IR")
    s.add_argument("src", type=Path, metavar="SRC")
    s.add_argument("out", type=Path, metavar="OUT")
    s.add_argument("parts", type=lambda text: text.split(","), metavar="PARTS")
    s.add_argument("--tokenizers", action="store_true",
                   help="the first child's: load the text encoders, save the tokenizers, scheduler and pipeline config")
    s.add_argument("--lora", metavar="FILE", help="a LoRA fused into the UNet and text encoders loaded here first")
    s.add_argument("--lora-scale", type=float, default=1.0, metavar="S")
    s.add_argument("--scheduler", choices=SCHEDULERS, help="with --tokenizers: the scheduler saved instead")
    s.set_defaults(run=lambda a: convert(a.src, a.out, a.parts, a.tokenizers, lora=a.lora,
                                         lora_scale=a.lora_scale, scheduler=a.scheduler))
    s = steps.add_parser("compress", help="NNCF weight compression, each XML to its DEST")
    s.add_argument("weight_format", choices=COMPRESSED_FORMATS, metavar="FORMAT", help=", ".join(COMPRESSED_FORMATS))
    s.add_argument("paths", type=Path, nargs="+", metavar="PATHS",
                   help="pairs: an IR's xml, then where its compressed copy goes")
    s.set_defaults(run=lambda a: compress(list(zip(a.paths[::2], a.paths[1::2])), a.weight_format))
    s = steps.add_parser("calibrate", help="int8-hybrid: the UNet's inputs on PROMPTS (a JSON list) to OUT (.npz)")
    s.add_argument("folder", type=Path, metavar="FOLDER")
    s.add_argument("out", type=Path, metavar="OUT")
    s.add_argument("prompts", type=Path, metavar="PROMPTS")
    s.add_argument("samples", type=int, metavar="SAMPLES")
    s.add_argument("side", type=int, metavar="SIDE", help="the images' side; 0: the model's, up to 512")
    s.set_defaults(run=lambda a: calibrate(a.folder, a.out, json.loads(a.prompts.read_text()), a.samples,
                                           a.side or None))
    s = steps.add_parser("quantize-convolutions", help="int8-hybrid: the UNet's convolutions quantized, to DEST")
    s.add_argument("xml", type=Path, metavar="XML")
    s.add_argument("data", type=Path, metavar="DATA", help="calibrate's OUT")
    s.add_argument("dest", type=Path, metavar="DEST")
    s.set_defaults(run=lambda a: quantize_convolutions(a.xml, a.data, a.dest))
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    p = parser()
    args = p.parse_args(argv)
    if args.step == "compress" and len(args.paths) % 2:
        p.error("compress: each XML needs its DEST")
    done = args.run(args) or {}
    print(json.dumps({"peak_mb": maxrss_mb(), **done}), flush=True)


if __name__ == "__main__":
    main()
