"""The job contract: states and their one guarded transition table, the request and the public record."""

from __future__ import annotations

import enum
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import InvalidTransition
from shared.memory import Shape, job_shape
from shared.settings import MODEL_NAME_RE
from shared.webhooks import WebhookRefused, check_syntax

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MAX_URL_CHARS = 2000

# Job IDs are UUIDs: anything else is no job, answered 404 without asking the database. Matched whole
# (fullmatch): with match, `$` also matches before a final newline, and "<uuid>\n" passed
JOB_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TEXT_CONTROLS_OK = frozenset("\t\n\r")

Priority = Literal["low", "normal", "high"]
PRIORITY_ORDER = {"high": 0, "normal": 1, "low": 2}
# What admission does with a job no live worker fits: refuse it (422 insufficient_memory, with the hints), or
# admit it with the first of its own hints that fits, the change recorded (`fitted`)
Fit = Literal["refuse", "auto"]


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# The state machine docs/api.md's "Job states" table documents (tests check the code against that table).
ALLOWED = {
    # queued -> failed: no live worker's memory class can hold it any more (insufficient_memory)
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running -> queued: taken back after the worker running it was lost
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def check_transition(old: JobStatus, new: JobStatus) -> None:
    if new not in ALLOWED[old]:
        raise InvalidTransition(f"a job cannot go from {old.value} to {new.value}")


class WebhookStatus(str, enum.Enum):
    """A webhook's delivery: pending until the receiver answered 2xx (delivered) or the attempts ran out."""

    pending = "pending"
    delivered = "delivered"
    failed = "failed"


WEBHOOK_ALLOWED = {
    None: frozenset({WebhookStatus.pending}),  # the job ended
    WebhookStatus.pending: frozenset({WebhookStatus.delivered, WebhookStatus.failed}),
    WebhookStatus.delivered: frozenset(),
    WebhookStatus.failed: frozenset(),
}


def check_webhook_transition(old: WebhookStatus | None, new: WebhookStatus) -> None:
    if new not in WEBHOOK_ALLOWED[old]:
        raise InvalidTransition(f"a webhook cannot go from {old.value if old else 'none'} to {new.value}")


def is_job_id(value: str) -> bool:
    return isinstance(value, str) and JOB_ID_RE.fullmatch(value) is not None


def check_text(v: str) -> str:
    """Text the database can store and a person meant: no NUL or other control characters (tab and line
    breaks are fine), no lone UTF-16 surrogates (PostgreSQL refuses both)."""
    for i, c in enumerate(v):
        cat = unicodedata.category(c)
        if (cat == "Cc" and c not in _TEXT_CONTROLS_OK) or cat == "Cs":
            raise ValueError(f"must not contain control characters or lone surrogates "
                             f"(U+{ord(c):04X} at position {i})")
    return v


MIN_SIDE, MAX_SIDE, MAX_STEPS, MAX_GUIDANCE = 64, 2048, 150, 30.0
_MODEL_DEFAULT = "default: the model's own (its workers announce it: GET /v1/models, `defaults`)"


def check_side(v: int | None) -> int | None:
    if v is not None and v % 8:
        raise ValueError(f"must be a multiple of 8 (the VAE works on 8x8 pixel blocks), got {v}")
    return v


class ModelDefaults(BaseModel):
    """What a model runs best with, read by its worker from the pipeline's own files (model_index.json, the
    UNet's and the scheduler's configs) and announced in every heartbeat: a job that leaves steps, guidance or
    size out takes these. An operator may override them per worker (SDFLEET_DEFAULT_STEPS, ...)."""

    model_config = ConfigDict(extra="ignore")

    family: str = Field(description="sd, sdxl, lcm, lcm-lora, sd-turbo, sdxl-turbo, or unknown (a pipeline "
                        "whose files could not be read: SD 1.5's defaults)")
    pipeline: str = Field(description="the diffusers pipeline class of the folder (model_index.json)")
    scheduler: str
    steps: int = Field(ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(ge=0, le=MAX_GUIDANCE)
    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    recommended_steps: tuple[int, int] = Field(description="the range of steps the model is made for")
    guidance_doubles_batch: bool = Field(
        description="whether a guidance scale above 1 runs classifier-free guidance (the UNet's batch doubles, "
        "and its memory); false for LCM, whose guidance is an embedding the UNet takes")
    negative_prompt: bool = Field(description="whether the pipeline takes a negative prompt (LCM does not)")
    tasks: list[str] = Field(default=["txt2img"], description="the kinds of job its workers run: txt2img, and "
                             "img2img, inpaint, upscale where their pipeline takes an image")
    overridden: list[str] = Field(default=[], description="the values the worker's operator set over the model's")


# A worker that could not read its model's files (a custom backend): SD 1.5's defaults, guidance doubling.
FALLBACK_DEFAULTS = ModelDefaults(
    family="unknown", pipeline="unknown", scheduler="unknown", steps=20, guidance_scale=7.5, width=512, height=512,
    recommended_steps=(15, 50), guidance_doubles_batch=True, negative_prompt=True)


class JobShape(BaseModel):
    """What a job's memory depends on (the part of a submission `POST /v1/plan` takes). Strict: no coercion
    of "512" to 512, no unknown fields. Fields left out take the model's defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, description=_MODEL_DEFAULT)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE, description=_MODEL_DEFAULT)
    guidance_scale: float | None = Field(
        default=None, ge=0, le=MAX_GUIDANCE, description="above 1 runs classifier-free guidance (twice the UNet's "
        "work and memory), except on an LCM, where it is an embedding; " + _MODEL_DEFAULT)
    num_images: int = Field(default=1, ge=1, le=8)
    model: str | None = Field(default=None, max_length=200, pattern=MODEL_NAME_RE.pattern)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        return check_side(v)


# What a job does with its images: text-to-image (no input), image-to-image (an init image and a strength),
# inpainting (an init image and a mask: only the mask's white part is repainted), upscaling (an init image
# enlarged 2x or 4x, then refined tile by tile by image-to-image with the same model)
JobKind = Literal["txt2img", "img2img", "inpaint", "upscale"]
# What decodes a job's latents: the worker's tiny VAE (TAESD) or the model's own
Decoder = Literal["tiny", "full"]
KINDS: tuple[str, ...] = ("txt2img", "img2img", "inpaint", "upscale")
DEFAULT_STRENGTH = {"img2img": 0.75, "inpaint": 1.0, "upscale": 0.3}
UPSCALE_FACTORS = (2, 4)
MAX_UPSCALED_SIDE = 4096  # an upscaled image's side, at most (its tiles are what memory sees)


def denoising_steps(kind: str, steps: int, strength: float | None, family: str = "sd") -> int:
    """The denoising steps a job really runs per image (per tile for an upscale): diffusers' image-to-image
    pipelines skip the first (1 - strength) of the schedule and run int(steps * strength); an LCM's own
    pipeline takes its `steps` from the part of the schedule the strength leaves. 0: the input is the output."""
    if kind == "txt2img" or strength is None:
        return steps
    if strength <= 0:
        return 0
    if family == "lcm":  # (an LCM-LoRA runs in the SD pipeline, whose image-to-image takes the fraction)
        return steps
    return min(int(steps * strength), steps)


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of `tile` start along a side of `n` pixels: as few as overlap by at least `overlap`, spread
    evenly (on multiples of 8, the last one ending at the side's end)."""
    if n <= tile:
        return [0]
    count = -(-(n - overlap) // (tile - overlap))
    return [min(n - tile, round(i * (n - tile) / (count - 1) / 8) * 8) for i in range(count - 1)] + [n - tile]


def tile_overlap(tile: int) -> int:
    return max(8, tile // 8 // 8 * 8)


def upscale_tiles(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """The (x, y) of each tile of an upscale's output, row by row."""
    overlap = tile_overlap(tile)
    return [(x, y) for y in tile_starts(height, tile, overlap) for x in tile_starts(width, tile, overlap)]


@dataclass(frozen=True)
class Work:
    """What a job asks of a worker: the shape of each pass (what its memory depends on), the denoising steps
    of a pass, and the passes (its images; an upscale's tiles)."""

    shape: Shape
    steps: int
    passes: int


def job_work(params, guidance_doubles_batch: bool = True, family: str = "sd") -> Work:
    """A job's work, from its parameters (JobParameters, or a job's row)."""
    kind = getattr(params, "kind", None) or "txt2img"
    tile = getattr(params, "tile", None)
    shape = job_shape(params.width, params.height, params.guidance_scale, guidance_doubles_batch, kind, tile)
    passes = len(upscale_tiles(params.width, params.height, tile)) if kind == "upscale" and tile else params.num_images
    return Work(shape, denoising_steps(kind, params.steps, getattr(params, "strength", None), family), passes)


class ImageRef(BaseModel):
    """An image of an earlier job of the same key (a finished job's output) used as this job's input."""

    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: str = Field(pattern=JOB_ID_RE.pattern, description="an earlier job's ID (the same API key's)")
    index: int = Field(default=0, ge=0, le=7, description="which of its images (0-based)")


_IMAGE_FIELD = ("PNG, JPEG or WebP, base64 (a data: URL is fine) or, as {\"job_id\", \"index\"}, an image of an "
                "earlier job of the same key; or a file part of a multipart/form-data body")


class JobCreate(JobShape):
    """What a client submits. With `image`, an image-to-image job (`strength`); with `image` and `mask`,
    inpainting; with `image` and `upscale`, an upscale. Without `width`/`height`, such a job keeps its input's
    size (rounded down to multiples of 8)."""

    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS,
                        description="required but for an upscale (which may leave it out: no text guides it)")
    image: str | ImageRef | None = Field(default=None, description="the init image: " + _IMAGE_FIELD)
    mask: str | ImageRef | None = Field(
        default=None, description="inpainting: the mask, the size of the image; white (or, in an image with "
        "transparency, transparent) is repainted, black kept as it was. " + _IMAGE_FIELD)
    strength: float | None = Field(
        default=None, ge=0, le=1, description="with an image: how much of it is re-imagined (0: returned as it "
        "is, 1: from noise; the job runs int(steps x strength) steps). Default 0.75 (image-to-image), 1 "
        "(inpainting), 0.3 (upscale)")
    upscale: Literal[2, 4] | None = Field(default=None, description="with an image: enlarge it 2x or 4x (tiled "
                                          "image-to-image with the same model, at most 4096 pixels a side)")
    decoder: Decoder | None = Field(
        default=None, description="what decodes the latents into the image: tiny (the worker's tiny VAE, TAESD: "
        "a fraction of the decode's time and memory, less fine detail; text-to-image only, on workers that have "
        "one) or full (the model's own VAE). Default: tiny for text-to-image where the model's workers have one, "
        "else full")
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS, description=_MODEL_DEFAULT)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    priority: Priority = "normal"
    fit: Fit = Field(
        default="refuse", description="when no live worker fits the job: refuse, a 422 insufficient_memory "
        "with the changes that would fit; or auto, admitted with the first of those changes that fits (a smaller "
        "size, guidance_scale 1, the model's int8 variant), the record's `fitted` saying what changed and why. "
        "A job that fits as it is, or that no change fits, is answered the same either way")
    webhook_url: str | None = Field(
        default=None, max_length=MAX_URL_CHARS,
        description="POSTed the job record (signed) when the job ends. An http(s) URL without credentials, "
        "whitespace or control characters, whose host resolves only to public addresses (loopback, private, "
        "link-local, multicast and reserved ones are refused unless the operator allowed their network)")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_syntax(v)
            except WebhookRefused as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _clean_text(cls, v: str | None) -> str | None:
        return v if v is None else check_text(v)

    @model_validator(mode="after")
    def _kind_fields(self) -> "JobCreate":
        if self.image is None:
            for name in ("mask", "strength", "upscale"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: needs an image (the init image this job starts from)")
        elif self.decoder == "tiny":
            raise ValueError("decoder: the tiny VAE decodes text-to-image jobs only (a job with an image decodes "
                             "with the model's own VAE, as its encoder encoded it)")
        if self.upscale is not None:
            if self.mask is not None:
                raise ValueError("mask: an upscale takes no mask (it refines the whole image)")
            for name in ("width", "height", "num_images"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name}: an upscale's size is its input's times `upscale`, one image: leave "
                                     f"width, height and num_images out")
        elif not self.prompt.strip():
            raise ValueError("prompt: must contain more than whitespace (only an upscale may leave it out)")
        return self

    @property
    def kind(self) -> str:
        if self.image is None:
            return "txt2img"
        return "upscale" if self.upscale else "inpaint" if self.mask is not None else "img2img"


class JobParameters(BaseModel):
    """The parameters a job runs with: the request after defaults (model, seed, and the model's own steps,
    guidance and size for those left out, always filled in)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    model: str
    kind: JobKind = "txt2img"
    strength: float | None = Field(default=None, description="image-to-image, inpainting, upscale: the strength")
    upscale: int | None = Field(default=None, description="an upscale's factor; width and height are then the "
                                "output's")
    tile: int | None = Field(default=None, description="an upscale: the side of the square tiles it is refined "
                             "in, chosen by admission so that a tile fits the memory class")
    decoder: Decoder | None = Field(default=None, description="tiny or full, as asked (none: the worker's "
                                    "default)")


class InputLink(BaseModel):
    """An image the job was given, as stored (decoded, checked, re-encoded as PNG)."""

    role: Literal["image", "mask"]
    width: int
    height: int
    source_format: str = Field(description="what it came as: PNG, JPEG or WEBP")
    url: str


class Progress(BaseModel):
    image: int = Field(description="0-based index of the image being made")
    images: int
    step: int = Field(description="denoising steps done for that image")
    steps: int


class ImageLink(BaseModel):
    index: int
    seed: int
    width: int
    height: int
    url: str


class PreviewLink(BaseModel):
    """The latest preview of a job being denoised (GET it at `url`): a small image of its latents."""

    url: str
    image: int = Field(description="0-based index of the image it shows")
    step: int = Field(description="the denoising steps done when it was taken")
    steps: int
    width: int = Field(description="pixels: the latents' size, an eighth of the image's side")
    height: int
    written_at: datetime


class JobError(BaseModel):
    code: str
    message: str


class AttemptRecord(BaseModel):
    """An earlier attempt of a job that was taken back (its worker lost) or handed back (`worker_left`: the
    worker stopped or its owner took the host back; not counted against SDFLEET_MAX_ATTEMPTS) and queued
    again."""

    attempt: int
    worker_host: str | None
    started_at: datetime | None
    ended_at: datetime
    error: JobError
    peak_rss_bytes: int | None = Field(description="the last memory reading of that attempt")


class ResumeRecord(BaseModel):
    """How an attempt that found a checkpoint started: from it, or again from step 0 and why."""

    attempt: int
    worker_host: str | None = Field(description="the host that ran this attempt")
    resumed: bool = Field(description="true: it went on from the checkpoint; false: it started again")
    image: int = Field(description="the image (0-based) the checkpoint was denoising")
    step: int = Field(description="the denoising steps the checkpoint had done (0 when it started again)")
    steps: int | None
    images_kept: int = Field(description="finished images of a multi-image job kept from earlier attempts")
    checkpoint_host: str | None = Field(description="the host that wrote the checkpoint")
    note: str = Field(description='e.g. "resumed from step 12 of 25 on host B", or why it started again')


class FitRecord(BaseModel):
    """What `fit: auto` changed of a job no live worker fitted as it was asked, and why."""

    changes: dict[str, str | int | float | None] = Field(
        description="the parameters changed, with the values the job runs with (those of its `parameters`); a "
        "change of model also takes that model's defaults for the fields the request left out")
    original: dict[str, str | int | float | None] = Field(
        description="the same parameters as they were asked (or defaulted, for the fields the request left out)")
    reason: str = Field(description="why the job as asked was not admitted: the refusal's message")
    hint: str = Field(description="the change taken: the message of the refusal's hint, with its prediction")


class JobPublic(BaseModel):
    id: str
    status: JobStatus
    parameters: JobParameters
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_wait_s: float | None = Field(description="created to (last) start")
    generation_s: float | None = Field(description="time in the pipeline, all images")
    peak_rss_bytes: int | None = Field(description="the job's own peak resident set (kernel VmHWM, reset per job)")
    peak_rss_anon_bytes: int | None = Field(description="peak anonymous RSS (heap, compiled weights)")
    peak_rss_file_bytes: int | None = Field(description="peak file-backed RSS (mmapped weights, reclaimable)")
    rss_before_bytes: int | None = Field(description="the worker's resident set when the job started")
    peak_rss_method: str | None = Field(
        description="vmhwm (kernel high-water mark), sampler (psutil), or partial (the last reading of a "
        "running job, or of one whose worker was lost)")
    predicted_peak_bytes: int | None = Field(description="what admission predicted this job would need")
    prediction_source: str | None = Field(description="profile (this shape measured), scaled, or prior")
    predicted_generation_s: float | None = Field(
        description="what admission predicted the generation (generation_s) would take on the workers of its "
        "memory class, from the seconds per step and per image their jobs measured; null: no job of the model "
        "measured time yet on those workers")
    fitted: FitRecord | None = Field(
        description="`fit: auto` only: what admission changed so that the job fits a live worker, "
        "and why; null when the job runs as it was asked")
    lever_set: str | None = Field(
        default=None, description="the lever set the job runs (ran) in: its worker's memory mode (fast, balanced, "
        "low, + levers set apart), or the one a worker with SDFLEET_MEMORY_MODE=auto chose for it; null until started")
    lever_reason: str | None = Field(
        default=None, description="why that set: the worker's memory mode, or auto's predicted peak in it against "
        "the worker's budget (and what the faster sets would have needed)")
    lever_predicted_bytes: int | None = Field(
        default=None, description="the worker's own prediction of the job's peak in that set, at its pre-check "
        "(admission's, `predicted_peak_bytes`, is the cheapest set's on an auto worker)")
    priority: Priority
    queue_position: int | None = Field(description="while queued: 1 is next for its model")
    expected_start_s: float | None = Field(
        description="while queued: in how many seconds it is expected to start (the predicted work of the jobs "
        "running on the workers that can take it and of those queued ahead, shared among those workers); null "
        "when that cannot be said (no such worker is ready, or some of that work has no measurement yet)")
    waiting_reason: str | None = Field(
        description="while queued: why no worker is taking it (every worker of its class paused, with the "
        "reason; all busy, with the jobs ahead; loading; none covers its memory class)")
    progress: Progress | None = Field(description="while running, updated at a bounded rate")
    preview: PreviewLink | None = Field(
        default=None, description="while it runs: its latest preview, taken at most every "
        "SDFLEET_PREVIEW_INTERVAL_S (null before the first, on workers with previews off, and once the job has "
        "ended: its images are the result)")
    cancel_requested: bool
    webhook_status: str | None = Field(description="pending, delivered or failed, for a job with a webhook_url")
    worker_host: str | None
    attempts: int
    memory_class_bytes: int | None = Field(description="the memory class (queue) the job was routed to: only "
                                           "workers whose budget covers it take it")
    handoffs: int = Field(description="times a worker's own pre-check handed it on to a larger class")
    history: list[AttemptRecord] = Field(description="earlier attempts taken back, oldest first")
    resumes: list[ResumeRecord] = Field(description="attempts that found a checkpoint: resumed or started "
                                        "again, oldest first")
    error: JobError | None
    images: list[ImageLink]
    inputs: list[InputLink] = Field(default=[], description="the images the job was given (init image, mask)")


class JobList(BaseModel):
    jobs: list[JobPublic] = Field(description="newest first; queued ones carry their queue_position")
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page; null on the last")


class MemorySample(BaseModel):
    t: float = Field(description="seconds since the job started")
    rss: int
    anon: int
    file: int
    phase: str = Field(description="start, encode (the prompt), encode_image (an init image through the VAE "
                       "encoder), denoise, decode, end")
    image: int


class JobMemoryPublic(BaseModel):
    job_id: str
    attempt: int
    interval_s: float
    peak_rss_bytes: int | None
    predicted_peak_bytes: int | None = Field(description="what admission predicted for the job")
    worker_budget_bytes: int | None = Field(description="the memory budget of the worker that ran it, as it "
                                            "announces it now (null once the worker is forgotten)")
    samples: list[MemorySample]
