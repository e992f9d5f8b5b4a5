"""POST /v1/images/generations and POST /v1/images/edits: OpenAI's images API on top of the job queue, for
the programs (and the `openai` clients) that speak it. Each submits a normal job (the same validation,
admission, record and limits as POST /v1/jobs), waits for it up to SDFLEET_IMAGES_WAIT_S, and answers in
OpenAI's shape; errors are in OpenAI's shape too (api/errors.py renders them by route)."""

from __future__ import annotations

import base64
import re
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api import inputs as images_in
from api.bodies import body_schema, read_model
from api.deps import Caller, Ctx, owner_id
from api.errors import openai_error
from api.routes.jobs import submit
from shared import jobstore
from shared.errors import InvalidRequest
from shared.jobs import MAX_PROMPT_CHARS, MAX_SEED, Fit, FitRecord, JobCreate, JobPublic, JobStatus, Priority
from shared.waiting import WaitTimeout, wait_until_async

router = APIRouter(tags=["openai"])
# Matched whole (fullmatch) and in ASCII digits: `\d` takes any Unicode digit (int() reads Arabic-Indic and
# fullwidth ones), and `$` matches before a final newline, so "64x64\n" passed
_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
POLL_S = 0.2


class ImageGenerationRequest(BaseModel):
    """OpenAI's request (prompt, n, size, response_format, model, user) and sdfleet's own fields. Strict as
    POST /v1/jobs is: no coercion ("2" is not a number), no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    n: int = Field(default=1, ge=1, le=8, description="images, one pass each (at most 8 per job here)")
    size: str | None = Field(default=None, max_length=11,
                             description='"WIDTHxHEIGHT" (multiples of 8, 64 to 2048), or "auto" for the default')
    response_format: Literal["url", "b64_json"] = Field(
        default="url", description="url: the image's path on this API (fetch it with the same key); b64_json: "
        "the PNG inline")
    model: str | None = None
    user: str | None = Field(default=None, max_length=256, description="accepted for compatibility; not stored")
    # sdfleet's own
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    priority: Priority = "normal"
    fit: Fit = Field(default="refuse", description="as on POST /v1/jobs: auto admits a job no worker fits with the "
                     "first change that fits (the images are then of the changed size or model; `sdfleet.fitted` "
                     "says what changed)")


_EDIT_IMAGE = "PNG, JPEG or WebP: a file part, or (JSON) its base64 or a data: URL"


class ImageEditRequest(ImageGenerationRequest):
    """OpenAI's edit request: the fields of a generation, the image and its optional mask. A multipart/form-data
    body (as OpenAI's clients send it: files as parts, the other fields as text parts), or JSON with the
    images in base64. OpenAI's meaning: the mask's transparent pixels (or, without a mask, the image's own)
    are what is edited (inpainting); an image with neither is edited whole (image-to-image)."""

    image: str | list[str] = Field(description="the image to edit (" + _EDIT_IMAGE + "); `image[]` is taken as "
                                   "`image`, and one image only")
    mask: str | None = Field(default=None, description="its transparent pixels (alpha below 128) are repainted, "
                             "the rest kept as it was; the image's size (" + _EDIT_IMAGE + ")")
    size: str | None = Field(default=None, max_length=11,
                             description='"WIDTHxHEIGHT" (multiples of 8, 64 to 2048), or "auto" (or none): '
                             'the image\'s size')
    strength: float | None = Field(default=None, ge=0, le=1, description="sdfleet's: how much is re-imagined "
                                   "(default 1 where a mask marks what is edited, 0.75 for a whole image)")


EDIT_PARTS = {"image": "the image to edit (PNG, JPEG or WebP)",
              "mask": "what to edit: its transparent pixels (PNG or WebP with alpha), the image's size"}


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class SdfleetInfo(BaseModel):
    job_id: str
    seeds: list[int]
    peak_rss_bytes: int | None
    generation_s: float | None
    fitted: FitRecord | None = Field(default=None, description="with fit auto: what was changed so the job fits "
                                     "(left out when nothing was)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    sdfleet: SdfleetInfo = Field(description="the job behind the answer (OpenAI's clients ignore it)")


def _job_request(body: ImageGenerationRequest, **extra) -> JobCreate:
    fields = {"prompt": body.prompt, "num_images": body.n, "model": body.model, "priority": body.priority,
              "negative_prompt": body.negative_prompt, "steps": body.steps, "guidance_scale": body.guidance_scale,
              "seed": body.seed, "fit": body.fit, **extra}
    if body.size not in (None, "auto"):
        match = _SIZE.fullmatch(body.size)
        if not match:
            raise InvalidRequest(f"size: {body.size!r} is not WIDTHxHEIGHT (e.g. \"512x512\")",
                                 [{"field": "size", "reason": "must be WIDTHxHEIGHT, e.g. 512x512"}])
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    try:
        return JobCreate.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "body"
        reason = err["msg"].removeprefix("Value error, ")
        name = {"width": "size (width)", "height": "size (height)", "num_images": "n"}.get(field, field)
        raise InvalidRequest(f"{name}: {reason}", [{"field": field, "reason": reason}]) from None


def _finished(ctx, job_id: str, owner: str | None) -> JobPublic:
    with ctx.sessions() as session:
        return jobstore.to_public(jobstore.get_job(session, job_id, owner))


def _pngs(ctx, job: JobPublic, owner: str | None) -> list[bytes]:
    with ctx.sessions() as session:
        return [jobstore.image_png(session, job.id, image.index, owner) for image in job.images]


class _CallerLeft(Exception):
    """The caller disconnected while its job ran."""


async def _until_ended(request: Request, ctx, job: JobPublic, owner: str | None) -> JobPublic:
    """The job's record once it has ended, read every POLL_S; after SDFLEET_IMAGES_WAIT_S the last record read,
    not ended. Raises _CallerLeft when the caller disconnects (checked before each read)."""
    record, first = job, True

    async def ended() -> JobPublic | None:
        nonlocal record, first
        if not first:  # the submitted record is the first one looked at: no read until a poll has passed
            if await request.is_disconnected():
                raise _CallerLeft
            record = await run_in_threadpool(_finished, ctx, record.id, owner)
        first = False
        return record if record.status.is_terminal else None

    try:
        return await wait_until_async(ended, ctx.settings.images_wait_s, POLL_S, f"job {job.id} to end")
    except WaitTimeout:
        return record


_RESPONSES = {
    400: {"description": "invalid_value (param names the field) or insufficient_memory (the message says "
                         "which changes would fit)"},
    401: {"description": "invalid_api_key"}, 404: {"description": "model_not_found: no live worker serves it"},
    409: {"description": "job_cancelled"}, 429: {"description": "rate_limit_exceeded"},
    500: {"description": "generation_failed (or another error code of the job)"},
    504: {"description": "job_timeout: the job outlived SDFLEET_IMAGES_WAIT_S; it goes on (poll /v1/jobs/{id})"}}


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=_RESPONSES)
async def generate_images(body: ImageGenerationRequest, request: Request, caller: Caller, ctx: Ctx) -> Response:
    """OpenAI-compatible image generation: submit a job, wait for it, answer with its images."""
    return await _run(request, ctx, caller, _job_request(body), body.response_format)


@router.post("/v1/images/edits", response_model=ImagesResponse,
             openapi_extra={"requestBody": body_schema(ImageEditRequest, EDIT_PARTS)},
             responses={**_RESPONSES, 413: {"description": "invalid_request_error: an image past "
                                                           "SDFLEET_MAX_IMAGE_BYTES, or the body past its limit"}})
async def edit_images(request: Request, caller: Caller, ctx: Ctx) -> Response:
    """OpenAI-compatible image edit (multipart/form-data, as OpenAI's clients send it, or JSON): the mask's
    transparent pixels (or the image's own, without a mask) are repainted, the rest kept exactly; an image
    with no transparency and no mask is edited whole (image-to-image). Submits a job, waits for it, answers
    with its images."""
    body = await read_model(request, ImageEditRequest, tuple(EDIT_PARTS), ctx.settings.max_image_bytes,
                            lists=("image",))
    images = body.image if isinstance(body.image, list) else [body.image]
    if len(images) != 1:
        reason = (f"{len(images)} images given: this API edits one image a request" if images
                  else "no image given")
        raise InvalidRequest(f"image: {reason}", [{"field": "image", "reason": reason}])
    job = _job_request(body, image=images[0], mask=body.mask, strength=body.strength)  # (before decoding)
    given = await run_in_threadpool(_edit_inputs, ctx, images[0], body.mask)
    if body.mask is None and given.mask is not None:  # the image's transparency is its mask: inpainting
        job = job.model_copy(update={"mask": images[0]})
    return await _run(request, ctx, caller, job, body.response_format, given)


def _edit_inputs(ctx, image_text: str, mask_text: str | None) -> images_in.Inputs:
    """The edit's image and mask, decoded and checked, in OpenAI's meaning: transparent is what is edited."""
    settings = ctx.settings

    def decoded(field: str, text: str, role: str) -> images_in.Decoded:
        data = images_in.from_base64(field, text, settings.max_image_bytes)
        return images_in.decode(field, data, settings.max_image_bytes, settings.max_image_pixels, role)

    image = decoded("image", image_text, "image")
    if mask_text is not None:
        mask = decoded("mask", mask_text, "mask")
        if mask.transparent is None:
            reason = ("no transparent pixels: here, as on OpenAI's API, the mask's transparent pixels mark what is "
                      "edited (a mask with none edits nothing); for a black-and-white mask, use POST /v1/jobs")
            raise InvalidRequest(f"mask: {reason}", [{"field": "mask", "reason": reason}])
        images_in.check_pair(image, mask)
    elif image.transparent is not None:
        mask = images_in.Decoded(image.transparent, image.transparent, image.source_format)
    else:
        mask = None
    return images_in.Inputs(image, mask)


async def _run(request: Request, ctx, caller, job: JobCreate, response_format: str,
               given: images_in.Inputs | None = None) -> Response:
    """Submit the job, wait for it, and answer in OpenAI's shape."""
    submitted, _ = await submit(ctx, job, caller, None, given)
    owner = owner_id(caller)
    try:
        record = await _until_ended(request, ctx, submitted, owner)
    except _CallerLeft:
        return Response(status_code=499)  # the caller left; the job goes on, as it would on /v1/jobs
    if not record.status.is_terminal:
        return openai_error(
            504, "job_timeout",
            f"job {record.id} is still {record.status.value} after {ctx.settings.images_wait_s:g} s "
            f"(SDFLEET_IMAGES_WAIT_S); it goes on: poll GET /v1/jobs/{record.id}",
            headers={"Location": f"/v1/jobs/{record.id}"})
    if record.status is JobStatus.cancelled:
        return openai_error(409, "job_cancelled", f"job {record.id} was cancelled before it finished",
                            headers={"Location": f"/v1/jobs/{record.id}"})
    if record.status is JobStatus.failed:
        error = record.error
        status = 400 if error and error.code == "insufficient_memory" else 500
        return openai_error(status, error.code if error else "generation_failed",
                            f"job {record.id} failed: {error.message if error else 'no reason recorded'}",
                            headers={"Location": f"/v1/jobs/{record.id}"})
    if response_format == "b64_json":
        pngs = await run_in_threadpool(_pngs, ctx, record, owner)
        data = [ImageData(b64_json=base64.b64encode(png).decode()) for png in pngs]
    else:
        base = str(request.base_url).rstrip("/")
        data = [ImageData(url=base + image.url) for image in record.images]
    answer = ImagesResponse(
        created=int(record.created_at.timestamp()), data=data,
        sdfleet=SdfleetInfo(job_id=record.id, seeds=[i.seed for i in record.images],
                            peak_rss_bytes=record.peak_rss_bytes, generation_s=record.generation_s,
                            fitted=record.fitted))
    return JSONResponse(answer.model_dump(mode="json", exclude_none=True), headers={"Location": f"/v1/jobs/{record.id}"})
