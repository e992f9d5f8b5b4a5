"""/v1/jobs: submit (validate, admit against memory, store, enqueue), read, cancel, images, memory timeline."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import random
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from api import inputs as images_in
from api.admission import (Admission, FleetView, admit, announced_defaults, decide_on_fleet, fit_auto, fits_on,
                           parameters_on, predict_generation, requested_model)
from api.bodies import body_schema, read_model
from api.deps import Caller, Ctx, JobId, enforce_rate_limit, idempotency_key, owner_id
from api.errors import responses
from api.waits import queued_views
from shared import deliveries, fleet, jobstore, previews, webhooks
from shared.errors import Gone, IdempotencyConflict, InsufficientMemory, InvalidRequest, NotFound
from shared.jobs import (DEFAULT_STRENGTH, MAX_SEED, MAX_SIDE, MAX_UPSCALED_SIDE, MIN_SIDE, FitRecord, ImageRef,
                         JobCreate, JobList, JobMemoryPublic, JobParameters, JobPublic, JobStatus, denoising_steps,
                         is_job_id)
from shared.models import Job, Worker
from shared.queue import send_webhook

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


# Fields added since bodies were first hashed: left out at their default, a body hashes as it did before them
_LATER_FIELDS = {"fit": "refuse", "image": None, "mask": None, "strength": None, "upscale": None, "decoder": None}


def request_hash(job: JobCreate) -> str:
    body = job.model_dump(mode="json", exclude={k for k, v in _LATER_FIELDS.items() if getattr(job, k) == v})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_webhook(ctx, url: str | None) -> None:
    if url is None:
        return
    try:
        webhooks.resolve(url, ctx.settings.webhook_allowed, ctx.resolver)
    except webhooks.WebhookRefused as exc:
        raise InvalidRequest(f"webhook_url: {exc}", [{"field": "webhook_url", "reason": str(exc)}]) from None


IMAGE_PARTS = {"image": "the init image (PNG, JPEG or WebP)", "mask": "inpainting: the mask (white or transparent: "
                                                                       "repainted)"}


@router.post("", status_code=202, response_model=JobPublic,
             openapi_extra={"requestBody": body_schema(JobCreate, IMAGE_PARTS)},
             responses={200: {"model": JobPublic, "description": "an Idempotency-Key replay: the same job"},
                        **responses(409, 413, 422, 429, 503)})
async def submit_job(request: Request, caller: Caller, ctx: Ctx,
                     key: Annotated[str | None, Depends(idempotency_key)]) -> Response:
    """Queue a job (text-to-image; with an image, image-to-image, inpainting or an upscale) as JSON, or as
    multipart/form-data with the images as file parts; answers at once with its ID (poll GET /v1/jobs/{id})."""
    job = await read_model(request, JobCreate, tuple(IMAGE_PARTS), ctx.settings.max_image_bytes)
    record, status = await submit(ctx, job, caller, key)
    return Response(record.model_dump_json(), status_code=status, media_type="application/json",
                    headers={"Location": f"/v1/jobs/{record.id}"})


async def submit(ctx: Ctx, job: JobCreate, caller: Caller, key: str | None,
                 given: images_in.Inputs | None = None) -> tuple[JobPublic, int]:
    """Validate, admit, store and enqueue a job: (its record, 202); or (the earlier job, 200) for an
    Idempotency-Key replay. On the event loop: the database and Redis are reached only through the thread
    pool, the fleet cache and the submitter's thread. Its images (`given`, or read from the job's fields) are
    decoded and checked before anything is stored."""
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
    if given is None and job.image is not None:
        given = await run_in_threadpool(read_inputs, ctx, job, caller)
    # a fitted job is a refusal of the job as asked: decided again on a fresh read, where it may fit as it is
    params, admitted, seconds, fitted = await decide_on_fleet(
        ctx.fleet, lambda view: _admit(view, job, model, seed, given), refused=lambda decided: decided[3] is not None)
    values = jobstore.new_job_values(jobstore.NewJob(
        params=params, priority=job.priority, owner_key_id=owner_id(caller), idempotency_key=key,
        request_hash=digest, webhook_url=job.webhook_url, predicted_peak_bytes=admitted.prediction.bytes,
        prediction_source=admitted.prediction.source, memory_class_bytes=admitted.memory_class_bytes,
        predicted_generation_s=seconds, fitted=fitted.model_dump(mode="json") if fitted else None,
    ))
    rows = await run_in_threadpool(given.rows, values["id"]) if given is not None else []  # (PNG: CPU time)
    try:
        position = await ctx.submitter.submit(values, rows)
    except IntegrityError:  # the same key submitted concurrently: the other request won
        if key is None:
            raise
        return await submit(ctx, job, caller, key, given)
    return jobstore.to_public(jobstore.as_record(values, rows), queue_position=position), 202


def read_inputs(ctx: Ctx, job: JobCreate, caller: Caller) -> images_in.Inputs:
    """The job's images, decoded and checked (422 or 413 with the reason); an image of an earlier job is read
    from the database, the caller's own only."""
    settings = ctx.settings

    def one(field: str, value, role: str) -> images_in.Decoded:
        if isinstance(value, ImageRef):
            with ctx.sessions() as session:
                data = jobstore.image_png(session, value.job_id, value.index, owner_id(caller))
            if data is None:
                raise images_in.refuse(field, f"job {value.job_id} has no image {value.index} (or is not a job of "
                                              f"this key)")
        else:
            data = images_in.from_base64(field, value, settings.max_image_bytes)
        return images_in.decode(field, data, settings.max_image_bytes, settings.max_image_pixels, role)

    image = one("image", job.image, "image")
    mask = one("mask", job.mask, "mask") if job.mask is not None else None
    images_in.check_pair(image, mask)
    return images_in.Inputs(image, mask)


def kind_fields(job: JobCreate, given: images_in.Inputs | None) -> dict:
    """What a job with images adds to its parameters: its kind and strength, and the size its input gives it
    when it names none (an upscale: its input's times the factor)."""
    kind = job.kind
    if given is None:
        return {"kind": kind}
    out = {"kind": kind, "strength": job.strength if job.strength is not None else DEFAULT_STRENGTH[kind]}
    width, height = given.image.size
    if kind == "upscale":
        out["upscale"] = job.upscale
        w, h = width * job.upscale, height * job.upscale
        if max(w, h) > MAX_UPSCALED_SIDE or min(w, h) < MIN_SIDE:
            raise images_in.refuse("upscale", f"{width}x{height} enlarged {job.upscale}x is {w}x{h}: an upscale's output is "
                                     f"{MIN_SIDE} to {MAX_UPSCALED_SIDE} pixels a side")
        out["width"], out["height"] = w, h
    elif job.width is None and job.height is None:
        scale = min(1.0, MAX_SIDE / max(width, height))  # an input larger than a job may be: its aspect kept
        w, h = int(width * scale) // 8 * 8, int(height * scale) // 8 * 8
        if min(w, h) < MIN_SIDE:
            raise images_in.refuse("image", f"{width}x{height} makes a job of {w}x{h}: a side must be at least {MIN_SIDE} "
                                   f"pixels (give width and height to resize it)")
        out["width"], out["height"] = w, h
    return out


UPSCALE_TILES = (1024, 768, 512, 384, 256)


def _tile(view: FleetView, params: JobParameters, serving: list) -> JobParameters:
    """An upscale's tile side: the largest that some live worker of the model fits (measured by its profiles,
    as any job is), no larger than the model's own size nor the output's shorter side; the smallest if none."""
    native = max(announced_defaults(serving[0]).width, announced_defaults(serving[0]).height)
    shortest = min(params.width, params.height) // 8 * 8
    sides = [t for t in UPSCALE_TILES if t <= min(native, shortest)] or [min(UPSCALE_TILES[-1], shortest)]
    for side in sides:
        tiled = params.model_copy(update={"tile": side})
        if any(f.fits for f in fits_on(view, tiled, serving)):
            return tiled
    return params.model_copy(update={"tile": sides[-1]})


def _check_kind(serving: list, params: JobParameters) -> None:
    """The model's workers must take the job's kind (and its decoder), and an image job must run a step (or
    none at all)."""
    if params.decoder == "tiny" and not serving[0].memory_mode.endswith("+tiny_vae"):
        raise images_in.refuse("decoder", f"the workers of model {params.model!r} have no tiny VAE (memory mode "
                                          f"{serving[0].memory_mode}; SDFLEET_TINY_VAE gives a worker one): ask "
                                          f"for decoder full, or leave it out")
    defaults = announced_defaults(serving[0])
    if params.kind not in defaults.tasks:
        reason = (f"the workers of model {params.model!r} ({defaults.family}, {defaults.pipeline}, backend "
                  f"{serving[0].backend}) take {', '.join(defaults.tasks)} jobs, not {params.kind}")
        raise images_in.refuse("image" if params.kind != "upscale" else "upscale", reason)
    if params.kind != "txt2img" and params.strength and not denoising_steps(params.kind, params.steps,
                                                                           params.strength, defaults.family):
        least = math.ceil(1 / params.strength - 1e-9)
        raise images_in.refuse("strength", f"{params.strength:g} of {params.steps} step(s) runs no denoising step "
                                  f"(int(steps x strength) = 0): give at least {least} steps, or strength 0 to have "
                                  f"the image back as it is")


def _admit(view: FleetView, job: JobCreate, model: str, seed: int, given: images_in.Inputs | None
           ) -> tuple[JobParameters, Admission, float | None, FitRecord | None]:
    fields = job.model_dump(exclude={"model", "seed", "priority", "webhook_url", "fit", "image", "mask", "strength",
                                     "upscale"})
    fields.update(kind_fields(job, given))
    serving, params = parameters_on(view, model, fields, seed=seed)
    _check_kind(serving, params)
    if params.kind == "upscale":
        params = _tile(view, params, serving)
        fields["tile"] = params.tile
    fitted = None
    try:
        admitted = admit(view, params)
    except InsufficientMemory as refused:
        if job.fit != "auto":
            raise
        params, admitted, fitted = fit_auto(view, params, fields, refused, seed=seed)
    seconds = predict_generation(view, params, admitted.memory_class_bytes)
    return params, admitted, seconds, fitted


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
    return _png(ctx, caller, job_id, lambda s, owner: jobstore.image_png(s, job_id, index, owner),
                f"job {job_id} has no image {index}")


@router.get("/{job_id}/inputs/{role}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **responses(404, 410)})
def get_input(job_id: JobId, role: Literal["image", "mask"], caller: Caller, ctx: Ctx) -> Response:
    """An image the job was given (its init image or mask), as stored: decoded, checked, PNG."""
    return _png(ctx, caller, job_id, lambda s, owner: jobstore.input_png(s, job_id, role, owner),
                f"job {job_id} was given no {role}")


def _png(ctx: Ctx, caller: Caller, job_id: str, read, missing: str) -> Response:
    """A PNG of the caller's job (`read(session, owner)`); 404 `missing` when there is none, 410 for a deleted
    job, 404 for no such job."""
    with ctx.sessions() as session:
        png = read(session, owner_id(caller))
        if png is None:
            owned_job(session, job_id, caller)
            raise NotFound(missing)
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
