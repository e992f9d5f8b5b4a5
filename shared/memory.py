"""The memory model: a host's budget (cgroup-aware), and a job's predicted peak from what similar jobs
measured, else a prior from the loaded model's size. Pure functions: the API's admission and the worker's
own pre-check both use them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GB = 1 << 30  # binary: sizes here are GiB and MiB, and are printed so (fmt_size)
MB = 1 << 20

# A cgroup v1 "no limit" is the largest page-aligned 63-bit number; anything this big means none.
_V1_UNLIMITED = 1 << 60

# The prior, before a model has any profile: activations of a job grow with its latent pixels and double
# with classifier-free guidance (the UNet runs a batch of two). It is deliberately generous (a refused job
# costs a retry, an admitted one that does not fit costs a worker); profiles replace it after one job.
PRIOR_FIXED_BYTES = 256 * MB
# SD 1.5 at 512x512 with guidance peaked 1.25 GiB above its resident set in balanced mode (bf16), past the
# 64 KiB this was: 160 KiB keeps the prior above what was measured.
PRIOR_BYTES_PER_LATENT_PIXEL = 160 * 1024  # 1.25 GiB at 512x512 with guidance, 2.5 GiB at 1024x1024 without
# An init image through the VAE encoder (image-to-image, inpainting, upscale tiles), whole at the job's size:
# its activations grow with the pixels as the decoder's do. Until a job of the model that encodes was
# measured, a prediction from text-to-image profiles takes the encode phase at the decoder's cost per latent
# pixel (worker/pipelines.py: 147 KiB measured at 1024x1024, bf16; f32 doubles it), on top of the base, and
# the job's peak as the larger of that and the scaled text-to-image peak.
ENCODE_BYTES_PER_LATENT_PIXEL = 192 * 1024
# The VAE decoder's tile, in latent pixels a side (512 image pixels), where a worker decodes in tiles
# (vae_tiles): its decode never costs more than one tile's, whatever the image's size.
VAE_TILE = 64


def cgroup_memory_limit(proc_self_cgroup: str, root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup and its ancestors (the smallest), or None.

    `proc_self_cgroup` is the text of /proc/self/cgroup: "0::/path" for cgroup v2, "N:memory:/path" for v1.
    In a container psutil reports the host's RAM: this is the number that counts.
    """
    limits = []
    for line in proc_self_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
            if not base.is_dir():
                base = root  # a v1 memory hierarchy mounted at the root
        else:
            continue
        rel = Path(path.lstrip("/"))
        for d in [rel, *rel.parents]:
            value = _read_limit(base / d / name)
            if value is not None:
                limits.append(value)
    return min(limits) if limits else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _V1_UNLIMITED else value


def host_budget(total_ram: int, cgroup_limit: int | None, reserve: int, explicit: int | None = None) -> int:
    """What a worker may use: an explicit setting, else min(cgroup limit, RAM) minus the reserve."""
    if explicit is not None:
        return explicit
    limit = min(total_ram, cgroup_limit) if cgroup_limit else total_ram
    return max(0, limit - reserve)


def read_host_budget(reserve: int, explicit: int | None = None) -> tuple[int, int | None]:
    """(budget, cgroup limit) of this host, read from /proc and /sys."""
    import psutil

    try:
        cgroup = cgroup_memory_limit(Path("/proc/self/cgroup").read_text())
    except OSError:
        cgroup = None
    return host_budget(psutil.virtual_memory().total, cgroup, reserve, explicit), cgroup


def guidance_on(guidance_scale: float) -> bool:
    """Classifier-free guidance runs only above 1; it doubles the UNet's batch."""
    return guidance_scale > 1.0


def job_shape(width: int, height: int, guidance_scale: float, guidance_doubles_batch: bool = True,
              kind: str = "txt2img", tile: int | None = None) -> "Shape":
    """The shape a job runs in: its UNet batch doubles only for classifier-free guidance (a scale above 1 on a
    model whose guidance is not an embedding, as an LCM's is). A job with an init image encodes it first
    (`encodes`); an upscale runs in tiles of `tile` pixels a side, whatever its output's size."""
    if kind == "upscale" and tile:
        width = height = tile
    return Shape(width, height, guidance_doubles_batch and guidance_on(guidance_scale), encodes=kind != "txt2img")


def latent_pixels(width: int, height: int) -> int:
    return (width // 8) * (height // 8)


@dataclass(frozen=True)
class Shape:
    """What a job's peak depends on, besides the model and how it runs."""

    width: int
    height: int
    guidance: bool
    images_per_pass: int = 1
    encodes: bool = False  # an init image goes through the VAE encoder first

    @property
    def work(self) -> int:
        """Activation work: latent pixels x UNet batch."""
        return latent_pixels(self.width, self.height) * (2 if self.guidance else 1) * self.images_per_pass


@dataclass(frozen=True)
class Profile:
    """What jobs of one shape measured on one model/backend/precision/memory mode."""

    shape: Shape
    peak_bytes: int  # the largest peak seen
    base_bytes: int  # the worker's resident set before that job (the loaded pipeline)
    samples: int
    # Time, measured by the same jobs (shared/timing.py): seconds per UNet pass of a denoising step, per image
    # around its steps (prompt encoding, decode, PNG), and per job around its images; None until measured.
    step_s: float | None = None
    image_overhead_s: float | None = None
    job_overhead_s: float | None = None
    # The first image's peak during its steps (with its init image's encode) and during its decode, when measured
    # (None in profiles from before they were): the UNet's activations grow with the latent pixels times its
    # batch, the decoder's with the pixels alone, a component kept compiled holds its buffers while the next one
    # runs, and the prompt's encode costs the same at every size.
    steps_peak_bytes: int | None = None
    decode_peak_bytes: int | None = None


@dataclass(frozen=True)
class Prediction:
    bytes: int
    source: str  # "profile" (this shape was seen), "scaled" (another size, scaled), "prior"
    detail: str


def decode_pixels(shape: Shape, tiled: bool) -> int:
    """What a decode's activations grow with: one image's latent pixels (whatever the guidance), or at most a
    tile's where the worker decodes in tiles."""
    pixels = latent_pixels(shape.width, shape.height)
    return min(pixels, VAE_TILE * VAE_TILE) if tiled else pixels


def _scaled_rise(near: Profile, shape: Shape, tiled: bool) -> int:
    """What a job of `shape` rises above the base, from a measured profile of another shape. With the profile's
    phases: the steps' rise scales with the UNet's work, the decode's further rise (the decoder's buffers on
    top of the UNet's, which a resident UNet keeps) with the decoded pixels, and what the job peaked at above
    both (the prompt's encode with its encoders compiled, later images) stays as measured. Without them, the
    whole rise scales with the work."""
    base, peak = near.base_bytes, near.peak_bytes
    if near.steps_peak_bytes is None or near.decode_peak_bytes is None:
        return int(max(0, peak - base) / near.shape.work * shape.work)
    steps = max(0, near.steps_peak_bytes - base) / near.shape.work * shape.work
    decode = max(0, near.decode_peak_bytes - max(near.steps_peak_bytes, base)) / decode_pixels(near.shape, tiled) \
        * decode_pixels(shape, tiled)
    later = max(0, peak - max(near.steps_peak_bytes, near.decode_peak_bytes))
    return int(steps + decode + later)


def predict(shape: Shape, profiles: list[Profile], resident_bytes: int | None, tiled_decode: bool = False) -> Prediction:
    """A job's peak RSS on a worker whose loaded pipeline holds `resident_bytes` (`tiled_decode`: its lever
    set decodes in tiles)."""
    # A job rises above what the worker holds as it starts, and that grows a little with the shapes run (a worker
    # gives the runtime's buffers back after each job; the kernels compiled per shape and the heap stay: full-size
    # SD 1.5 in balanced mode started 0.23 GiB higher after a 1024x1024 job than at its first): a prediction
    # starts from the higher of the measured job's base and the worker's resident set now.
    floor = resident_bytes or 0
    for p in profiles:
        if p.shape == shape:
            return Prediction(p.peak_bytes + max(0, floor - p.base_bytes), "profile",
                              f"measured on {p.samples} job(s) of this shape")
    encode = ENCODE_BYTES_PER_LATENT_PIXEL * latent_pixels(shape.width, shape.height) if shape.encodes else 0
    if profiles:
        # The nearest seen shape by activation work, of the same kind (with or without an init image) when one
        # was seen: what it used above the base it started from (the loaded pipeline, or its warm-up peak for a
        # pipeline that loads components per job) scales with the work, on top of that same base.
        same = [p for p in profiles if p.shape.encodes == shape.encodes] or profiles
        near = min(same, key=lambda p: abs(p.shape.work - shape.work) + (0 if p.shape.guidance == shape.guidance else 1))
        value = max(floor, near.base_bytes) + _scaled_rise(near, shape, tiled_decode)
        detail = f"scaled by latent pixels from {near.shape.width}x{near.shape.height}" \
                 f"{' with guidance' if near.shape.guidance else ''}"
        if shape.encodes and not near.shape.encodes:  # no job with an init image measured yet: its encode prior
            value = max(value, near.base_bytes + encode)
            detail += ", and the init image's encode prior"
        return Prediction(value, "scaled", detail)
    base = resident_bytes if resident_bytes is not None else 0
    value = base + PRIOR_FIXED_BYTES + max(PRIOR_BYTES_PER_LATENT_PIXEL * shape.work, encode)
    return Prediction(value, "prior", "no job of this model measured yet: loaded pipeline + activation prior")


@dataclass(frozen=True)
class LeverSet:
    """One lever set a worker can run a job in: its profile key, its profiles, what a job in it starts from
    (the worker's resident set in it), and whether it decodes in tiles."""

    key: str
    profiles: list[Profile]
    resident_bytes: int | None
    tiled_decode: bool = False


@dataclass(frozen=True)
class LeverChoice:
    key: str
    prediction: Prediction  # the job's peak in the set's own way (what admission and routing judge it by)
    reason: str
    kept: tuple[str, ...] = ()  # components the set releases that stay compiled through this job (choose_kept)
    kept_buffers: tuple[str, ...] = ()  # of those, the ones whose runtime buffers stay past their phase too
    kept_bytes: int = 0  # what all of it holds: the job is expected to peak at most this much above the prediction

    @property
    def expected_bytes(self) -> int:
        return self.prediction.bytes + self.kept_bytes


def choose_kept(predicted: int, budget: int, held: dict[str, int]) -> tuple[tuple[str, ...], int]:
    """Which of the components a lever set releases (compiled for their phase, loaded again by every job)
    stay compiled through the next job, and what they hold: the smallest first, while the job's predicted
    peak plus everything kept stays under the budget. A kept component holds its weights through the other
    phases (its buffers are given back as its phase ends, unless they are kept too: chosen the same way, after
    the components), so the job peaks at most that much higher; what does not fit is dropped before the job
    starts."""
    kept, total = [], 0
    for name, size in sorted(held.items(), key=lambda item: (item[1], item[0])):
        if predicted + total + size > budget:
            break
        kept.append(name)
        total += size
    return tuple(kept), total


def choose_lever_set(shape: Shape, sets: list[LeverSet], budget: int) -> LeverChoice:
    """The fastest lever set (`sets`: fastest first) whose predicted peak fits `budget`; else the cheapest,
    the last (which the caller finds past the budget). With one set, that set."""
    if len(sets) == 1:
        only = sets[0]
        return LeverChoice(only.key, predict(shape, only.profiles, only.resident_bytes, only.tiled_decode),
                           f"the worker's memory mode, {only.key}")
    passed = []
    for s in sets:
        p = predict(shape, s.profiles, s.resident_bytes, s.tiled_decode)
        if p.bytes <= budget or s is sets[-1]:
            fits = "fits" if p.bytes <= budget else "is past"
            return LeverChoice(s.key, p, f"auto: {s.key}, predicted {fmt_size(p.bytes)} ({p.source}), {fits} the "
                                         f"budget of {fmt_size(budget)}" + (f"; {', '.join(passed)}" if passed else ""))
        passed.append(f"{s.key} would need {fmt_size(p.bytes)}")
    raise AssertionError("unreachable")


def fmt_size(n: int) -> str:
    """Bytes in the binary units they are computed in: 8,713,434,453 is "8.1 GiB" (it is 8.7 GB)."""
    return f"{n / GB:.1f} GiB" if n >= GB / 10 else f"{n / MB:.0f} MiB"
