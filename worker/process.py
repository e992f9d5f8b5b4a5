"""This worker process's place in the fleet: its memory budget, its heartbeat into the database, and the
job it is running (whose latest memory reading the heartbeat keeps on the job's row, so that a worker
killed mid-job leaves its last reading behind)."""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import psutil

from shared import fleet, jobstore
from shared.db import session_factory
from shared.fleet_contract import WorkerState
from shared.memory import choose_kept, fmt_size, read_host_budget
from shared.models import utcnow
from shared.settings import Settings
from worker.family import worker_defaults
from worker.meter import JobMeter, release_free_memory, rss_bytes
from worker.owner import Consumers, OwnerWatch
from worker.pipelines import Pipeline

log = logging.getLogger(__name__)

HOST = socket.gethostname()
# A worker keeps the last job's runtime buffers for a next job of the same kind; this long without a job, it
# gives them back (the host's owner may want the memory)
BUFFERS_IDLE_S = 30.0


def worker_name() -> str:
    """One name for the Celery worker (host and the main process's pid), kept when its pool child is replaced."""
    return f"{HOST}:{os.getppid()}"


def take_back_orphans(settings: Settings) -> None:
    """Run by a pool child as it starts, before loading its model: if it replaces one that died (SIGKILL, the
    OOM killer), the job that one was running goes back to queued at once, its attempt in the history (or
    ends timeout / worker_lost), instead of showing `running` on a dead process until its message comes round
    again. Celery has already put the message back (late ack, reject on worker lost): its delivery ID is kept."""
    with session_factory(settings.database_url).begin() as session:
        for job in jobstore.running_on(session, worker_name()):
            lost = f"the worker process running attempt {job.attempts} on {job.worker_host} died"
            taken = jobstore.take_back(session, job, lost, settings.max_attempts, settings.job_timeout_s,
                                       keep_delivery=True)
            log.warning("job %s: %s; %s", job.id, lost, taken.outcome.value)


class Beacon:
    """The worker's heartbeat thread. Started as the pool child starts, before the child lowers its CPU
    priority (a thread keeps the priority it was started with), so the owner's busy CPUs cannot silence it:
    it says `loading` while the model loads (the worker stays alive and its model served), then beats the
    worker's full heartbeat once `worker` is set."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.worker: WorkerProcess | None = None
        self._sessions = session_factory(settings.database_url)

    def _beat(self) -> None:
        if self.worker is not None:
            self.worker.beat()
            return
        with self._sessions.begin() as session:
            fleet.mark_loading(session, worker_name(), "the pool child is loading the model")

    def _run(self) -> None:
        while True:
            time.sleep(self.settings.heartbeat_s)
            try:
                self._beat()
            except Exception:  # the database may be away for a while; the next beat tries again
                log.warning("heartbeat not written", exc_info=True)

    def start(self) -> "Beacon":
        try:
            self._beat()
        except Exception:
            log.warning("heartbeat not written", exc_info=True)
        threading.Thread(target=self._run, name="sdfleet-heartbeat", daemon=True).start()
        return self

    def serve(self, worker: "WorkerProcess") -> None:
        """The model is loaded: from now on the beats are the WorkerProcess's (the first one at once)."""
        self.worker = worker
        worker.try_beat()


@dataclass
class RunningJob:
    attempt: jobstore.Attempt
    meter: JobMeter


class WorkerProcess:
    """This worker process's state: the pipeline it serves, its budget (following the owner), what a job
    starts from (`resident`), its pause state, the job it is running, and the heartbeat that says all of it."""

    def __init__(self, settings: Settings, pipeline: Pipeline, consumers: Consumers | None = None):
        self.settings = settings
        self.pipeline = pipeline
        self.model = settings.served_model_name
        # the model's steps, guidance and size, and the operator's; the kinds of job its pipeline runs
        self.defaults = worker_defaults(settings).model_copy(
            update={"tasks": list(getattr(pipeline, "tasks", ("txt2img",)))})
        # the lever sets jobs run in, fastest first: the pipeline's own, or with SDFLEET_MEMORY_MODE=auto one per
        # mode, switched between jobs (announced as "auto": admission judges a job by the cheapest)
        auto = settings.memory_mode == "auto" and hasattr(pipeline, "use_levers")
        self.lever_sets = settings.lever_sets if auto else [pipeline.levers]
        self.memory_mode = settings.announced_mode if auto else pipeline.memory_mode
        self.name = worker_name()
        # the configured budget is the ceiling; what the worker announces and checks follows the owner (beat)
        self.configured_budget, self.cgroup_limit = read_host_budget(settings.memory_reserve,
                                                                     settings.memory_budget)
        self.budget = self.configured_budget
        self.owner = OwnerWatch(settings, os.getppid())
        self.consumers = consumers
        self.state, self.state_reason = "ready", None
        self.started_at = utcnow()
        # The runtime's buffers of the last job, kept for a next job of the same kind (its lever set, decoder
        # and shape) while the worker is busy with jobs: (that kind, what they hold, measured once per kind by
        # giving them back), or None. A task holds the lock while it runs; the heartbeat gives them back
        # after BUFFERS_IDLE_S without a job, only with the lock.
        self.buffers: tuple[tuple, int] | None = None
        self.buffer_sizes: dict[tuple, int] = {}
        self.buffer_lock = threading.Lock()
        self.idle_since = time.monotonic()
        self._settle()
        self.resident = self.resident_for(self.lever_sets[-1])
        self.start_resident = self.resident  # what the running job started from, in the set it runs in
        self.running: RunningJob | None = None
        self.busy = False  # inside a task (from before its claim to its end)
        self.stopping: str | None = None  # why the worker is stopping (SIGTERM): jobs are handed back
        self.paused_leave: str | None = None  # why the running job is handed back after a long pause
        self._paused_since: float | None = None
        self._sessions = session_factory(settings.database_url)
        log.info("worker %s: budget %s (cgroup limit %s), resident %s, precision %s, memory mode %s", self.name,
                 fmt_size(self.budget), fmt_size(self.cgroup_limit) if self.cgroup_limit else "none",
                 fmt_size(self.resident), pipeline.precision, self.memory_mode)
        d = self.defaults
        log.info("model family %s (%s, %s): defaults %d steps, guidance %g, %dx%d%s", d.family, d.pipeline, d.scheduler,
                 d.steps, d.guidance_scale, d.width, d.height,
                 f" (set by the operator: {', '.join(d.overridden)})" if d.overridden else "")

    def _settle(self) -> None:
        """What jobs in the lever set now start from. A pipeline that releases components between jobs loads
        them again in every job (the text encoders in balanced mode, every component in low mode): what that
        costs above the RSS between jobs is measured once, at the warm-up (its peak above what stays resident
        after it)."""
        levers = self.pipeline.levers
        releases = levers.release_all or levers.release_encoders
        peak = getattr(self.pipeline, "warm_peaks", {}).get(levers.key, self.pipeline.warm_peak)
        self.floor = peak if releases else 0
        self.reload_bytes = max(0, self.floor - self.rss_own())
        self.encode_bytes = 0  # what the last job's prompt encoding took above its start (set after each job)
        self.last_start = 0  # the RSS the last job started at (the model's caches grow with the shapes run)

    def use_levers(self, key: str) -> None:
        """Run the next job in the lever set of this key (an auto worker's choice; a no-op in the set now)."""
        if key == self.pipeline.levers.key:
            return
        self.pipeline.use_levers(self._levers_of(key))
        self.pipeline.keep(())  # the choice of what the new set keeps is the next job's
        gc.collect()
        release_free_memory()
        self._settle()

    def resident_for(self, levers) -> int:
        """What a job in this lever set would start from: in the set now, the resident figure (_resident);
        in another, what its warm-up peaked at (low mode: one phase's components loaded), or where the set keeps
        components between jobs, the largest warm-up peak (everything compiled); without warm-ups, the RSS now."""
        if levers.key == self.pipeline.levers.key:
            return self._resident()
        peaks = getattr(self.pipeline, "warm_peaks", {})
        if not peaks:  # no warm-up (SDFLEET_WARMUP=false): what it holds now, everything it has compiled
            return rss_bytes()
        return peaks.get(levers.key, max(peaks.values())) if levers.release_all else max(peaks.values())

    def _resident(self) -> int:
        """What the next job starts from: the RSS between jobs (the runtime's buffers given back, what still
        grows with the shapes run kept) plus what each job loads again (measured at the warm-up, and as the last job
        encoded its prompt: SDXL's two text encoders, compiled per job in balanced mode, hide under the
        warm-up's UNet peak), or the RSS the last job started at if higher (file pages dropped between
        jobs come back as a job starts), and never below the warm-up's peak for such a pipeline. All of it in
        the lever set's own way: without the components kept compiled though the set releases them (they are
        counted apart, in each job's choice of what to keep), and without the last job's buffers kept for the
        next (a job of another kind starts with them given back; one of the same kind reuses them)."""
        return max(self.rss_own() + max(self.reload_bytes, self.encode_bytes), self.floor, self.last_start)

    def rss_own(self) -> int:
        """The RSS now in the lever set's own way: less what the components kept compiled though the set
        releases them hold, and less the last job's buffers kept for the next."""
        return rss_bytes() - self.kept_now()

    def kept_now(self) -> int:
        """What is held now beyond the lever set's own way: kept components and kept buffers."""
        return sum(self.pipeline.kept_compiled().values()) + (self.buffers[1] if self.buffers else 0)

    def release_buffers(self, kind: tuple | None = None) -> None:
        """Give the runtime's buffers back (after a job, or before one of another kind than they were kept for).
        With the kind of the job that just ran: the first job of a kind gives them back and measures what they
        held; later ones of a kind so measured keep them for the next job."""
        if kind is not None and kind in self.buffer_sizes:
            self.buffers = (kind, self.buffer_sizes[kind])
            return
        before = rss_bytes()
        held = self.pipeline.held_buffers()  # the kept components' (counted with them, in kept_compiled)
        self.pipeline.release_buffers()
        release_free_memory()
        self.buffers = None
        if kind is not None:
            self.buffer_sizes[kind] = max(0, before - rss_bytes() - held)
            log.info("the runtime's buffers for %s held %s: kept from now on for a next job of that kind",
                     kind[2], fmt_size(self.buffer_sizes[kind]))

    def release_idle_buffers(self) -> None:
        """From the heartbeat: buffers kept through BUFFERS_IDLE_S without a job go back (never while a task
        runs: it holds the lock)."""
        if self.buffers is None or time.monotonic() - self.idle_since < BUFFERS_IDLE_S:
            return
        if self.buffer_lock.acquire(blocking=False):
            try:
                if not self.busy and self.buffers is not None:
                    self.release_buffers()
                    log.info("the last job's buffers given back after %.0f s without a job", BUFFERS_IDLE_S)
            finally:
                self.buffer_lock.release()

    def keep_for(self, key: str, prediction_bytes: int, task: str, decoder: str | None,
                 kind: tuple) -> tuple[tuple[str, ...], tuple[str, ...], int]:
        """What of the components the lever set of `key` releases stays compiled through a job of this task and
        decoder, and of those, which keep their runtime buffers too (where measured in a job of this `kind`):
        the components first, then their buffers, each the smallest first, while the job's prediction plus all
        kept stays under the budget (choose_kept). Returns (components, buffers, what all of it holds)."""
        kept, weights = choose_kept(prediction_bytes, self.budget,
                                    self.pipeline.releasable(self._levers_of(key), task, decoder))
        buffers, buffer_bytes = choose_kept(prediction_bytes + weights, self.budget,
                                            self.pipeline.buffer_sizes(kept, kind)) if kept else ((), 0)
        return kept, buffers, weights + buffer_bytes

    def _levers_of(self, key: str):
        (levers,) = [lv for lv in self.lever_sets if lv.key == key]
        return levers

    @property
    def leave_reason(self) -> str | None:
        """Why the running job must be handed back at its next step, or None."""
        return self.stopping or self.paused_leave

    def stop(self, why: str) -> None:
        """The worker is stopping: the running job checkpoints at its next step and is handed back."""
        if self.stopping is None:
            log.warning("worker %s stopping (%s): the running job is handed back at its next step", self.name, why)
            self.stopping = why

    def follow_owner(self) -> None:
        """Budget, pause and the classes consumed, from the owner's use of the host now. A job running through a
        pause longer than SDFLEET_PAUSE_HANDBACK_S is handed back, for a host whose owner is away."""
        self.owner.sample()
        rss = rss_bytes()
        self.budget = self.owner.budget(self.configured_budget, rss)
        reason = self.owner.pause_reason(max(0, rss - self.start_resident) if self.running else 0)
        if (reason is None) != (self.state_reason is None):
            log.warning("worker %s %s", self.name, f"paused: {reason}" if reason else "resumes taking jobs")
        self.state, self.state_reason = ("paused", reason) if reason else ("ready", None)
        now = time.monotonic()
        self._paused_since = (self._paused_since or now) if reason else None
        limit = self.settings.pause_handback_s
        if reason and self.running is not None and limit and now - self._paused_since >= limit \
                and self.paused_leave is None:
            self.paused_leave = (f"paused by the host's owner for {now - self._paused_since:.0f} s "
                                 f"(SDFLEET_PAUSE_HANDBACK_S={limit:g}): {reason}")
        if self.consumers is not None:
            try:
                self.consumers.follow(self.budget, paused=reason is not None)
            except Exception:  # Redis away: the next beat tries again
                log.warning("could not change the queues consumed", exc_info=True)

    def try_beat(self) -> None:
        try:
            self.beat()
        except Exception:  # the database may be away for a moment; the heartbeat thread tries again
            log.warning("heartbeat not written", exc_info=True)

    def beat(self) -> None:
        running = self.running
        if running is None:
            self.release_idle_buffers()
            self.resident = self.resident_for(self.lever_sets[-1])
        self.follow_owner()
        ram = psutil.virtual_memory()
        hb = WorkerState(
            name=self.name, host=HOST, model=self.model, backend=self.pipeline.backend,
            precision=self.pipeline.precision, memory_mode=self.memory_mode, budget_bytes=self.budget,
            cgroup_limit_bytes=self.cgroup_limit,
            total_ram_bytes=ram.total, available_bytes=ram.available,
            # what a job starts from, with the components kept compiled: admission's predictions count them
            resident_bytes=self.resident + sum(self.pipeline.kept_compiled().values()),
            current_job_id=running.attempt.job_id if running else None,
            state=self.state, state_reason=self.state_reason, max_budget_bytes=self.configured_budget,
            defaults=self.defaults,
        )
        with self._sessions.begin() as session:
            fleet.beat(session, hb, self.started_at)
            if running is not None:
                jobstore.note_peak(session, running.attempt, running.meter.peak_so_far)
