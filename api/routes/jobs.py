"""/v1/jobs: submit (validate, admit against memory, store, enqueue), read, cancel, images, memory timeline."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from api.admission import (Admission, FleetView, admit, decide_on_fleet, parameters_on, predict_generation,
                           requested_model)
from api.deps import Caller, Ctx, JobId, enforce_rate_limit, idempotency_key, owner_id
from api.errors import responses
from api.waits import queued_views
from shared import deliveries, fleet, jobstore, previews, webhooks
from shared.errors import Gone, IdempotencyConflict, InvalidRequest, NotFound
from shared.jobs import (MAX_SEED, JobCreate, JobList, JobMemoryPublic, JobParameters, JobPublic, JobStatus,
                         is_job_id)
from shared.models import Job, Worker
from shared.queue import send_webhook

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def request_hash(job: JobCreate) -> str:
    return hashlib.sha256(json.dumps(job.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _check_webhook(ctx, url: str | None) -> None:
    if url is None:
        return
    try:
        webhooks.resolve(url, ctx.settings.webhook_allowed, ctx.resolver)
    except webhooks.WebhookRefused as exc:
        raise InvalidRequest(f"webhook_url: {exc}", [{"field": "webhook_url", "reason": str(exc)}]) from None


@router.post("", status_code=202, response_model=JobPublic,
             responses={200: {"model": JobPublic, "description": "an Idempotency-Key replay: the same job"},
                        **responses(409, 413, 422, 429, 503)})
async def submit_job(job: JobCreate, caller: Caller, ctx: Ctx,
                     key: Annotated[str | None, Depends(idempotency_key)]) -> Response:
    """Queue a text-to-image job; answers at once with its ID (poll GET /v1/jobs/{id})."""
    record, status = await submit(ctx, job, caller, key)
    return Response(record.model_dump_json(), status_code=status, media_type="application/json",
                    headers={"Location": f"/v1/jobs/{record.id}"})


async def submit(ctx: Ctx, job: JobCreate, caller: Caller, key: str | None) -> tuple[JobPublic, int]:
    """Validate, admit, store and enqueue a job: (its record, 202); or (the earlier job, 200) for an
    Idempotency-Key replay. On the event loop: the database and Redis are reached only through the thread
    pool, the fleet cache and the submitter's thread."""
    digest = request_hash(job) if key is not None else None
    if key is not None:
        earlier = await run_in_threadpool(_earlier, ctx, caller, key, digest)
        if earlier is not None:
            return earlier, 200
    if caller is not None and caller.rate_limit_per_min:
        await run_in_threadpool(enforce_rate_limit, ctx, caller)
    model = requested_model(job.model, ctx.settings.default_model)
    if job.webhook_url is not None:
        await run_in_threadpool(_check_webhook, ctx, job.webhook_url)
    seed = job.seed if job.seed is not None else random.randrange(MAX_SEED + 1)  # a seed is no secret
    params, admitted, seconds = await decide_on_fleet(ctx.fleet, lambda view: _admit(view, job, model, seed))
    values = jobstore.new_job_values(jobstore.NewJob(
        params=params, priority=job.priority, owner_key_id=owner_id(caller), idempotency_key=key,
        request_hash=digest, webhook_url=job.webhook_url, predicted_peak_bytes=admitted.prediction.bytes,
        prediction_source=admitted.prediction.source, memory_class_bytes=admitted.memory_class_bytes,
        predicted_generation_s=seconds,
    ))
    try:
        position = await ctx.submitter.submit(values)
    except IntegrityError:  # the same key submitted concurrently: the other request won
        if key is None:
            raise
        return await submit(ctx, job, caller, key)
    return jobstore.to_public(jobstore.as_record(values), queue_position=position), 202


def _admit(view: FleetView, job: JobCreate, model: str, seed: int) -> tuple[JobParameters, Admission, float | None]:
    fields = job.model_dump(exclude={"model", "seed", "priority", "webhook_url"})
    _, params = parameters_on(view, model, fields, seed=seed)
    admitted = admit(view, params)
    seconds = predict_generation(view, model, params.width, params.height, params.guidance_scale, params.steps,
                                 params.num_images, admitted.memory_class_bytes)
    return params, admitted, seconds


def _earlier(ctx: Ctx, caller: Caller, key: str, digest: str) -> JobPublic | None:
    """The job this Idempotency-Key already made, if any (a different body is a 409)."""
    with ctx.sessions() as session:
        earlier = jobstore.find_idempotent(session, owner_id(caller), key)
        if earlier is None:
            return None
        if earlier.request_hash != digest:
            raise IdempotencyConflict("this Idempotency-Key was used with a different body", {"job_id": earlier.id})
        return jobstore.to_public(earlier)


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _bad_cursor(reason: str) -> InvalidRequest:
    return InvalidRequest(f"cursor: not a cursor this API gave out ({reason}; pass next_cursor as it came)",
                          [{"field": "cursor", "reason": f"not a cursor this API gave out: {reason}"}])


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a next_cursor holds, checked whole before the database sees it: a JSON pair of an
    ISO 8601 time with its zone, as isoformat() writes it, and a job ID (a UUID). Anything else (a naive time,
    NUL or a lone surrogate in the ID, another type) is 422 with the reason, never a query the database
    refuses."""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):  # not base64, not UTF-8, not JSON (UnicodeDecodeError is a ValueError)
        raise _bad_cursor("not base64 of JSON") from None
    if not (isinstance(decoded, list) and len(decoded) == 2 and all(isinstance(v, str) for v in decoded)):
        raise _bad_cursor("not a pair of a time and a job ID")
    created_text, job_id = decoded
    if not is_job_id(job_id):
        raise _bad_cursor("its job ID is not a job ID (a UUID)")
    try:  # as isoformat() writes it: fromisoformat alone takes more (any character between date and time)
        created = datetime.fromisoformat(created_text)
        if created.isoformat() != created_text:
            raise ValueError(created_text)
    except ValueError:
        raise _bad_cursor("its time is not an ISO 8601 time as this API writes it") from None
    if created.utcoffset() is None:
        raise _bad_cursor("its time has no time zone")
    try:  # in UTC, as the times are stored (SQLite compares their text, which holds no zone)
        return created.astimezone(timezone.utc), job_id
    except OverflowError:  # year 1 at +14:00: before the first time there is
        raise _bad_cursor("its time is out of range") from None


@router.get("", response_model=JobList, responses=responses(422))
async def list_jobs(caller: Caller, ctx: Ctx,
                    status: Annotated[list[JobStatus] | None, Query(description="only these statuses (repeatable)")]
                    = None,
                    limit: Annotated[int, Query(ge=1, le=200)] = 50,
                    cursor: Annotated[str | None, Query(max_length=200, description="next_cursor of the previous "
                                                        "page")] = None) -> JobList:
    """The caller's jobs (with a key, only that key's), newest first, a page at a time; queued ones with their
    queue position, expected start and why they wait."""
    after = _decode_cursor(cursor) if cursor is not None else None
    view = await ctx.fleet.get()
    return await run_in_threadpool(_list_jobs, ctx, caller, status or [], limit, after, view)


def _list_jobs(ctx: Ctx, caller: Caller, status: list[JobStatus], limit: int, after, view: FleetView) -> JobList:
    with ctx.sessions() as session:
        rows = jobstore.list_jobs(session, owner_id(caller), status, limit + 1, after)
        page = rows[:limit]
        queued = queued_views(session, view, page)
        jobs = [jobstore.to_public(j, *queued.get(j.id, (None, None))) for j in page]
    return JobList(jobs=jobs, next_cursor=_encode_cursor(page[-1]) if len(rows) > limit else None)


def owned_job(session, job_id: str, caller) -> Job:
    job = jobstore.get_job(session, job_id, owner_id(caller))
    if job is None:
        stone = jobstore.tombstone(session, job_id, owner_id(caller))
        if stone is not None:
            raise Gone(f"job {job_id} was deleted at {stone.deleted_at.isoformat()} ({stone.reason})",
                       {"deleted_at": stone.deleted_at.isoformat(), "reason": stone.reason,
                        "status": stone.status})
        raise NotFound(f"no job {job_id}")
    return job


@router.get("/{job_id}", response_model=JobPublic, responses=responses(404, 410))
async def get_job(job_id: JobId, caller: Caller, ctx: Ctx) -> JobPublic:
    view = await ctx.fleet.get()  # the API's cached read of the fleet: for a queued job's start and wait
    return await run_in_threadpool(_get_job, ctx, job_id, caller, view)


def _get_job(ctx: Ctx, job_id: str, caller: Caller, view: FleetView) -> JobPublic:
    with ctx.sessions() as session:
        job = owned_job(session, job_id, caller)
        return jobstore.to_public(job, *queued_views(session, view, [job]).get(job.id, (None, None)))


@router.delete("/{job_id}", response_model=JobPublic, status_code=200,
               responses={202: {"model": JobPublic, "description": "running: cancel_requested is true; the job "
                                "stops at its next denoising step and ends cancelled"},
                          **responses(404, 409, 410)})
def cancel_job(job_id: JobId, caller: Caller, ctx: Ctx, response: Response) -> JobPublic:
    """Cancel: a queued job never runs (200, cancelled); a running one stops at its next denoising
    step (202, cancel_requested); a finished one is 409."""
    with ctx.sessions.begin() as session:
        job = jobstore.cancel(session, job_id, owner_id(caller))
        if job is None:
            owned_job(session, job_id, caller)  # 410 for a deleted job, else 404
        record = jobstore.to_public(job)
        hook = deliveries.webhook_handout(session, job_id) if record.status is JobStatus.cancelled else None
    if record.status is JobStatus.cancelled:
        if hook:
            send_webhook(ctx.celery, job_id, hook.delivery_id, hook.attempts_done)
    else:
        response.status_code = 202
    return record


@router.get("/{job_id}/images/{index}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **responses(404, 410)})
def get_image(job_id: JobId, index: int, caller: Caller, ctx: Ctx) -> Response:
    if not 0 <= index < 2**31:  # no such image; and past the database's integers
        raise NotFound(f"job {job_id} has no image {index}")
    with ctx.sessions() as session:
        png = jobstore.image_png(session, job_id, index, owner_id(caller))
        if png is None:
            owned_job(session, job_id, caller)
            raise NotFound(f"job {job_id} has no image {index}")
    return Response(png, media_type="image/png")


@router.get("/{job_id}/preview", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the latest preview of the image being "
                             "denoised (small: the latents' size); never cached",
                             "headers": {f"X-Preview-{h}": {"description": d, "schema": {"type": "integer"}}
                                         for h, d in (("Image", "0-based index of the image it shows"),
                                                      ("Step", "denoising steps done when it was taken"),
                                                      ("Steps", "the image's denoising steps"))}},
                       **responses(404, 410)})
def get_preview(job_id: JobId, caller: Caller, ctx: Ctx) -> Response:
    """While the job runs: its latest preview. 404 before the first, with previews off, and once it has ended."""
    with ctx.sessions() as session:
        row = previews.load(session, job_id, owner_id(caller))
        if row is None:
            owned_job(session, job_id, caller)  # 410 for a deleted job, 404 for no such job (or another key's)
            raise NotFound(f"job {job_id} has no preview (none is kept before its first denoising steps, on "
                           f"workers with previews off, or once it has ended: its images are the result)")
    return Response(row.data, media_type=row.media_type, headers={
        "Cache-Control": "no-store", "X-Preview-Image": str(row.image), "X-Preview-Step": str(row.step),
        "X-Preview-Steps": str(row.steps)})


@router.get("/{job_id}/memory", response_model=JobMemoryPublic, responses=responses(404, 410))
def get_job_memory(job_id: JobId, caller: Caller, ctx: Ctx) -> JobMemoryPublic:
    """The job's memory timeline (its last attempt): RSS samples with phase marks."""
    with ctx.sessions() as session:
        job = owned_job(session, job_id, caller)
        row = fleet.timeline(session, job_id)
        if row is None:
            raise NotFound(f"no memory timeline for job {job_id} yet")
        worker = session.get(Worker, job.worker_name) if job.worker_name else None
        return JobMemoryPublic(job_id=job_id, attempt=row.attempt, interval_s=row.interval_s,
                               peak_rss_bytes=job.peak_rss_bytes, predicted_peak_bytes=job.predicted_peak_bytes,
                               worker_budget_bytes=worker.budget_bytes if worker else None, samples=row.timeline)
