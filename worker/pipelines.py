"""Pipeline backends behind one interface (optimum-intel, openvino-genai, or a factory of your own), and
the per-process cache that loads a model once per host.

`Pipeline.generate(request, on_step)` makes exactly one image: the worker runs one image per pass
(seed, seed + 1, ...) so that N images cost the peak memory of one. A pipeline that can resume
(`resumable`) gives, from inside `on_step`, a snapshot of its state after that step (`snapshot()`) and goes on
from one given back in `request.resume`: the result is bitwise the uninterrupted one on the same runtime
(`runtime`). From inside `on_step` too, `preview()` keeps the latents of that step for a live preview, rendered
later in another thread (worker/preview.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import gc
import importlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from modeltools import hub
from shared.memory import VAE_TILE  # latent pixels a side: 512 image pixels
from shared.settings import Levers, Settings
from worker.meter import (
    FilePageTrimmer, drop_file_pages, high_water_mark_bytes, release_free_memory, reset_high_water_mark, rss_bytes,
)
from worker.preview import projection_for
from worker.tiny_vae import tiny_vae_folder

log = logging.getLogger(__name__)

OnStep = Callable[[int, int], None]  # (step done, steps in all)

CHECKPOINT_FORMAT = 1  # the layout of a snapshot; a checkpoint of another format is not resumed from


class CheckpointError(Exception):
    """A checkpoint this pipeline cannot go on from (corrupt, another format, scheduler or shape)."""


@contextlib.contextmanager
def cache_lock(config: dict):
    """Hold the compiled-model cache folder while compiling into it. Two workers of one model on one host
    share the folder, and OpenVINO writing the same blob from both at once fails ("filesystem error: cannot
    set permissions" on the blob): the second waits, then imports what the first wrote."""
    folder = config.get("CACHE_DIR")
    if not folder:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".sdfleet-compile.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    resume: bytes | None = None  # a snapshot this pipeline took of this request: go on from it
    decoder: str | None = None  # "tiny" (the worker's tiny VAE, text-to-image only), "full", None: its default
    # image-to-image: the init image (RGB, already at width x height) and the strength; inpainting adds the
    # mask (L, the same size; white is repainted)
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None

    @property
    def task(self) -> str:
        return "txt2img" if self.image is None else "inpaint" if self.mask is not None else "img2img"


def keep_unmasked(out: Image.Image, image: Image.Image, mask: Image.Image) -> Image.Image:
    """Inpainting's result with the pixels outside the mask exactly the input's: the VAE's round trip changes
    every pixel a little, and the mask is what the client asked to change (binarised as the pipeline does)."""
    binary = mask.point(lambda v: 255 if v >= 128 else 0)
    return Image.composite(out, image, binary)


@runtime_checkable
class Pipeline(Protocol):
    """Everything the worker uses of a pipeline. A backend of your own (SDFLEET_BACKEND=package.module:factory)
    subclasses PipelineBase, which has a default for all of it but `generate`."""

    backend: str
    tasks: tuple[str, ...]  # what it makes: txt2img, and img2img, inpaint, upscale where it takes an image
    precision: str  # the precision the compiled UNet runs at, read back from it (genai: the hint or the default)
    levers: Levers  # how it runs: what it releases between phases and jobs
    warm_peak: int  # the warm-up's peak RSS (0 before it): what a pipeline that releases components reloads

    @property
    def memory_mode(self) -> str: ...  # Levers.key: what memory profiles are kept apart by

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image: ...

    def model_files(self) -> list[str]: ...  # where its weights are mapped from (dropped with drop_file_pages)

    def snapshot(self) -> bytes | None: ...  # from inside on_step: the state to resume from (None: cannot)

    def preview(self) -> Callable[[], Image.Image | None] | None: ...  # from inside on_step: renders its latents

    def warm_up(self) -> None: ...

    def drop_weight_pages(self, measure: bool = False) -> int: ...

    def release_buffers(self) -> None: ...  # between jobs: the runtime's activation buffers go back

    def releasable(self, levers: Levers, task: str, decoder: str | None) -> dict[str, int]: ...  # could stay

    def keep(self, names: tuple[str, ...], buffers: tuple[str, ...] = (), kind: tuple | None = None) -> None: ...
    # ^ these released components stay compiled (others go now); of them, `buffers` keep their runtime buffers too

    def buffer_sizes(self, names: tuple[str, ...], kind: tuple) -> dict[str, int]: ...  # measured in that kind of job

    def held_buffers(self) -> int: ...  # what the kept components' buffers held past their phase hold now

    def kept_compiled(self) -> dict[str, int]: ...  # the kept components compiled now, and what each holds


# A pipeline that does not say how it runs keeps everything resident.
RESIDENT = Levers(mode="fast", release_encoders=False, release_all=False, drop_file_pages=False, vae_tiles=False,
                  split_guidance=False, static_shape=False, precision="auto", compile_threads=None, mmap=True)


class PipelineBase:
    """The defaults of the Pipeline contract: everything resident, no weight files of its own to drop."""

    backend = "custom"
    tasks: tuple[str, ...] = ("txt2img",)
    precision = "unknown"
    levers: Levers = RESIDENT
    warm_peak = 0
    resumable = False  # gives snapshots (during on_step) and takes them back in ImageRequest.resume

    @property
    def memory_mode(self) -> str:
        return self.levers.key

    @property
    def runtime(self) -> str:
        """What a snapshot's numbers depend on: another runtime starts a checkpointed job again. The levers that
        change the UNet's batch or compiled shapes count; those of memory only (release, file pages, the
        decoder's tiles or a tiny VAE, after the last step) do not."""
        numerics = [k for k in ("split_guidance", "static_shape") if getattr(self.levers, k)]
        return "/".join([self.backend, self.precision, "+".join(numerics) or "plain", f"ckpt{CHECKPOINT_FORMAT}"])

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image:
        raise NotImplementedError

    def model_files(self) -> list[str]:
        return []

    def snapshot(self) -> bytes | None:
        """Called from inside `on_step`: the state after that step, to be given back as ImageRequest.resume
        (None: this pipeline cannot resume within an image, or that was the last step)."""
        return None

    def preview(self) -> Callable[[], Image.Image | None] | None:
        """Called from inside `on_step` when a live preview is due: a function, called later from another thread
        (the worker's monitor), that renders a small image of the latents after that step (None: no preview).
        What it keeps must not change as the loop goes on (a copy of the latents)."""
        return None

    def warm_up(self) -> None:
        """OpenVINO materialises (repacks) weights at the first inference, not at compile: one tiny generation
        at load, so that the first job's measured peak is the job's, not the model's arrival. Its peak is kept:
        a pipeline that releases components between jobs loads them again in each job."""
        reset_high_water_mark()
        t0 = time.perf_counter()
        self.generate(ImageRequest("warm up", None, 64, 64, 1, 1.0, 0))
        self.warm_peak = high_water_mark_bytes() or 0
        if isinstance(getattr(self, "warm_peaks", None), dict):
            self.warm_peaks[self.levers.key] = self.warm_peak
        log.info("warm-up in %.1f s, peak %d MB", time.perf_counter() - t0, self.warm_peak >> 20)

    def release_buffers(self) -> None:
        """Between jobs: give back what the runtime keeps for the shapes it ran (nothing here)."""

    decoders: tuple[str, ...] = ("full",)  # what decodes a job's latents: the model's own VAE (and a tiny one)

    def decoder_for(self, task: str, asked: str | None) -> str:
        """The decoder a job of this task runs with; ValueError for one this pipeline cannot run."""
        if asked not in (None, "full"):
            raise ValueError(f"decoder {asked!r}: this worker has no tiny VAE (SDFLEET_TINY_VAE)")
        return "full"

    def releasable(self, levers: Levers, task: str, decoder: str | None) -> dict[str, int]:
        """The components a lever set compiles for their phase and releases after it that a job of this task
        (txt2img, img2img, inpaint) and decoder loads again, with what each holds compiled (measured): what
        could stay compiled instead (none here)."""
        return {}

    def keep(self, names: tuple[str, ...], buffers: tuple[str, ...] = (), kind: tuple | None = None) -> None:
        """Keep these releasable components compiled through the next jobs (nothing to keep here)."""

    def buffer_sizes(self, names: tuple[str, ...], kind: tuple) -> dict[str, int]:
        """What the runtime's buffers of these kept components held in a job of this kind (the worker's: lever set, decoder, shape), where measured."""
        return {}

    def held_buffers(self) -> int:
        """What the kept components' buffers, held past their phase, hold now."""
        return 0

    def kept_compiled(self) -> dict[str, int]:
        """The kept components compiled now, with what each holds."""
        return {}

    def drop_weight_pages(self, measure: bool = False) -> int:
        """Between jobs: drop the weights' file pages if the levers say so. With `measure`, returns the bytes
        dropped, read from /proc/self/smaps (~30 ms with the model stack's ~1,600 mappings); without, the
        mappings are read from /proc/self/maps (~3 ms) and 0 is returned: what a worker does after every job."""
        if not self.levers.drop_file_pages:
            return 0
        return drop_file_pages(self.model_files(), check_rss=measure)


PHASES = {"text_encoder": "encode", "text_encoder_2": "encode", "text_encoder_3": "encode",
          "vae_encoder": "encode_image", "unet": "denoise", "transformer": "denoise", "vae_decoder": "decode",
          "tiny_vae_decoder": "decode"}


class OptimumPipeline(PipelineBase):
    """optimum-intel's OVDiffusionPipeline family: the class (SD 1.x/2.x, SDXL, LCM, ...) is read from the
    folder's model_index.json, so one loader serves every architecture, from a local IR folder or a hub ID.

    Components compile when a phase first needs them (encode: text encoders; denoise: UNet; decode: VAE
    decoder). With `levers.release_all` (or `release_encoders`) a phase's components are released when the
    next phase starts, and compiled again next time from the path, so that OpenVINO imports the cached blob
    and never reads the IR's weights again; `static_shape` compiles the UNet and text encoders for each
    job's exact shape, with the UNet's batch following guidance (1 without, 2 with)."""

    backend = "optimum"

    def __init__(self, model: str, device: str = "CPU", ov_config: dict | None = None,
                 levers: Levers | None = None):
        from optimum.intel import OVDiffusionPipeline
        from optimum.intel.openvino import modeling_base, modeling_diffusion

        self.levers = levers or Settings().levers
        # optimum-intel reads models with one Core and compiles with another; ENABLE_MMAP is read_model's
        # setting, so it goes on the Core (in a pipeline's ov_config it has no effect)
        for core in {id(c): c for c in (modeling_base.core, modeling_diffusion.core)}.values():
            core.set_property({"ENABLE_MMAP": self.levers.mmap})
        self._core = core = modeling_diffusion.core
        config = dict(ov_config or {})
        if self.levers.precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = self.levers.precision
        if self.levers.compile_threads:
            config["COMPILATION_NUM_THREADS"] = self.levers.compile_threads
        self._config, self._device = config, device
        t0 = time.perf_counter()
        self._pipe = OVDiffusionPipeline.from_pretrained(model, device=device, ov_config=config, compile=False)
        self._pipe.set_progress_bar_config(disable=True)
        self._parts = {name: part for name in PHASES if (part := getattr(self._pipe, name, None)) is not None}
        # the decoders a job can ask for: the model's own VAE, and with a tiny VAE that one too (the default)
        self._decoders = {"full": (self._pipe.vae_decoder, self._pipe.vae)}
        if self.levers.tiny_vae:
            self._use_tiny_vae(self.levers.tiny_vae)
        self.decoders = tuple(self._decoders)
        self._task_classes = self._image_tasks()
        self._task_pipes: dict[str, object] = {}
        self.tasks = ("txt2img", *self._task_classes, *(("upscale",) if "img2img" in self._task_classes else ()))
        self.on_phase: Callable[[str], None] | None = None  # told when a phase starts (the job's memory timeline)
        self._phase: str | None = None
        self._shape: tuple | None = None
        self.warm_peaks: dict[str, int] = {}  # each lever set's warm-up peak, by its key
        # What each component holds compiled (its weights, repacked by the first inference), measured as it is
        # first compiled where file pages are dropped; and the released components kept compiled (keep)
        self.held_bytes: dict[str, int] = {}
        self._release_measured: set[str] = set()
        self.kept: frozenset[str] = frozenset()
        # Of the kept components, those whose runtime buffers stay too as their phase ends (keep); what those
        # buffers held, measured as a kept component gave them back at the end of its phase in a job of a kind
        # ({(name, kind): bytes}); the kept components holding theirs now, past their phase ({name: bytes})
        self.kept_buffers: frozenset[str] = frozenset()
        self._buffer_bytes: dict[tuple[str, tuple], int] = {}
        self._holding: dict[str, int] = {}
        self._job_kind: tuple | None = None
        for name, part in self._parts.items():
            part.forward = self._phased(name, part.forward)
        # the levers of the decode and of guidance are read at each call: an auto worker switches between jobs
        for decoder, _ in self._decoders.values():
            decoder.forward = functools.partial(self._decode, decoder.forward)
        self.decode_bytes_per_pixel: float | None = None  # a whole decode's cost per latent pixel, once measured
        if "unet" in self._parts:
            self._parts["unet"].forward = functools.partial(self._guided, self._parts["unet"].forward)
        # Resuming: the loop's iterations before the checkpoint's step run without the UNet (see generate)
        self._skipping = False
        self._snapshot: Callable[[], bytes] | None = None  # set during on_step
        self._latents = None  # the step's latents, during on_step (for preview)
        self._projection = projection_for(type(self._pipe).__name__)
        self.resumable = "unet" in self._parts
        if self.resumable:
            self._parts["unet"].forward = self._skippable(self._parts["unet"].forward)
        self.precision = self.levers.precision if self.levers.precision != "auto" else \
            core.get_property(device, "INFERENCE_PRECISION_HINT").to_string()
        log.info("loaded %s (%s, %s, memory mode %s) in %.1f s", model, type(self._pipe).__name__, self.precision,
                 self.levers.describe(), time.perf_counter() - t0)

    def _image_tasks(self) -> dict[str, type]:
        """optimum-intel's image-to-image and inpainting classes of this pipeline's family, which run on the same
        components (the VAE encoder exported with the model encodes the init image). They decode with the
        model's own VAE, also where a tiny one is the default: its config (scaling factor 1) would scale the
        encoder's latents wrongly."""
        from optimum.intel.openvino import modeling_diffusion as md

        if "vae_encoder" not in self._parts:
            return {}
        out = {}
        for task, mapping in (("img2img", md.OV_IMAGE2IMAGE_PIPELINES_MAPPING), ("inpaint", md.OV_INPAINT_PIPELINES_MAPPING)):
            try:
                out[task] = md._get_task_ov_class(mapping, type(self._pipe).__name__)
            except ValueError:  # (an LCM has no inpainting pipeline)
                pass
        return out

    def _task_pipe(self, task: str):
        """The pipeline of `task` on this one's components: the same objects (compiled models, scheduler,
        tokenizers), never a second copy; only what the task's class adds is made (an inpainting mask's
        processor, the config keys its __init__ would register)."""
        if task == "txt2img":
            return self._pipe
        pipe = self._task_pipes.get(task)
        if pipe is None:
            from diffusers.configuration_utils import FrozenDict
            from diffusers.image_processor import VaeImageProcessor

            cls = self._task_classes[task]
            pipe = cls.__new__(cls)
            pipe.__dict__.update(self._pipe.__dict__)
            pipe.vae_decoder, pipe.vae = self._decoders["full"]  # (the tiny VAE's config would scale them wrongly)
            pipe._internal_dict = FrozenDict({"requires_aesthetics_score": False, **self._pipe._internal_dict})
            if task == "inpaint":
                pipe.mask_processor = VaeImageProcessor(vae_scale_factor=self._pipe.vae_scale_factor, do_normalize=False,
                                                        do_binarize=True, do_convert_grayscale=True)
            self._task_pipes[task] = pipe
        return pipe

    def _released_by(self, levers: Levers) -> set[str]:
        """The components a lever set compiles for their phase only and releases after it."""
        return {n for n in self._parts if levers.release_all or (levers.release_encoders and PHASES[n] == "encode")}

    @property
    def _transient(self) -> set[str]:
        """What is released after its phase: what the lever set now releases, but the components kept."""
        return self._released_by(self.levers) - self.kept

    def releasable(self, levers: Levers, task: str, decoder: str | None) -> dict[str, int]:
        try:
            tiny = self.decoder_for(task, decoder) == "tiny"
        except ValueError:  # a job this pipeline cannot run (it fails it): nothing to keep for it
            return {}
        unused = {"vae_encoder"} if task == "txt2img" else set()
        unused |= {"vae_decoder" if tiny else "tiny_vae_decoder"}
        return {n: self.held_bytes[n] for n in self._released_by(levers) - unused if n in self.held_bytes}

    def keep(self, names: tuple[str, ...], buffers: tuple[str, ...] = (), kind: tuple | None = None) -> None:
        """Keep these components compiled through the next jobs, though the lever set releases them: the next
        job does not load them again. Of them, `buffers` keep their runtime buffers too as their phase ends (the
        next image and the next job of this `kind` (the worker's: lever set, decoder, shape) do not allocate them
        again); the others give theirs back then, which measures what they held in a job of this kind. A component no longer kept is released now, and
        buffers no longer kept given back now (before the job's meter starts), unless their phase is running."""
        kept, kept_buffers = frozenset(names), frozenset(buffers) & frozenset(names)
        self._job_kind = kind
        for name in [n for n in self._holding if n not in kept_buffers]:
            self._give_back(name)
        changed = kept != self.kept or kept_buffers != self.kept_buffers
        self.kept, self.kept_buffers = kept, kept_buffers
        self._release_transient(self._phase)
        if changed:
            log.info("kept compiled between phases: %s%s", ", ".join(sorted(kept)) or "nothing",
                     f"; with their buffers: {', '.join(sorted(kept_buffers))}" if kept_buffers else "")

    def buffer_sizes(self, names: tuple[str, ...], kind: tuple) -> dict[str, int]:
        return {n: self._buffer_bytes[(n, kind)] for n in names if (n, kind) in self._buffer_bytes}

    def kept_compiled(self) -> dict[str, int]:
        return {n: self.held_bytes.get(n, 0) + self._holding.get(n, 0) for n in self.kept
                if self._parts[n].request is not None}

    def _give_back(self, name: str) -> None:
        """A kept component's runtime buffers go back (its weights stay compiled). The first time in a kind of
        job, what they held is measured."""
        self._holding.pop(name, None)
        request = self._parts[name].request
        if request is None or not hasattr(request, "release_memory"):
            return
        key = (name, self._job_kind)
        if self._job_kind is None or key in self._buffer_bytes:
            request.release_memory()
            return
        before = rss_bytes()
        request.release_memory()
        release_free_memory()
        self._buffer_bytes[key] = max(0, before - rss_bytes())

    def use_levers(self, levers: Levers) -> None:
        """Run the next jobs in another lever set (an auto worker, between jobs): what the new set does not keep
        between jobs is released now, before the job's meter starts; what it keeps is compiled when first
        needed. Never a second copy of a component: each has one compiled model, or none."""
        if levers == self.levers:
            return
        if (levers.static_shape, levers.tiny_vae, levers.precision) != \
                (self.levers.static_shape, self.levers.tiny_vae, self.levers.precision):
            raise ValueError(f"lever sets {self.levers.key} and {levers.key} differ beyond the memory levers")
        self.levers = levers
        self._phase = "switch"
        self._enter(None)
        self._shape = None  # static shapes: the UNet's batch follows split_guidance
        log.info("lever set now %s", levers.describe())

    def _guided(self, forward: Callable, *args, **kwargs):
        """split_guidance: classifier-free guidance as two batch-1 passes (one_by_one), else as it comes."""
        if self.levers.split_guidance:
            return one_by_one(forward, *args, **kwargs)
        return forward(*args, **kwargs)

    def _decode(self, forward: Callable, latent_sample, *args, **kwargs):
        """vae_tiles: decode whole when that cannot raise the job's peak, else in tiles. A whole decode of
        large latents takes fewer seconds (SDXL at 1024x1024: 32 s against 59 s in tiles, bench/taesd.py), and
        where the UNet's phase peaked higher (SDXL, with its 5 GB of weights released before the decode), the
        tiles save nothing. The decode phase starts first (in low mode the UNet is released), then its cost is
        estimated (DECODE_BYTES_PER_LATENT_PIXEL, or what a whole decode measured here) and compared with the
        headroom under the job's peak so far (VmHWM, which the job's meter reset at its start)."""
        _, _, h, w = latent_sample.shape
        if not self.levers.vae_tiles or (h <= VAE_TILE and w <= VAE_TILE):
            return forward(latent_sample, *args, **kwargs)
        self._enter("decode")
        peak, rss = high_water_mark_bytes(), rss_bytes()
        per_pixel = self.decode_bytes_per_pixel or \
            DECODE_BYTES_PER_LATENT_PIXEL * (1 if self.precision in ("bf16", "f16") else 2)
        if peak is None or rss + per_pixel * h * w > peak:
            return tiled_decode(forward, latent_sample, *args, tile=VAE_TILE, **kwargs)
        out = forward(latent_sample, *args, **kwargs)
        after = high_water_mark_bytes() or peak
        if after > peak:  # it did raise the peak: the estimate was low; learn what it took
            self.decode_bytes_per_pixel = max(per_pixel, (after - rss) / (h * w))
        return out

    def release_buffers(self) -> None:
        """OpenVINO's CPU plugin keeps each compiled model's intermediate buffers at the largest shape it has
        run, and reuses them: after a 1024x1024 job with guidance, full-size SD 1.5 in balanced mode held 2.7
        GiB more between jobs than after a 512x512 one, so every later job started there, and a profile measured
        above that grown base under-predicted the next larger shape (0.67x). `release_memory()` gives them back
        (30 ms for the UNet, 130 ms for the VAE decoder there); the next inference allocates its own shape's."""
        for part in self._parts.values():
            request = part.request
            if request is not None and hasattr(request, "release_memory"):
                request.release_memory()
        self._holding.clear()

    def held_buffers(self) -> int:
        return sum(self._holding.values())

    def snapshot(self) -> bytes | None:
        return self._snapshot() if self._snapshot is not None else None

    def preview(self) -> Callable[[], Image.Image | None] | None:
        if self._latents is None or self._projection is None:
            return None
        return functools.partial(self._projection.render, self._latents.detach().float().numpy().copy())

    def _skippable(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            if self._skipping:  # an iteration the checkpoint has done: its output is replaced, not computed
                import torch

                return (torch.zeros_like(args[0] if args else kwargs["sample"]),)
            return forward(*args, **kwargs)

        run.__wrapped__ = forward
        return run

    def _use_tiny_vae(self, spec: str) -> None:
        """A TAESD / TAESDXL decoder beside the model's VAE (a component of its own, `tiny_vae_decoder`), the
        default decoder of text-to-image jobs. Its config (AutoencoderTiny's: scaling factor 1) is the
        pipeline's `vae.config` while it decodes, so the UNet's latents reach it unscaled, as TAESD expects."""
        from optimum.intel.openvino.modeling_diffusion import OVModelVae, OVModelVaeDecoder

        pipe = self._pipe
        folder = tiny_vae_folder(spec, pipe.unet.config.get("out_channels", 4))
        # model_name is joined to the pipeline's folder: an absolute path names the TAESD's own folder
        tiny = OVModelVaeDecoder(self._core.read_model(folder / "openvino_model.xml"), pipe, str(folder.absolute()))
        self._parts["tiny_vae_decoder"] = tiny
        self._decoders["tiny"] = (tiny, OVModelVae(decoder=tiny, encoder=getattr(pipe, "vae_encoder", None)))
        pipe.vae_decoder, pipe.vae = self._decoders["tiny"]

    def decoder_for(self, task: str, asked: str | None) -> str:
        """The decoder a job of this task runs with: the one it asks for, else the tiny VAE for text-to-image
        where this pipeline has one, else the model's own. Raises ValueError for one it cannot run."""
        decoder = asked or ("tiny" if "tiny" in self._decoders and task == "txt2img" else "full")
        if decoder not in self._decoders:
            raise ValueError(f"decoder {decoder!r}: this worker has no tiny VAE (SDFLEET_TINY_VAE)")
        if decoder == "tiny" and task != "txt2img":
            raise ValueError("decoder 'tiny': the tiny VAE decodes text-to-image jobs only")
        return decoder

    def _phased(self, name: str, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            self._enter(PHASES[name])
            if self._parts[name].request is not None:
                return forward(*args, **kwargs)
            # Compiling and the first inference read the weights from mmapped files (the IR, or the cached
            # blob) while OpenVINO builds its own copy: both would be resident at once. With drop_file_pages
            # the pages already read are dropped as it goes (they stay in the page cache for a re-read).
            measure = self.levers.drop_file_pages and name not in self.held_bytes
            before = rss_bytes() if measure else 0
            with FilePageTrimmer(self.model_files() if self.levers.drop_file_pages else []):
                self._compile(name)
                out = forward(*args, **kwargs)
            if measure:  # the first compile is the warm-up's (64x64): its buffers are a few MiB
                self.held_bytes[name] = max(0, rss_bytes() - before)
            return out

        return run

    def _enter(self, phase: str | None) -> None:
        """Start a phase: release the transient components of the others, and give back the kept ones'
        buffers of the phase that ends (a kept component holds its weights through the other phases), but those
        whose buffers are kept too."""
        if phase == self._phase:
            return
        if phase is not None and self.on_phase is not None:
            self.on_phase(phase)
        for name in self.kept:
            if PHASES[name] != self._phase or self._parts[name].request is None:
                continue
            if name in self.kept_buffers:
                self._holding[name] = self._buffer_bytes.get((name, self._job_kind), 0)
            else:
                self._give_back(name)
        self._release_transient(phase)
        self._phase = phase

    def _release_transient(self, phase: str | None) -> None:
        released = False
        for name in self._transient:
            part = self._parts[name]
            if PHASES[name] != phase and part.request is not None:
                self._holding.pop(name, None)
                if name not in self._release_measured:
                    # the first release of each component (the warm-up's) measures what keeping it costs: all
                    # it held, its runtime's own allocations with its weights (at least what compiling it took)
                    self._release_measured.add(name)
                    before = rss_bytes()
                    part.request = None
                    gc.collect()
                    release_free_memory()
                    self.held_bytes[name] = max(self.held_bytes.get(name, 0), before - rss_bytes())
                    continue
                part.request = None
                released = True
        if released:
            gc.collect()  # the compiled model goes now, not at some later collection

    def _compile(self, name: str) -> None:
        part = self._parts[name]
        xml = Path(part.model_save_dir) / "openvino_model.xml"
        with cache_lock(self._config):
            if not self.levers.static_shape and xml.is_file():
                # From the path: with CACHE_DIR, OpenVINO imports the compiled blob without reading the IR (from
                # an ov.Model it would hash every weight to find the blob, touching the whole IR).
                part.request = self._core.compile_model(str(xml), self._device, self._config)
            else:
                part.compile()
        if name == "unet":  # what the compiled UNet really runs at (a bf16 hint on a CPU without bf16: f32)
            self.precision = part.request.get_property("INFERENCE_PRECISION_HINT").to_string()

    def prepare(self, request: ImageRequest) -> None:
        """Static shapes: reshape the UNet and text encoders for this job (a no-op when the shape is the same)."""
        if not self.levers.static_shape:
            return
        guidance = request.guidance_scale > 1.0
        shape = (request.width, request.height, guidance, self.levers.split_guidance)
        if shape == self._shape:
            return
        pipe = self._pipe
        max_len = getattr(pipe.tokenizer or pipe.tokenizer_2, "model_max_length", -1)
        for name, part in self._parts.items():
            part.request = None  # the old shape's compiled model goes before the new one is compiled
            if name == "unet":
                # optimum-intel doubles the batch for guidance unconditionally: set it from the job's guidance
                model = pipe._reshape_unet(part.model, 1, request.height, request.width, 1, max_len)
                batch = 2 if guidance and not self.levers.split_guidance \
                    and "timestep_cond" not in {i.get_any_name() for i in model.inputs} else 1
                model.reshape({i: [batch, *list(i.get_partial_shape())[1:]] for i in model.inputs
                               if i.get_partial_shape().rank.get_length() > 0 and i.get_any_name() != "timestep"})
                part.model = model
            elif PHASES[name] == "encode":
                part.model = pipe._reshape_text_encoder(part.model, 1, max_len)
        gc.collect()
        self._shape = shape

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image:
        """One image. Resuming from `request.resume` (a snapshot taken after loop iteration k), the diffusers
        loop runs its first k iterations without the UNet (a zero prediction: the scheduler's arithmetic only),
        and at the end of iteration k the latents, the scheduler's state and the generator's are put back as
        the snapshot holds them: from there on the loop computes exactly what the uninterrupted one did."""
        import torch

        if request.image is not None and not request.strength:
            return request.image  # strength 0: no step re-imagines any of it
        self.prepare(request)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        resume = read_snapshot(request.resume) if request.resume is not None else None
        skip = resume["step"] if resume else 0
        decoder = self.decoder_for(request.task, request.decoder)
        pipe = self._task_pipe(request.task)
        if request.task == "txt2img":
            self._pipe.vae_decoder, self._pipe.vae = self._decoders[decoder]
        scheduler = pipe.scheduler

        def _callback(_pipe, i, _t, tensors):
            done = i + 1
            total = getattr(pipe, "_num_timesteps", None) or len(scheduler.timesteps)  # (image-to-image: fewer)
            if done < skip:
                return tensors
            if done == skip:
                restore_snapshot(resume, scheduler, generator, tensors)
                self._skipping = False
            if on_step is not None:
                self._snapshot = (lambda: take_snapshot(scheduler, generator, tensors["latents"], done)) \
                    if done < total else None
                self._latents = tensors["latents"]
                try:
                    on_step(done, total)
                finally:
                    self._snapshot = self._latents = None
            return tensors

        kwargs = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, width=request.width,
                      height=request.height, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                      num_images_per_prompt=1, generator=generator, output_type="pil",
                      callback_on_step_end=_callback if on_step is not None or skip else None)
        if request.image is not None:
            kwargs.update(image=request.image, strength=request.strength)
            if request.mask is not None:
                kwargs["mask_image"] = request.mask
            taken = inspect.signature(type(pipe).auto_model_class.__call__).parameters
            kwargs = {k: v for k, v in kwargs.items() if k in taken}  # (image-to-image: its size is the image's)
        self._skipping = skip > 0
        try:
            out = pipe(**kwargs)
        finally:
            self._skipping = False
            self._enter(None)  # between images: only what is kept stays compiled
        if skip and resume.get("restored") is not True:
            raise CheckpointError(f"the checkpoint's step {skip} is past this run's {len(scheduler.timesteps)}")
        image = out.images[0]
        if request.mask is not None:
            image = keep_unmasked(image, request.image, request.mask)
        return image

    def model_files(self) -> list[str]:
        """Where this pipeline's weights are mapped from: the IR folders and the compiled-model cache."""
        folders = {str(Path(p.model_save_dir).parent) for p in self._parts.values()}
        return sorted({root for f in folders for root in hub.storage_roots(f)}) + \
            ([self._config["CACHE_DIR"]] if self._config.get("CACHE_DIR") else [])


def _portable(value, path: str):
    """A scheduler attribute as torch.load(weights_only=True) reads it back: tensors, numbers, strings, lists."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, (list, tuple)):
        return [_portable(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise CheckpointError(f"the scheduler's {path} ({type(value).__name__}) cannot be checkpointed")


def _native(value):
    if isinstance(value, dict) and set(value) == {"__ndarray__"}:
        return value["__ndarray__"].numpy()
    if isinstance(value, list):
        return [_native(v) for v in value]
    return value


def take_snapshot(scheduler, generator, latents, step: int) -> bytes:
    """The state a denoising loop has after `step` iterations: the latents, every attribute of the scheduler
    but its config (step index, sigmas, a multistep solver's earlier outputs...) and the generator's state."""
    import io

    import torch

    state = {"format": CHECKPOINT_FORMAT, "scheduler": type(scheduler).__name__, "step": step,
             "latents": latents.detach().clone(), "generator": generator.get_state(),
             "scheduler_state": {k: _portable(v, k) for k, v in vars(scheduler).items() if k != "_internal_dict"}}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_snapshot(data: bytes) -> dict:
    """A snapshot's contents, checked as far as they can be before the run (CheckpointError if unusable)."""
    import io

    import torch

    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # corrupt, truncated, or not a snapshot at all
        raise CheckpointError(f"unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"format {state.get('format') if isinstance(state, dict) else '?'} is not "
                              f"{CHECKPOINT_FORMAT}")
    if not isinstance(state.get("step"), int) or state["step"] < 1 or not isinstance(state.get("latents"), torch.Tensor):
        raise CheckpointError("no step or latents in it")
    return state


def restore_snapshot(state: dict, scheduler, generator, tensors: dict) -> None:
    """Put a snapshot back at the end of the loop iteration it was taken after (CheckpointError if it is
    another scheduler's or another shape's)."""
    if state["scheduler"] != type(scheduler).__name__:
        raise CheckpointError(f"written with the {state['scheduler']}, this pipeline runs the "
                              f"{type(scheduler).__name__}")
    latents, ours = state["latents"], tensors["latents"]
    if latents.shape != ours.shape or latents.dtype != ours.dtype:
        raise CheckpointError(f"latents of {tuple(latents.shape)} {latents.dtype}, this run has "
                              f"{tuple(ours.shape)} {ours.dtype}")
    saved = state["scheduler_state"]
    if set(saved) != {k for k in vars(scheduler) if k != "_internal_dict"}:
        raise CheckpointError("the scheduler's state has other fields (another diffusers version)")
    for k, v in saved.items():
        setattr(scheduler, k, _native(v))
    generator.set_state(state["generator"])
    tensors["latents"] = latents.clone()
    state["restored"] = True


def one_by_one(forward: Callable, sample, timestep, encoder_hidden_states, *args, return_dict: bool = False,
               **kwargs):
    """A UNet call of batch N as N calls of batch 1, concatenated (classifier-free guidance's unconditional
    and conditional halves one after the other): the activations are those of one image. Every input whose
    first dimension is the batch is sliced (an SDXL's text_embeds and time_ids among added_cond_kwargs)."""
    import torch
    from transformers.modeling_outputs import ModelOutput

    n = sample.shape[0]
    if n == 1:
        return forward(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)

    def part(x, i):
        if isinstance(x, dict):
            return {k: part(v, i) for k, v in x.items()}
        if getattr(x, "ndim", 0) > 0 and x.shape[0] == n:
            return x[i:i + 1]
        return x

    outs = [forward(part(sample, i), part(timestep, i), part(encoder_hidden_states, i),
                    *(part(a, i) for a in args), return_dict=True, **{k: part(v, i) for k, v in kwargs.items()})
            for i in range(n)]
    merged = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return merged if return_dict else ModelOutput(**merged)


def blend_ramp(n: int, width: int):
    """Blend weights along one side of a tile: rising over `width` pixels from each edge, 1 inside."""
    import torch

    i = torch.arange(n, dtype=torch.float32)
    return torch.clamp(torch.minimum(i + 1, n - i) / width, 1e-3, 1.0)


# What a whole VAE decode adds, compiling the decoder included, per latent pixel, kept above what was measured:
# SD's (and SDXL's) full VAE decoder at 1024x1024 took 2.36 GiB at bf16 (147 KiB per latent pixel,
# bench/taesd.py). At 16-bit inference; f32 doubles it.
DECODE_BYTES_PER_LATENT_PIXEL = 192 * 1024


def tiled_decode(decode: Callable, latent_sample, *args, tile: int = VAE_TILE, overlap: int = 16, **kwargs):
    """Decode latents in overlapping tiles of `tile` latent pixels (512 image pixels), blended linearly where
    they overlap, so the decoder's activations are those of one tile whatever the image size. Latents that
    fit one tile are decoded whole (the result is then identical)."""
    import torch

    _, _, h, w = latent_sample.shape
    if h <= tile and w <= tile:
        return decode(latent_sample, *args, **kwargs)

    def starts(n: int) -> list[int]:
        if n <= tile:
            return [0]
        step = tile - overlap
        return sorted(set(list(range(0, n - tile, step)) + [n - tile]))

    out = weight = key = first = None
    for y in starts(h):
        for x in starts(w):
            piece = decode(latent_sample[:, :, y:y + tile, x:x + tile], *args, **kwargs)
            if first is None:
                first, key = piece, next(iter(piece.keys()))
            image = piece[key]
            scale = image.shape[-1] // min(tile, w)
            th, tw = image.shape[-2], image.shape[-1]
            mask = blend_ramp(th, overlap * scale)[:, None] * blend_ramp(tw, overlap * scale)[None, :]
            if out is None:
                out = torch.zeros(image.shape[0], image.shape[1], h * scale, w * scale, dtype=torch.float32)
                weight = torch.zeros(h * scale, w * scale, dtype=torch.float32)
            ys, xs = y * scale, x * scale
            out[:, :, ys:ys + th, xs:xs + tw] += image.float() * mask
            weight[ys:ys + th, xs:xs + tw] += mask
    return type(first)(**{key: out / weight})


class GenaiPipeline(PipelineBase):
    """openvino-genai's Text2ImagePipeline on the same exported folder (it needs the OpenVINO tokenizer that
    `sdfleet model make-tiny` and optimum-cli write). No torch in the process: the C++ generator is used."""

    backend = "genai"

    def __init__(self, model: str, device: str = "CPU", properties: dict | None = None,
                 levers: Levers | None = None):
        import openvino as ov
        import openvino_genai

        levers = levers or Settings().levers
        if levers.tiny_vae:
            raise ValueError(f"SDFLEET_TINY_VAE={levers.tiny_vae}: the genai backend decodes with the model's own "
                             f"VAE only; use SDFLEET_BACKEND=optimum for a tiny VAE")
        # genai keeps its components compiled and decodes whole: only these levers apply
        unsupported = [k for k in ("release_encoders", "release_all", "vae_tiles", "split_guidance")
                       if getattr(levers, k)]
        if unsupported:
            log.warning("openvino-genai backend: %s not applied (components stay resident)", ", ".join(unsupported))
        self.levers = dataclasses.replace(levers, release_encoders=False, release_all=False, vae_tiles=False,
                                          split_guidance=False)
        props = dict(properties or {})
        if levers.precision != "auto":
            props["INFERENCE_PRECISION_HINT"] = levers.precision
        if levers.compile_threads:
            props["COMPILATION_NUM_THREADS"] = levers.compile_threads
        self._genai, self._device, self._props, self._shape = openvino_genai, device, props, None
        self._model = model
        self._image_pipes: dict = {}
        self._latent = None  # the step's latents (an ov.Tensor whose buffer the loop reuses), during on_step
        try:
            self._projection = projection_for(json.loads((Path(model) / "model_index.json").read_text())
                                              .get("_class_name", ""))
        except (OSError, ValueError):
            self._projection = None
        t0 = time.perf_counter()
        if levers.static_shape:
            self._pipe = openvino_genai.Text2ImagePipeline(model)  # compiled per shape, in prepare()
        else:
            with cache_lock(props):
                self._pipe, self._image_pipes = self._load(model, device, props)
            if self._image_pipes:
                self.tasks = ("txt2img", "img2img", "inpaint", "upscale")
        hint = props.get("INFERENCE_PRECISION_HINT")
        self.precision = str(hint) if hint else ov.Core().get_property(device, "INFERENCE_PRECISION_HINT").to_string()
        log.info("loaded %s with openvino-genai (%s, %s) in %.1f s", model, self.precision, self.levers.describe(),
                 time.perf_counter() - t0)

    def _load(self, model: str, device: str, props: dict):
        """(text-to-image, {task: pipeline}): genai's inpainting pipeline, when the model's folder has a VAE
        encoder, and its image-to-image and text-to-image pipelines made from it, sharing its compiled models;
        else text-to-image alone."""
        genai = self._genai
        if (Path(model) / "vae_encoder").is_dir():
            try:
                inpaint = genai.InpaintingPipeline(model, device, **props)
                return genai.Text2ImagePipeline(inpaint), {"img2img": genai.Image2ImagePipeline(inpaint),
                                                           "inpaint": inpaint}
            except RuntimeError as exc:  # a family genai inpaints not: text-to-image as before
                log.warning("openvino-genai takes no image jobs for %s (%s)", model, str(exc).splitlines()[0][:200])
        return genai.Text2ImagePipeline(model, device, **props), {}

    def prepare(self, request: ImageRequest) -> None:
        if not self.levers.static_shape:
            return
        shape = (request.width, request.height, request.guidance_scale > 1.0)
        if shape != self._shape:
            # genai's reshape knows guidance (UNet batch 1 or 2) but refuses a compiled model: a new shape
            # takes a fresh pipeline, and the old one's compiled models go before the new compile
            if self._shape is not None:
                self._pipe = None
                gc.collect()
                self._pipe = self._genai.Text2ImagePipeline(self._model)
            self._pipe.reshape(1, request.height, request.width, request.guidance_scale)
            with cache_lock(self._props):
                self._pipe.compile(self._device, **self._props)
            self._shape = shape

    def preview(self) -> Callable[[], Image.Image | None] | None:
        if self._latent is None or self._projection is None:
            return None
        return functools.partial(self._projection.render, np.array(self._latent.data, dtype=np.float32, copy=True))

    def model_files(self) -> list[str]:
        return hub.storage_roots(self._model) + ([self._props["CACHE_DIR"]] if self._props.get("CACHE_DIR") else [])

    def generate(self, request: ImageRequest, on_step: OnStep | None = None) -> Image.Image:
        self.decoder_for(request.task, request.decoder)  # (the model's own VAE only)
        raised: list[BaseException] = []

        def callback(step: int, num_steps: int, latent) -> bool:
            # an exception cannot cross the C++ loop: keep it, stop the loop (True), and raise it after
            try:
                if on_step is not None:
                    self._latent = latent
                    on_step(step + 1, num_steps)
            except BaseException as exc:
                raised.append(exc)
                return True
            finally:
                self._latent = None
            return False

        if request.image is not None and not request.strength:
            return request.image  # strength 0: no step re-imagines any of it
        self.prepare(request)
        kwargs = {"negative_prompt": request.negative_prompt} if request.negative_prompt else {}
        common = dict(width=request.width, height=request.height, num_inference_steps=request.steps,
                      guidance_scale=request.guidance_scale, num_images_per_prompt=1,
                      generator=self._genai.CppStdGenerator(request.seed), callback=callback, **kwargs)
        if request.image is None:
            tensor = self._pipe.generate(request.prompt, **common)
        else:
            import numpy as np
            import openvino as ov

            image = ov.Tensor(np.asarray(request.image.convert("RGB"), dtype=np.uint8)[None].copy())
            pipe = self._image_pipes[request.task]
            if request.mask is not None:
                mask = ov.Tensor(np.asarray(request.mask.convert("RGB"), dtype=np.uint8)[None].copy())
                tensor = pipe.generate(request.prompt, image, mask, strength=request.strength, **common)
            else:
                tensor = pipe.generate(request.prompt, image, strength=request.strength, **common)
        if raised:
            raise raised[0]
        out = Image.fromarray(tensor.data[0])
        return keep_unmasked(out, request.image, request.mask) if request.mask is not None else out


def _load_factory(spec: str) -> Callable[[Settings], Pipeline]:
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"SDFLEET_BACKEND={spec!r}: expected 'optimum' or 'package.module:factory'")
    return getattr(importlib.import_module(module), attr)


def compile_key(device: str, levers: Levers) -> str:
    """The compile-cache folder's name for what this worker asks OpenVINO to compile with: the device, the
    inference precision ("auto" resolved to the device's default), the compile threads and static shapes.
    OpenVINO's CPU plugin keys a cached blob by the device's name only (its CACHING_PROPERTIES), so a cache
    filled at bf16 would be imported as is by a worker switched to f32: each set of properties gets its own."""
    import openvino as ov

    precision = levers.precision
    if precision == "auto":
        precision = ov.Core().get_property(device, "INFERENCE_PRECISION_HINT").to_string()
    threads = levers.compile_threads or "auto"
    return f"{device}-{precision}-threads_{threads}-{'static' if levers.static_shape else 'dynamic'}".replace("/", "_")


def load_pipeline(settings: Settings) -> Pipeline:
    if not settings.model:
        raise ValueError("SDFLEET_MODEL is not set: a worker must be told which model it serves")
    # Compiled blobs are cached per model and compile properties, so a restarted worker (or a replaced pool
    # child) skips compiling, and a worker whose properties changed never imports another's blobs.
    cache = str(settings.cache_dir / "ov-cache" / settings.served_model_name.replace("/", "--")
                / compile_key(settings.device, settings.levers))
    if settings.backend == "optimum":
        return OptimumPipeline(hub.resolve(settings.model), settings.device, {"CACHE_DIR": cache}, settings.levers)
    if settings.backend == "genai":
        return GenaiPipeline(hub.resolve(settings.model), settings.device, {"CACHE_DIR": cache}, settings.levers)
    pipeline = _load_factory(settings.backend)(settings)
    if not isinstance(pipeline, Pipeline):
        missing = [name for name in ("backend", "precision", "levers", "warm_peak", "memory_mode", "generate",
                                     "model_files", "snapshot", "preview", "warm_up", "drop_weight_pages", "release_buffers")
                   if not hasattr(pipeline, name)]
        raise TypeError(f"SDFLEET_BACKEND={settings.backend}: the factory's {type(pipeline).__name__} lacks "
                        f"{', '.join(missing)} of the Pipeline contract; subclass worker.pipelines.PipelineBase")
    return pipeline


_loaded: Pipeline | None = None


def get_pipeline(settings: Settings) -> Pipeline:
    """The host's pipeline, loaded once per worker process and reused job after job."""
    global _loaded
    if _loaded is None:
        # Loading and the warm-up read the weights through mmap while OpenVINO makes its own copy: with
        # drop_file_pages, the pages already read do not stay resident beside it (genai loads all at once).
        folder = hub.resolve(settings.model) if settings.backend in ("optimum", "genai") and settings.model else None
        roots = [*hub.storage_roots(folder), str(settings.cache_dir / "ov-cache")] \
            if settings.levers.drop_file_pages and folder and os.path.isdir(folder) else []
        with FilePageTrimmer(roots):
            _loaded = load_pipeline(settings)
            sets = settings.lever_sets
            if len(sets) > 1 and not hasattr(_loaded, "use_levers"):
                raise ValueError(f"SDFLEET_MEMORY_MODE=auto: the {_loaded.backend} backend cannot switch lever sets "
                                 f"between jobs (its components stay compiled); use SDFLEET_BACKEND=optimum or a mode")
            if settings.warmup:
                # each set's warm-up peak is what a job in it loads (an auto worker's: cheapest first, ending in
                # the fastest, everything compiled)
                for levers in reversed(sets):
                    if len(sets) > 1:
                        _loaded.use_levers(levers)
                    _loaded.warm_up()
        dropped = _loaded.drop_weight_pages(measure=True)
        if dropped:
            log.info("dropped %d MB of the IR's file pages from the resident set", dropped >> 20)
        # The model stack's objects live as long as the process: move them out of the collector's sight.
        # A full collection then costs ~0 ms instead of ~325 ms (torch + transformers + diffusers graphs),
        # which the worker would otherwise pay after every job (measured: bench/overhead.py).
        gc.collect()
        gc.freeze()
    return _loaded
