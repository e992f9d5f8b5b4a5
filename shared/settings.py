"""The one settings class (env prefix SDFLEET_), read once per process; unsafe values are refused at start."""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.webhook_schedule import check_webhook_schedule

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")

# An API process's PostgreSQL pool (docs/operations.md, "The database pool"): connections kept open, more
# opened under load, and how long a request waits for one before it is answered 503 with Retry-After.
DB_POOL_SIZE, DB_MAX_OVERFLOW, DB_POOL_TIMEOUT_S = 5, 5, 10.0


def default_cache_dir() -> Path:
    """Where built models and compiled-model caches live: outside any checkout, shared by tests and the demo."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdfleet"


@dataclass(frozen=True)
class Levers:
    """How a worker runs its pipeline, resolved from the memory mode and any explicit override.

    - release_encoders: text encoders are compiled for the prompt encoding and released after it.
    - release_all: every component is compiled for its phase only (encode, denoise, decode) and released
      after it; recompiling imports the compiled blob from the cache, and the IR's weights are never read
      into the process again.
    - drop_file_pages: the weights' mmapped file pages (the IR's and the compiled blobs'; OpenVINO works from
      its own repacked copy) are dropped from the process with madvise while a component loads and runs its
      first inference, and after each job.
    - vae_tiles: decode the latents in overlapping 512x512-pixel tiles (an image's decoder activations are
      the largest single allocation at 1024x1024).
    - split_guidance: classifier-free guidance runs the UNet as two batch-1 passes (unconditional, then
      conditional) instead of one batch-2 pass: the UNet's activations are those of no guidance.
    - tiny_vae: a TAESD / TAESDXL decoder (an OpenVINO IR folder or hub ID) decodes instead of the model's own
      VAE: a fraction of its decode time and memory, at some loss of fine detail.
    """

    mode: str
    release_encoders: bool
    release_all: bool
    drop_file_pages: bool
    vae_tiles: bool
    split_guidance: bool
    static_shape: bool
    precision: str  # "auto": the device's default (bf16 on CPUs with AMX or AVX512-BF16, else f32)
    compile_threads: int | None
    mmap: bool
    tiny_vae: str | None = None

    @property
    def key(self) -> str:
        """What memory profiles are keyed by: the mode, and any lever set against it ("low-vae_tiles")."""
        preset = _MODE_PRESETS[self.mode]
        flips = [("+" if getattr(self, k) else "-") + k for k, v in preset.items() if getattr(self, k) != v]
        return self.mode + "".join(flips) + self.suffix

    @property
    def suffix(self) -> str:
        """What the key says beyond the mode levers (static shapes, a tiny VAE): the same in every set of an
        auto worker."""
        return ("+static" if self.static_shape else "") + ("+tiny_vae" if self.tiny_vae else "")

    def describe(self) -> str:
        on = [name for name in ("release_encoders", "release_all", "drop_file_pages", "vae_tiles", "split_guidance",
                                "static_shape") if getattr(self, name)]
        on += [f"tiny VAE {self.tiny_vae}"] if self.tiny_vae else []
        return f"{self.mode} ({', '.join(on) or 'everything resident'}; precision {self.precision}, mmap {self.mmap})"


_MODE_PRESETS = {
    "fast": dict(release_encoders=False, release_all=False, drop_file_pages=False, vae_tiles=False,
                 split_guidance=False),
    "balanced": dict(release_encoders=True, release_all=False, drop_file_pages=True, vae_tiles=False,
                     split_guidance=False),
    "low": dict(release_encoders=True, release_all=True, drop_file_pages=True, vae_tiles=True, split_guidance=True),
}


# SDFLEET_MEMORY_MODE=auto: a worker chooses among these for each job, the fastest first, the cheapest last
AUTO_SETS = ("fast", "balanced", "low")
_KEY_RE = re.compile(r"^(fast|balanced|low|auto)((?:[+-][a-z_]+)*)$")


def lever_set_keys(memory_mode: str) -> list[str]:
    """The profile keys of the lever sets a worker announcing `memory_mode` runs jobs in: its own, or for an
    auto worker ("auto", "auto+static") one per set of AUTO_SETS, fastest first."""
    if memory_mode == "auto" or memory_mode.startswith("auto+"):
        return [mode + memory_mode[len("auto"):] for mode in AUTO_SETS]
    return [memory_mode]


def job_decoder(memory_mode: str, kind: str, asked: str | None) -> str:
    """The decoder a job runs with on a worker announcing `memory_mode`: the one it asks for ("tiny", "full"),
    else the worker's tiny VAE ("+tiny_vae") for text-to-image, else the model's own VAE."""
    return asked or ("tiny" if memory_mode.endswith("+tiny_vae") and kind == "txt2img" else "full")


def decoded_key(key: str, decoder: str) -> str:
    """The profile key of a job decoded by `decoder` on a worker whose lever set has this key: a worker with a
    tiny VAE decodes a job that asks for the full decoder with the model's own VAE, measured as a worker
    without the tiny VAE would ("low+tiny_vae" -> "low")."""
    return key.removesuffix("+tiny_vae") if decoder == "full" else key


def decodes_in_tiles(key: str) -> bool:
    """Whether the lever set of a profile key ("low", "balanced+vae_tiles", "low-vae_tiles+static") decodes
    in tiles; False for a key it cannot read (a custom pipeline's)."""
    m = _KEY_RE.match(key)
    if m is None or m.group(1) == "auto":
        return False
    tiles = _MODE_PRESETS[m.group(1)]["vae_tiles"]
    for flip in re.findall(r"([+-])([a-z_]+)", m.group(2)):
        if flip[1] == "vae_tiles":
            tiles = flip[0] == "+"
    return tiles


ENV_PREFIX = "SDFLEET_"
# Variables of the prefix that are not settings: the test suite's and the benchmarks' own.
_NOT_SETTINGS = re.compile(r"^SDFLEET_(TEST|BENCH)_")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    database_url: str = "sqlite:///sdfleet.db"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # What a worker serves: an OpenVINO IR folder or a hub ID. `model_name` is what jobs ask for
    # (and names the queue); it defaults to the folder's or the hub ID's last part.
    model: str | None = None
    model_name: str | None = None
    backend: str = "optimum"  # "optimum", or "package.module:factory" for a custom Pipeline
    device: str = "CPU"
    warmup: bool = True  # one tiny generation at load, so weights are resident before the first job's meter
    # A worker's defaults for jobs that leave them out, over its model's own (read from the pipeline's files:
    # an LCM 4 steps at guidance 8, a turbo model 1 step without guidance, SD 1.5 20 at 7.5, ...).
    default_steps: int | None = Field(default=None, ge=1, le=150)
    default_guidance_scale: float | None = Field(default=None, ge=0, le=30)
    default_width: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    default_height: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)

    # The model a job gets when it names none (the API side).
    default_model: str | None = None

    # API authentication. "required": every route but /healthz and the web page's files (/, /static/) needs a
    # bearer key, /openapi.json, /docs and /redoc too (with no key created, every other request is 401:
    # revoking keys never opens the API). "off": open, for local use. "auto": off only
    # while the API listens on loopback and no key was ever created in this database, else required.
    auth: Literal["auto", "required", "off"] = "auto"
    # The address the API listens on (`sdfleet api --host` sets it); unknown counts as beyond loopback.
    api_host: str | None = None
    api_key: str | None = None  # the key the command-line client sends (sdfleet submit/status/up)
    api_url: str = "http://127.0.0.1:8000"  # the API the command-line client talks to
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Images a job is given (init image, mask): each file at most this many bytes, and decoded at most this many
    # pixels (2048 x 2048); the routes that take images (POST /v1/jobs, POST /v1/images/edits) take bodies of
    # max_body_bytes plus two such images in base64 (`upload_body_bytes`).
    max_image_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_image_pixels: int = Field(default=2048 * 2048, ge=64 * 64, le=8192 * 8192)
    # How long the HTTP server waits for a request's headers (from the connection, or from the request's first
    # byte on a kept-alive connection): past it, 408 and the connection closed (api/server.py)
    api_header_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # POST /v1/images/generations (the OpenAI-compatible route) waits this long for its job, then answers
    # an error naming the job ID (the job goes on; poll GET /v1/jobs/{id})
    images_wait_s: float = Field(default=300.0, gt=0, le=3600)
    # How long an API process trusts what it read of the fleet (live workers, memory profiles: what it admits
    # jobs by) and of an API key it found (a revocation takes effect within this). A refusal is always
    # decided on a fresh read. 0 reads both for every request.
    api_cache_s: float = Field(default=1.0, ge=0, le=60)
    # The API process's PostgreSQL connection pool (`sdfleet api --workers N`: one each): connections kept open,
    # more opened under load, and how long a request waits for a free one before the answer is 503 with
    # Retry-After. Small on purpose (docs/operations.md, "The database pool"); SQLite is not pooled by these.
    db_pool_size: int = Field(default=DB_POOL_SIZE, ge=1, le=1000)
    db_max_overflow: int = Field(default=DB_MAX_OVERFLOW, ge=0, le=1000)
    db_pool_timeout_s: float = Field(default=DB_POOL_TIMEOUT_S, gt=0, le=300)

    # Webhook receivers: loopback, private, link-local, multicast and reserved addresses are refused unless
    # they fall in one of these networks (comma-separated CIDRs, e.g. "10.1.2.0/24,127.0.0.1/32").
    webhook_allow_networks: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=300)  # one delivery, from lookup to last byte
    # An ops worker sends this many webhooks at once (threads), at most webhook_per_receiver of them to one
    # receiver (a URL's host and port): the rest of that receiver's wait their turn, taking no thread
    webhook_concurrency: int = Field(default=64, ge=1, le=1024)
    webhook_per_receiver: int = Field(default=4, ge=1, le=1024)

    # Retention, enforced by the ops worker: finished jobs older than this many days are deleted, and the
    # oldest finished jobs go first while their PNGs add up to more than the byte cap. 0 keeps everything.
    retention_days: float = Field(default=0, ge=0)
    retention_max_image_bytes: int = Field(default=0, ge=0)

    # A worker's memory budget: explicit, else min(cgroup limit, RAM) minus the reserve.
    memory_budget: int | None = Field(default=None, gt=0)
    memory_reserve: int = Field(default=1 << 30, ge=0)
    heartbeat_s: float = Field(default=5.0, gt=0, le=300)
    worker_stale_s: float = Field(default=30.0, gt=0)  # no heartbeat for this long: gone, not capacity
    # a gone worker is listed (alive false) for this long after its last heartbeat, then forgotten
    worker_forget_s: float = Field(default=3600.0, gt=0)

    progress_interval_s: float = Field(default=0.5, gt=0, le=60)  # progress writes and cancel checks
    reconcile_interval_s: float = Field(default=15.0, gt=0)
    reconcile_grace_s: float = Field(default=30.0, ge=0)  # younger jobs are left alone by the reconciler
    webhook_secret: str | None = None  # signs webhooks of jobs submitted without a key (an open API)
    webhook_max_attempts: int = Field(default=6, ge=1, le=20)

    max_attempts: int = Field(default=2, ge=1, le=20)
    # A running job's checkpoint (its latents, step, scheduler and generator state, and the images a
    # multi-image job has finished) is written at most this often, so another host resumes where it stopped;
    # 0 writes one after every step. At most this much work is lost when a host goes away (plus one step).
    checkpoint_interval_s: float = Field(default=10.0, ge=0, le=3600)
    # While a job denoises, a preview of its latents (a linear projection to RGB, a small JPEG at the latents'
    # size: an eighth of the image's side) is written at most this often, for GET /v1/jobs/{id}/preview, the
    # page and `sdfleet submit --preview`; 0: no previews (the denoising loop then does nothing for them).
    preview_interval_s: float = Field(default=2.0, ge=0, le=3600)
    # A worker paused by its owner (CPU or memory) for longer than this while a job runs hands the job back
    # with its checkpoint, so that another host continues it; 0 never hands back for a pause.
    pause_handback_s: float = Field(default=60.0, ge=0)

    # Longest a job may run. Redis redelivers an unacknowledged task after the visibility timeout,
    # so that is derived from this and must stay above it (checked below).
    job_timeout_s: int = Field(default=3600, ge=10)
    visibility_timeout_s: int | None = None
    model_load_timeout_s: int = Field(default=1800, ge=10)

    # How a worker trades speed for memory (see Levers); each lever can be set on its own, overriding the mode.
    # auto: each job runs in the fastest of fast, balanced and low whose predicted peak fits the budget
    memory_mode: Literal["fast", "balanced", "low", "auto"] = "balanced"
    release_encoders: bool | None = None
    release_all: bool | None = None
    drop_file_pages: bool | None = None
    vae_tiles: bool | None = None
    split_guidance: bool | None = None
    static_shape: bool = False  # compile for each job's exact shape (recompiled when the next one differs)
    inference_precision: Literal["auto", "bf16", "f16", "f32"] = "auto"
    compile_threads: int | None = Field(default=None, ge=1, le=1024)
    enable_mmap: bool = True  # read IR weights by mmap (file-backed, reclaimable) rather than into memory
    # A TAESD / TAESDXL decoder in OpenVINO IR (a folder or a hub ID, e.g. fastsdcpu's deinferno/taesd-openvino;
    # `sdfleet model export-tiny-vae` converts madebyollin/taesd) that decodes instead of the model's own VAE
    tiny_vae: str | None = None

    memory_sample_interval_s: float = Field(default=0.02, gt=0, le=5)

    # A worker on someone's desktop yields to the owner: its budget follows the memory actually available
    # (MemAvailable + its own RSS - the reserve, capped by the budget above), and it takes no job while the
    # owner's programs use more than pause_cpu_percent of all CPUs (averaged over pause_window_s; 100 never
    # pauses) or available memory is below pause_available_bytes (0 never pauses). The pipeline runs at the
    # lowest CPU priority: idle (SCHED_IDLE for the inference threads, nice 19), low (nice 19) or normal.
    budget_follows_available: bool = True
    pause_cpu_percent: float = Field(default=50.0, ge=0, le=100)
    pause_available_bytes: int = Field(default=1 << 30, ge=0)
    pause_window_s: float = Field(default=30.0, gt=0, le=3600)
    cpu_priority: Literal["idle", "low", "normal"] = "idle"

    cache_dir: Path = Field(default_factory=default_cache_dir)
    # OpenVINO, NNCF and Hugging Face's libraries report usage unless declined: sdfleet declines for them at
    # every entry (shared/telemetry.py, read from the environment before these settings); true leaves it to
    # the libraries' own consent (OpenVINO's `opt_in_out`, HF_HUB_DISABLE_TELEMETRY)
    library_telemetry: bool = False

    @field_validator("model_name", "default_model")
    @classmethod
    def _model_name_shape(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a model name (letters, digits and ._/- only, at most 200)")
        return v

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ValueError("SDFLEET_DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL")
        if v.startswith("postgresql:") and not v.startswith("postgresql+"):
            # psycopg 3 is the driver we install; the bare scheme would ask SQLAlchemy for psycopg2
            v = "postgresql+psycopg:" + v[len("postgresql:") :]
        return v

    @field_validator("webhook_allow_networks")
    @classmethod
    def _networks(cls, v: str) -> str:
        for part in filter(None, (p.strip() for p in v.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError as exc:
                raise ValueError(f"SDFLEET_WEBHOOK_ALLOW_NETWORKS: {part!r} is not a network ({exc})") from exc
        return v

    @property
    def webhook_allowed(self) -> tuple:
        return tuple(ipaddress.ip_network(p.strip(), strict=False)
                     for p in self.webhook_allow_networks.split(",") if p.strip())

    @property
    def api_on_loopback(self) -> bool:
        return self.api_host in LOOPBACK_HOSTS

    def auth_required(self, any_key_ever: bool) -> bool:
        """Whether the API demands a key (see `auth`)."""
        if self.auth != "auto":
            return self.auth == "required"
        return any_key_ever or not self.api_on_loopback

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, data):
        # A typo'd setting (SDFLEET_AUTHH=required) must not be silently ignored
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known
                         and not _NOT_SETTINGS.match(k.upper()))
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name.upper(), known, n=1)
                hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
            raise ValueError("unknown setting(s) in the environment: " + ", ".join(hints)
                             + "; see the Settings table in docs/operations.md")
        return data

    @model_validator(mode="after")
    def _safe_combinations(self) -> "Settings":
        if self.worker_stale_s <= 2 * self.heartbeat_s:
            raise ValueError(
                "SDFLEET_WORKER_STALE_S must exceed twice SDFLEET_HEARTBEAT_S, or live workers look gone"
            )
        check_webhook_schedule(self.webhook_timeout_s, self.webhook_max_attempts)
        if self.memory_mode == "auto":
            fixed = [f"SDFLEET_{k.upper()}" for k in _MODE_PRESETS["fast"] if getattr(self, k) is not None]
            if fixed:
                raise ValueError(f"SDFLEET_MEMORY_MODE=auto chooses the lever sets {', '.join(AUTO_SETS)} for each "
                                 f"job; {', '.join(fixed)} would fix a lever of all of them: unset it, or choose a mode")
        if self.visibility_timeout_s is not None and self.visibility_timeout_s <= self.job_timeout_s:
            raise ValueError(
                "SDFLEET_VISIBILITY_TIMEOUT_S must exceed SDFLEET_JOB_TIMEOUT_S: Redis would hand a "
                "still-running job to a second worker"
            )
        return self

    @property
    def upload_body_bytes(self) -> int:
        """The largest body of a route that takes images: the usual limit plus two images in base64 (4/3 of
        their bytes) and a multipart body's part headers."""
        return self.max_body_bytes + 2 * (-(-self.max_image_bytes * 4 // 3)) + 16 * 1024

    @property
    def levers(self) -> Levers:
        """The lever set a worker starts in: its memory mode's (with the levers set apart), or for auto the
        cheapest of its sets (the one admission judges it by)."""
        return self.lever_sets[-1]

    @property
    def lever_sets(self) -> list[Levers]:
        """The lever sets a worker runs jobs in, fastest first: one, or with auto one per mode of AUTO_SETS."""
        modes = AUTO_SETS if self.memory_mode == "auto" else (self.memory_mode,)
        out = []
        for mode in modes:
            preset = _MODE_PRESETS[mode]
            chosen = {k: (v if getattr(self, k) is None else getattr(self, k)) for k, v in preset.items()}
            out.append(Levers(mode=mode, static_shape=self.static_shape, precision=self.inference_precision,
                              compile_threads=self.compile_threads, mmap=self.enable_mmap,
                              tiny_vae=self.tiny_vae or None, **chosen))
        return out

    @property
    def announced_mode(self) -> str:
        """What a worker announces as its memory mode: its lever set's key, or "auto" (+ static, tiny VAE)."""
        levers = self.levers
        return "auto" + levers.suffix if self.memory_mode == "auto" else levers.key

    @property
    def broker_visibility_timeout(self) -> int:
        return self.visibility_timeout_s or self.job_timeout_s * 2 + 60

    @property
    def served_model_name(self) -> str:
        """The name under which a worker serves `model` (and the queue it consumes)."""
        if self.model_name:
            return self.model_name
        if not self.model:
            raise ValueError("SDFLEET_MODEL is not set: a worker must be told which model it serves")
        name = Path(self.model.rstrip("/")).name if os.path.isdir(self.model) else self.model
        if not MODEL_NAME_RE.match(name):
            raise ValueError(f"cannot derive a model name from {self.model!r}; set SDFLEET_MODEL_NAME")
        return name


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
