"""The generate task's body: claim the job, check it fits this host, run it one image per pass under the
memory meter and guard, with progress and cancel checked at a bounded rate, and store the outcome, its
memory timeline, and what it teaches the memory profile. A Python exception fails the job (with its
code) and the worker goes on to the next one."""

from __future__ import annotations

import gc
import io
import logging
import threading
import time
from typing import Callable

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from shared import fleet, store
from shared.db import session_factory
from shared.errors import ErrorCode
from shared.jobs import JobParameters, JobStatus
from shared.memory import Shape, fmt_gb, guidance_on, predict
from worker.host import HOST, Host, Running
from worker.meter import JobMeter, MemoryBudgetExceeded, release_free_memory
from worker.pipelines import ImageRequest, settle

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    pass


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def shape_of(params: JobParameters) -> Shape:
    return Shape(params.width, params.height, guidance_on(params.guidance_scale))


class Monitor:
    """Writes a running job's progress and reads its cancel flag every `interval_s`, in its own thread:
    the denoising loop only touches memory (no database write per step on a fast model)."""

    def __init__(self, sessions, attempt: store.Attempt, interval_s: float):
        self.sessions, self.attempt, self.interval_s = sessions, attempt, interval_s
        self.position = (0, 0, attempt.parameters.steps)  # image, step, steps
        self.cancelled = threading.Event()
        self._written = None
        self._stop = threading.Event()

    def sync(self) -> None:
        position = self.position
        with self.sessions.begin() as session:
            if store.sync_running(session, self.attempt, position if position != self._written else None):
                self.cancelled.set()
        self._written = position

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except OperationalError:
                log.warning("progress of job %s not written: database unreachable", self.attempt.job_id)

    def __enter__(self) -> "Monitor":
        self.sync()  # a cancel asked for before the job started is seen before its first step
        self._thread = threading.Thread(target=self._run, name="sdfleet-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _generate_all(host: Host, params: JobParameters, meter: JobMeter, monitor: Monitor) -> list[store.GeneratedImage]:
    image_index = 0

    def on_step(step: int, total: int) -> None:
        monitor.position = (image_index, step, total)
        if monitor.cancelled.is_set():
            raise JobCancelled()
        meter.check()  # the guard: abort at the next step once the sampler saw the budget crossed
        meter.mark("decode" if step == total else "denoise")

    images = []
    for i in range(params.num_images):
        # one image per pass: N images cost the peak of one; seed + i makes image i reproducible alone
        image_index, seed = i, params.seed + i
        if monitor.cancelled.is_set():
            raise JobCancelled()
        meter.mark("encode", i)
        image = host.pipeline.generate(ImageRequest(
            prompt=params.prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, steps=params.steps, guidance_scale=params.guidance_scale, seed=seed,
        ), on_step)
        meter.check()
        images.append(store.GeneratedImage(index=i, seed=seed, width=image.width, height=image.height,
                                           png=_png(image)))
    return images


def _retrying(fn: Callable, what: str, patience_s: float = 60.0):
    """A finished job's result is worth waiting for a database that is away for a moment."""
    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            return fn()
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            log.warning("database unreachable while %s; retrying in %.1f s", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5)


def run_job(job_id: str, delivery_id: str | None, host: Host, notify: Callable[[str], None]) -> str:
    """Run one delivered job; returns the status it ended in (or 'skipped')."""
    try:
        return _run_job(job_id, delivery_id, host, notify)
    finally:
        host.running = None
        gc.collect()
        release_free_memory()
        settle(host.pipeline)


def _ended_with_webhook(sessions, job_id: str) -> bool:
    with sessions() as session:
        job = store.get_job(session, job_id)
        return job is not None and job.webhook_status == "pending"


def _run_job(job_id: str, delivery_id: str | None, host: Host, notify: Callable[[str], None]) -> str:
    settings = host.settings
    sessions = session_factory(settings.database_url)
    with sessions.begin() as session:
        attempt = store.start_attempt(session, job_id, delivery_id, HOST, host.name, settings.max_attempts)
    if attempt is None:
        log.info("job %s: nothing to run (unknown, stale delivery, finished, or out of attempts)", job_id)
        with sessions() as session:
            job = store.get_job(session, job_id)
            # this delivery may just have ended the job worker_lost: its webhook is due
            due = job is not None and job.error_code == ErrorCode.worker_lost.value and job.webhook_status == "pending"
        if due:
            notify(job_id)
        return "skipped"
    params = attempt.parameters

    def end(code: ErrorCode, message: str, reading=None, elapsed=None) -> str:
        with sessions.begin() as session:
            store.finish_failed(session, attempt, code, message, reading, elapsed)
        if _ended_with_webhook(sessions, job_id):
            notify(job_id)
        return JobStatus.cancelled.value if code is ErrorCode.cancelled else JobStatus.failed.value

    if params.model != host.model:
        return end(ErrorCode.model_unavailable, f"this worker serves {host.model!r}, not {params.model!r}")
    shape = shape_of(params)
    pipeline = host.pipeline
    with sessions() as session:
        known = fleet.profiles(session, host.model, pipeline.backend, pipeline.precision, host.memory_mode)
    expected = predict(shape, known, host.resident)
    if expected.bytes > host.budget:
        return end(ErrorCode.insufficient_memory, f"predicted peak {fmt_gb(expected.bytes)} ({expected.source}) "
                   f"exceeds this worker's budget of {fmt_gb(host.budget)}")

    meter = JobMeter(settings.memory_sample_interval_s, budget_bytes=host.budget)
    code = message = None
    t0 = time.perf_counter()
    try:
        with meter, Monitor(sessions, attempt, settings.progress_interval_s) as monitor:
            host.running = Running(attempt, meter)
            host.beat()  # at once, not at the next beat: a worker killed now still leaves a reading
            images = _generate_all(host, params, meter, monitor)
    except JobCancelled:
        code, message = ErrorCode.cancelled, "cancelled while running"
    except MemoryBudgetExceeded as exc:
        code, message = ErrorCode.out_of_memory, f"aborted: {exc}"
    except SoftTimeLimitExceeded:
        code, message = ErrorCode.timeout, f"the job ran past SDFLEET_JOB_TIMEOUT_S={settings.job_timeout_s}"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        code, message = ErrorCode.generation_failed, f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - t0
    reading = meter.reading

    def finish() -> bool:
        with sessions.begin() as session:
            if code is None:
                ok = store.finish_succeeded(session, attempt, images, elapsed, reading)
            else:
                ok = store.finish_failed(session, attempt, code, message, reading, elapsed)
            if ok:
                fleet.save_timeline(session, job_id, attempt.number, meter.interval_s, meter.timeline())
                if code is None:
                    # Only complete runs teach the profile: an aborted job's peak is a lower bound, and
                    # scaled to other sizes it would refuse jobs that fit.
                    fleet.record_profile(session, host.model, pipeline.backend, pipeline.precision,
                                         host.memory_mode, shape, reading.peak_rss_bytes, reading.rss_before_bytes)
            return ok

    ok = _retrying(finish, f"storing job {job_id}")
    status = "succeeded" if code is None else ("cancelled" if code is ErrorCode.cancelled else "failed")
    log.info("job %s %s in %.2f s, peak %s (predicted %s, %s)", job_id, status, elapsed,
             fmt_gb(reading.peak_rss_bytes), fmt_gb(expected.bytes), expected.source)
    if ok and _ended_with_webhook(sessions, job_id):
        notify(job_id)
    return status if ok else "superseded"
