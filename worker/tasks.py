"""The generate task's body: claim the job, check it fits this host, run it one image per pass under the
memory meter and guard, store the outcome, its memory timeline, and what it teaches the memory profile.
A Python exception fails the job (with its code) and the worker goes on to the next one."""

from __future__ import annotations

import gc
import io
import logging
import time

from celery.exceptions import SoftTimeLimitExceeded

from shared import fleet, store
from shared.db import session_factory
from shared.errors import ErrorCode
from shared.memory import Shape, fmt_gb, guidance_on, predict
from shared.jobs import JobParameters
from worker.host import HOST, Host, Running
from worker.meter import JobMeter, MemoryBudgetExceeded, release_free_memory
from worker.pipelines import ImageRequest

log = logging.getLogger(__name__)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def shape_of(params: JobParameters) -> Shape:
    return Shape(params.width, params.height, guidance_on(params.guidance_scale))


def _generate_all(host: Host, params: JobParameters, meter: JobMeter) -> list[store.GeneratedImage]:
    def on_step(step: int, total: int) -> None:
        meter.check()  # the guard: abort at the next step once the sampler saw the budget crossed
        meter.mark("decode" if step == total else "denoise")

    images = []
    for i in range(params.num_images):
        # one image per pass: N images cost the peak of one; seed + i makes image i reproducible alone
        seed = params.seed + i
        meter.mark("encode", i)
        image = host.pipeline.generate(ImageRequest(
            prompt=params.prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, steps=params.steps, guidance_scale=params.guidance_scale, seed=seed,
        ), on_step)
        meter.check()
        images.append(store.GeneratedImage(index=i, seed=seed, width=image.width, height=image.height,
                                           png=_png(image)))
    return images


def run_job(job_id: str, host: Host) -> str:
    """Run one delivered job; returns the status it ended in (or 'skipped')."""
    try:
        return _run_job(job_id, host)
    finally:
        host.running = None
        gc.collect()
        release_free_memory()


def _run_job(job_id: str, host: Host) -> str:
    settings = host.settings
    sessions = session_factory(settings.database_url)
    with sessions.begin() as session:
        attempt = store.start_attempt(session, job_id, HOST, settings.max_attempts)
    if attempt is None:
        log.info("job %s: nothing to run (unknown, finished, or out of attempts)", job_id)
        return "skipped"
    params = attempt.parameters
    if params.model != host.model:
        with sessions.begin() as session:
            store.finish_failed(session, attempt, ErrorCode.model_unavailable,
                                f"this worker serves {host.model!r}, not {params.model!r}", None)
        return "failed"

    shape = shape_of(params)
    pipeline = host.pipeline
    with sessions() as session:
        known = fleet.profiles(session, host.model, pipeline.backend, pipeline.precision)
    expected = predict(shape, known, host.resident)
    if expected.bytes > host.budget:
        with sessions.begin() as session:
            store.finish_failed(session, attempt, ErrorCode.insufficient_memory,
                                f"predicted peak {fmt_gb(expected.bytes)} ({expected.source}) exceeds this "
                                f"worker's budget of {fmt_gb(host.budget)}", None)
        return "failed"

    meter = JobMeter(settings.memory_sample_interval_s, budget_bytes=host.budget)
    t0 = time.perf_counter()
    try:
        with meter:
            host.running = Running(attempt, meter)
            host.beat()  # at once, not at the next beat: a worker killed now still leaves a reading
            images = _generate_all(host, params, meter)
    except MemoryBudgetExceeded as exc:
        code, message = ErrorCode.out_of_memory, f"aborted: {exc}"
    except SoftTimeLimitExceeded:
        code, message = ErrorCode.timeout, f"the job ran past SDFLEET_JOB_TIMEOUT_S={settings.job_timeout_s}"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        code, message = ErrorCode.generation_failed, f"{type(exc).__name__}: {exc}"
    else:
        code = None
    elapsed = time.perf_counter() - t0
    reading = meter.reading
    with sessions.begin() as session:
        if code is None:
            ok = store.finish_succeeded(session, attempt, images, elapsed, reading)
        else:
            ok = store.finish_failed(session, attempt, code, message, reading, elapsed)
        if ok:
            fleet.save_timeline(session, job_id, attempt.number, meter.interval_s, meter.timeline())
            if code is None:
                # Only complete runs teach the profile: an aborted job's peak is a lower bound, and scaled
                # to other sizes it would refuse jobs that fit.
                fleet.record_profile(session, host.model, pipeline.backend, pipeline.precision, shape,
                                     reading.peak_rss_bytes, reading.rss_before_bytes)
    status = "succeeded" if code is None else "failed"
    log.info("job %s %s in %.2f s, peak %s (predicted %s, %s)", job_id, status, elapsed,
             fmt_gb(reading.peak_rss_bytes), fmt_gb(expected.bytes), expected.source)
    return status if ok else "superseded"
