"""The database tables (SQLAlchemy 2). The database is the source of truth; Redis only carries job IDs."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, FetchedValue, Float, ForeignKey, Integer, LargeBinary, String, Text,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in and out; SQLite stores naive values, so the zone is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use shared.models.utcnow()")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(String(200), index=True)

    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)
    num_images: Mapped[int] = mapped_column(Integer)
    # txt2img, img2img, inpaint, upscale (shared.jobs.JobKind); the inputs are in job_inputs
    kind: Mapped[str] = mapped_column(String(16), default="txt2img", server_default="txt2img")
    strength: Mapped[float | None] = mapped_column(Float)
    upscale: Mapped[int | None] = mapped_column(Integer)
    tile: Mapped[int | None] = mapped_column(Integer)
    decoder: Mapped[str | None] = mapped_column(String(8))  # tiny or full, as asked (shared.jobs.Decoder)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    generation_s: Mapped[float | None] = mapped_column(Float)

    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_rss_anon_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_rss_file_bytes: Mapped[int | None] = mapped_column(BigInteger)
    rss_before_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_rss_method: Mapped[str | None] = mapped_column(String(16))

    predicted_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    prediction_source: Mapped[str | None] = mapped_column(String(16))
    # What admission predicted the generation would take on the workers of its class (None: none measured)
    predicted_generation_s: Mapped[float | None] = mapped_column(Float)
    # `fit: auto`: what admission changed so the job fits, and why (FitRecord); None: run as asked
    fitted: Mapped[dict | None] = mapped_column(JSON)
    # The lever set the job ran in (its worker's memory mode, or the one SDFLEET_MEMORY_MODE=auto chose for it,
    # e.g. "balanced") and why; None until a worker starts it
    lever_set: Mapped[str | None] = mapped_column(String(200))
    lever_reason: Mapped[str | None] = mapped_column(Text)
    lever_predicted_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the worker's own prediction in that set

    priority: Mapped[str] = mapped_column(String(8), default="normal")
    owner_key_id: Mapped[str | None] = mapped_column(String(36), index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Each enqueue gets a new delivery ID, carried by the message: a message from an older enqueue
    # (the reconciler re-sent the job) is recognised as stale and dropped.
    delivery_id: Mapped[str | None] = mapped_column(String(36))
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_name: Mapped[str | None] = mapped_column(String(255))
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    progress_step: Mapped[int | None] = mapped_column(Integer)
    progress_steps: Mapped[int | None] = mapped_column(Integer)
    progress_image: Mapped[int | None] = mapped_column(Integer)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # whether webhook_url is set: what a worker ending the job reads (its database role may not read the URL)
    has_webhook: Mapped[bool] = mapped_column(Boolean, default=False)
    webhook_status: Mapped[str | None] = mapped_column(String(16))  # pending, delivered, failed
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Each hand-out of a webhook gets a delivery ID, like a job's: a re-send by the reconciler replaces it
    # (compare-and-set), and a message of an older hand-out finds it changed and sends nothing.
    webhook_delivery_id: Mapped[str | None] = mapped_column(String(36))
    webhook_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the last delivery attempt began
    history: Mapped[list | None] = mapped_column(JSON)  # earlier attempts taken back (AttemptRecord dicts)
    # The memory class (queue) the job was routed to, and how often a worker handed it on to a larger one
    memory_class_bytes: Mapped[int | None] = mapped_column(BigInteger)
    handoffs: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts handed back politely (the worker stopped, or its owner took the host back): counted in
    # `attempts`, not against SDFLEET_MAX_ATTEMPTS
    leaves: Mapped[int] = mapped_column(Integer, default=0)
    # How each attempt started: resumed from a checkpoint, or again from step 0 and why (ResumeRecord dicts)
    resumes: Mapped[list | None] = mapped_column(JSON)

    worker_host: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    # PostgreSQL: the database role (session_user) whose statement last changed `status`, set by a trigger
    # whatever the statement says: a worker's role may change only the running jobs it claimed itself
    # (`sdfleet db worker-role`). NULL on SQLite.
    status_by: Mapped[str | None] = mapped_column(String(63))

    images: Mapped[list["JobImage"]] = relationship(
        back_populates="job", order_by="JobImage.index", cascade="all, delete-orphan", lazy="selectin"
    )
    inputs: Mapped[list["JobInput"]] = relationship(
        back_populates="job", order_by="JobInput.role", cascade="all, delete-orphan", lazy="selectin"
    )
    # The latest preview while it runs (shared/previews.py): loaded when read (list pages: selectinload, one
    # statement per page), its bytes deferred
    preview: Mapped["JobPreview | None"] = relationship(viewonly=True, uselist=False)


class JobImage(Base):
    """A generated PNG. Stored in the database so that any API host can serve any worker's output."""

    __tablename__ = "job_images"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    png: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images")


class JobInput(Base):
    """An image a job was given (its init image, its mask): decoded and checked by the API, stored as PNG (the
    worker never decodes what a client sent), kept and deleted with the job, as its outputs are."""

    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(8), primary_key=True)  # image, mask
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    source_format: Mapped[str] = mapped_column(String(8))  # PNG, JPEG, WEBP: what it came as
    png: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)

    job: Mapped[Job] = relationship(back_populates="inputs")


class Worker(Base):
    """A worker's heartbeat: what it serves, its memory budget and what its loaded pipeline holds."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid of the Celery main process
    host: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(200), index=True)
    backend: Mapped[str] = mapped_column(String(64))
    precision: Mapped[str] = mapped_column(String(16))
    memory_mode: Mapped[str] = mapped_column(String(200), default="fast")
    budget_bytes: Mapped[int] = mapped_column(BigInteger)
    cgroup_limit_bytes: Mapped[int | None] = mapped_column(BigInteger)
    total_ram_bytes: Mapped[int] = mapped_column(BigInteger)
    available_bytes: Mapped[int] = mapped_column(BigInteger)
    resident_bytes: Mapped[int] = mapped_column(BigInteger)  # RSS with the pipeline loaded, between jobs
    current_job_id: Mapped[str | None] = mapped_column(String(36))
    state: Mapped[str] = mapped_column(String(16), default="ready")  # loading, ready, paused
    state_reason: Mapped[str | None] = mapped_column(Text)
    max_budget_bytes: Mapped[int | None] = mapped_column(BigInteger)
    defaults: Mapped[dict | None] = mapped_column(JSON)  # ModelDefaults: its model's steps, guidance, size
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # PostgreSQL: the database role that inserted the row (its default, session_user): a worker's role may
    # change only its own rows. NULL on SQLite.
    db_role: Mapped[str | None] = mapped_column(String(63), server_default=FetchedValue())


class MemoryProfile(Base):
    """The largest peak measured for one job shape on one model, backend, precision and memory mode."""

    __tablename__ = "memory_profiles"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    backend: Mapped[str] = mapped_column(String(64), primary_key=True)
    precision: Mapped[str] = mapped_column(String(16), primary_key=True)
    memory_mode: Mapped[str] = mapped_column(String(200), primary_key=True)
    width: Mapped[int] = mapped_column(Integer, primary_key=True)
    height: Mapped[int] = mapped_column(Integer, primary_key=True)
    images_per_pass: Mapped[int] = mapped_column(Integer, primary_key=True)
    guidance: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    # whether the job's init image went through the VAE encoder (image-to-image, inpainting, upscale tiles)
    encodes: Mapped[bool] = mapped_column(Boolean, primary_key=True, default=False, server_default=sa_false())
    peak_bytes: Mapped[int] = mapped_column(BigInteger)
    base_bytes: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    max_step_s: Mapped[float | None] = mapped_column(Float)  # the slowest denoising step measured
    # Time (shared/timing.py), a moving average over this shape's complete jobs: seconds per UNet pass of a
    # denoising step, per image beside its steps (prompt encoding, decode, PNG), per job beside its images
    step_s: Mapped[float | None] = mapped_column(Float)
    image_overhead_s: Mapped[float | None] = mapped_column(Float)
    job_overhead_s: Mapped[float | None] = mapped_column(Float)
    # The worst job's first image before and during its decode (shared/memory.Profile), with its peak and base
    steps_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    decode_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)


class JobCheckpoint(Base):
    """A running job's progress, where any host can read it: the state of the image being denoised after
    `step` of `steps` (latents, scheduler, generator; opaque bytes of the runtime that wrote it), written by
    attempt `attempt`. Dropped when the job ends."""

    __tablename__ = "job_checkpoints"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    runtime: Mapped[str] = mapped_column(String(255))  # what must match to resume (model, backend, numerics)
    host: Mapped[str] = mapped_column(String(255))
    image: Mapped[int] = mapped_column(Integer)  # the image being denoised (the earlier ones are finished)
    step: Mapped[int | None] = mapped_column(Integer)  # denoising loop iterations done; None: none yet
    steps: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[bytes | None] = mapped_column(LargeBinary)
    written_at: Mapped[datetime] = mapped_column(UTCDateTime)


class JobCheckpointImage(Base):
    """An image of a multi-image job finished by an attempt that did not end it: kept for the next one."""

    __tablename__ = "job_checkpoint_images"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    runtime: Mapped[str] = mapped_column(String(255))
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    png: Mapped[bytes] = mapped_column(LargeBinary)


class JobPreview(Base):
    """The latest preview of a running job: the latents of image `image` after `step` of `steps`, projected to
    RGB and encoded small (`media_type`), written by attempt `attempt` at most every SDFLEET_PREVIEW_INTERVAL_S.
    Dropped when the job ends (its images are the result)."""

    __tablename__ = "job_previews"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    image: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    written_at: Mapped[datetime] = mapped_column(UTCDateTime)


class JobTombstone(Base):
    """What is left of a job that retention deleted: GET answers 410 with when and why."""

    __tablename__ = "job_tombstones"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_key_id: Mapped[str | None] = mapped_column(String(36), index=True)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    image_bytes: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)


class JobMemory(Base):
    """A job's memory timeline (its last attempt): samples with phase marks."""

    __tablename__ = "job_memory"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    interval_s: Mapped[float] = mapped_column(Float)
    timeline: Mapped[list] = mapped_column(JSON)


class ApiKey(Base):
    """An API key: only its SHA-256 is stored. The webhook secret signs the key's callbacks."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    webhook_secret: Mapped[str] = mapped_column(String(128))
    rate_limit_per_min: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
