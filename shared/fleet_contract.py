"""The fleet's contract: what a worker announces in its heartbeat, and what the API answers about workers,
models, their memory profiles and a job's plan (`/v1/workers`, `/v1/models`, `/v1/plan`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from shared.jobs import FitRecord, ModelDefaults


class WorkerState(BaseModel):
    """What a worker says of itself in every heartbeat: the one schema of a worker's row, its public record
    (plus the times and `alive`) and its heartbeat. A new field goes here and in the table."""

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
    resident_bytes: int = Field(description="what the next job starts from: RSS with the pipeline loaded, "
                                "between jobs, plus what each job loads again for a pipeline that releases "
                                "components between jobs (measured at the warm-up)")
    current_job_id: str | None
    state: Literal["loading", "ready", "paused"] = Field(
        default="ready", description="loading (its pool child is loading the model: still counted, jobs wait), "
        "ready, or paused (the host's owner is busy: it takes no job; the reason says why)")
    state_reason: str | None = None
    max_budget_bytes: int | None = Field(
        default=None, description="the configured budget: what `budget_bytes` comes back to when the host's "
        "owner leaves the memory free (with SDFLEET_BUDGET_FOLLOWS_AVAILABLE the announced one is lower meanwhile)")
    defaults: ModelDefaults | None = Field(
        default=None, description="the model's defaults and limits as this worker runs it (null while it loads "
        "for the first time)")


class WorkerPublic(WorkerState):
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
    encodes: bool = Field(default=False, description="jobs with an init image (image-to-image, inpainting, an "
                          "upscale's tiles): the VAE encoder ran first")
    peak_bytes: int
    base_bytes: int
    samples: int
    updated_at: datetime
    step_s: float | None = Field(default=None, description="seconds per UNet pass of a denoising step (a moving "
                                 "average of its jobs' median step; guidance split in two passes counts two)")
    image_overhead_s: float | None = Field(default=None, description="seconds per image beside its steps: prompt "
                                           "encoding, decode, PNG")
    job_overhead_s: float | None = Field(default=None, description="seconds per job beside its images")


class ModelPublic(BaseModel):
    name: str
    workers: int
    largest_budget_bytes: int
    runtimes: list[str] = Field(description="backend/precision/memory mode of the workers serving it")
    defaults: ModelDefaults = Field(description="what a job that leaves steps, guidance or size out gets (the "
                                    "largest live worker's, when workers disagree)")
    profiles: list[ProfilePublic]


class WorkerPlan(BaseModel):
    name: str
    host: str
    state: str
    backend: str
    precision: str
    memory_mode: str
    budget_bytes: int
    class_limit_bytes: int = Field(description="the largest memory class the budget covers: the jobs it takes")
    resident_bytes: int
    predicted_peak_bytes: int
    prediction_source: str
    detail: str
    memory_class_bytes: int | None = Field(description="the class that holds the prediction (null: none does)")
    fits: bool


class ModePlan(BaseModel):
    backend: str
    precision: str
    memory_mode: str
    predicted_peak_bytes: int = Field(description="from this runtime's measured profiles alone (a worker "
                                      "adds its own resident floor)")
    prediction_source: str
    detail: str


class PlanFit(FitRecord):
    """What a submission of a refused shape with `fit: auto` would be admitted with."""

    predicted_peak_bytes: int = Field(description="the prediction of the job as changed")
    memory_class_bytes: int = Field(description="the queue it would be routed to")


class PlanPublic(BaseModel):
    """What admission would decide for a job of this shape, worker by worker."""

    model: str
    width: int
    height: int
    guidance_scale: float = Field(description="as given, or the model's default")
    guidance: bool = Field(description="whether the job runs classifier-free guidance (a scale above 1, on a "
                           "model whose guidance doubles the UNet's batch)")
    num_images: int = Field(description="images run one pass each: the peak does not grow with the count")
    admitted: bool
    memory_class_bytes: int | None = Field(description="the queue a submission would be routed to")
    message: str
    workers: list[WorkerPlan] = Field(description="live workers serving the model, largest budget first")
    modes: list[ModePlan] = Field(description="one per runtime (backend/precision/memory mode) with profiles")
    hints: list[dict] = Field(description="when no worker fits: changes that would, as in a refusal")
    fit: PlanFit | None = Field(description="when no worker fits: what a submission with `fit: auto` would be "
                                "admitted with (the first hint that fits, admitted again); null when the shape "
                                "fits as it is, or when no change fits (`fit: auto` is refused too)")
