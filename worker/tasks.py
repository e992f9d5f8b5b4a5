"""The generate task's body: claim the job, run it one image per pass under the memory meter, store the outcome.
A Python exception fails the job (with its code) and the worker goes on to the next one."""

from __future__ import annotations

import io
import logging
import socket
import time

from celery.exceptions import SoftTimeLimitExceeded

from shared import store
from shared.db import session_factory
from shared.errors import ErrorCode
from shared.settings import Settings
from worker.meter import JobMeter, release_free_memory
from worker.pipelines import ImageRequest, Pipeline, get_pipeline

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _generate_all(pipeline: Pipeline, params) -> list[store.GeneratedImage]:
    images = []
    for i in range(params.num_images):
        # one image per pass: N images cost the peak of one; seed + i makes image i reproducible alone
        seed = params.seed + i
        image = pipeline.generate(ImageRequest(
            prompt=params.prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, steps=params.steps, guidance_scale=params.guidance_scale, seed=seed,
        ))
        images.append(store.GeneratedImage(index=i, seed=seed, width=image.width, height=image.height,
                                           png=_png(image)))
    return images


def run_job(job_id: str, settings: Settings) -> str:
    """Run one delivered job; returns the status it ended in (or 'skipped')."""
    try:
        return _run_job(job_id, settings)
    finally:
        release_free_memory()


def _run_job(job_id: str, settings: Settings) -> str:
    sessions = session_factory(settings.database_url)
    with sessions.begin() as session:
        attempt = store.start_attempt(session, job_id, HOST, settings.max_attempts)
    if attempt is None:
        log.info("job %s: nothing to run (unknown, finished, or out of attempts)", job_id)
        return "skipped"
    params = attempt.parameters
    served = settings.served_model_name
    if params.model != served:
        with sessions.begin() as session:
            store.finish_failed(session, attempt, ErrorCode.model_unavailable,
                                f"this worker serves {served!r}, not {params.model!r}", None)
        return "failed"

    pipeline = get_pipeline(settings)
    meter = JobMeter(settings.memory_sample_interval_s)
    t0 = time.perf_counter()
    try:
        with meter:
            images = _generate_all(pipeline, params)
    except SoftTimeLimitExceeded:
        code, message = ErrorCode.timeout, f"the job ran past SDFLEET_JOB_TIMEOUT_S={settings.job_timeout_s}"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        code, message = ErrorCode.generation_failed, f"{type(exc).__name__}: {exc}"
    else:
        with sessions.begin() as session:
            ok = store.finish_succeeded(session, attempt, images, time.perf_counter() - t0, meter.reading)
        log.info("job %s succeeded: %d image(s), %.2f s, peak %.0f MB", job_id, len(images),
                 time.perf_counter() - t0, meter.reading.peak_rss_bytes / 2**20)
        return "succeeded" if ok else "superseded"
    with sessions.begin() as session:
        store.finish_failed(session, attempt, code, message, meter.reading, time.perf_counter() - t0)
    return "failed"
