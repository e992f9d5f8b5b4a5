"""The job contract: states and their one guarded transition table, the request and the public record."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import InvalidTransition
from shared.settings import MODEL_NAME_RE

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MAX_URL_CHARS = 2000

Priority = Literal["low", "normal", "high"]
PRIORITY_ORDER = {"high": 0, "normal": 1, "low": 2}


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

ALLOWED = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running -> queued: redelivery after the worker running it was lost
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def check_transition(old: JobStatus, new: JobStatus) -> None:
    if new not in ALLOWED[old]:
        raise InvalidTransition(f"a job cannot go from {old.value} to {new.value}")


class JobCreate(BaseModel):
    """What a client submits. Strict: no coercion of "512" to 512, no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int = Field(default=512, ge=64, le=2048)
    height: int = Field(default=512, ge=64, le=2048)
    steps: int = Field(default=20, ge=1, le=150)
    guidance_scale: float = Field(default=7.5, ge=0, le=30)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images: int = Field(default=1, ge=1, le=8)
    model: str | None = Field(default=None, max_length=200, pattern=MODEL_NAME_RE.pattern)
    priority: Priority = "normal"
    webhook_url: str | None = Field(default=None, max_length=MAX_URL_CHARS,
                                    description="POSTed the job record (signed) when the job ends")

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None:
            u = urlparse(v)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
        return v

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must contain more than whitespace")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE works on 8x8 pixel blocks), got {v}")
        return v


class JobParameters(BaseModel):
    """The parameters a job runs with: the request after defaults (model and seed always filled in)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    model: str


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


class JobError(BaseModel):
    code: str
    message: str


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
    priority: Priority
    queue_position: int | None = Field(description="while queued: 1 is next for its model")
    progress: Progress | None = Field(description="while running, updated at a bounded rate")
    cancel_requested: bool
    webhook_status: str | None = Field(description="pending, delivered or failed, for a job with a webhook_url")
    worker_host: str | None
    attempts: int
    error: JobError | None
    images: list[ImageLink]


class MemorySample(BaseModel):
    t: float = Field(description="seconds since the job started")
    rss: int
    anon: int
    file: int
    phase: str = Field(description="start, encode, denoise, decode, end")
    image: int


class JobMemoryPublic(BaseModel):
    job_id: str
    attempt: int
    interval_s: float
    peak_rss_bytes: int | None
    samples: list[MemorySample]


class WorkerPublic(BaseModel):
    name: str
    host: str
    model: str
    backend: str
    precision: str
    memory_mode: str = Field(description="how the worker runs its pipeline: fast, balanced, low (+ levers set apart)")
    budget_bytes: int
    cgroup_limit_bytes: int | None
    total_ram_bytes: int
    available_bytes: int
    resident_bytes: int = Field(description="RSS with the pipeline loaded, between jobs; for a pipeline that "
                                "releases components between jobs, its warm-up peak (what each job loads again)")
    current_job_id: str | None
    started_at: datetime
    last_seen: datetime
    alive: bool


class ProfilePublic(BaseModel):
    backend: str
    precision: str
    memory_mode: str
    width: int
    height: int
    images_per_pass: int
    guidance: bool
    peak_bytes: int
    base_bytes: int
    samples: int
    updated_at: datetime


class ModelPublic(BaseModel):
    name: str
    workers: int
    largest_budget_bytes: int
    runtimes: list[str] = Field(description="backend/precision/memory mode of the workers serving it")
    profiles: list[ProfilePublic]
