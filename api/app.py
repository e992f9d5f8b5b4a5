"""The submission API: authenticates, validates a job, admits it against the fleet's memory, stores it,
enqueues its ID, and answers from the database by job ID. It imports no model stack (torch, diffusers,
OpenVINO): it stays small and starts in about a second."""

import contextlib
import hashlib
import json
import logging
import math
import secrets
import time
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.admission import admit
from api.metrics import render_metrics
from shared import fleet, keys, store
from shared.db import engine_for, migrate, session_factory, wait_for_database
from shared.errors import (
    ErrorCode, IdempotencyConflict, InvalidRequest, NotFound, RateLimited, SdfleetError, ServiceUnavailable,
    Unauthorized,
)
from shared.jobs import MAX_SEED, JobCreate, JobMemoryPublic, JobParameters, JobPublic, JobStatus, ModelPublic
from shared.jobs import ProfilePublic, WorkerPublic
from shared.models import ApiKey, Job, Worker
from shared.queue import RATE_LIMIT_KEY, make_celery, send_generate, send_webhook
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def _errors(*statuses: int) -> dict:
    described = {
        401: "unauthorized: API keys are configured and the bearer token is missing or unknown",
        404: "not_found: no such job or image (or it belongs to another key)",
        409: "conflict (the job has finished) or idempotency_conflict (the key was used with another body)",
        422: "invalid_request (the field and the reason are in details) or insufficient_memory (the "
             "predicted peak, the largest budget, and hints that would fit)",
        429: "rate_limited: this key's submissions per minute are used up; see Retry-After",
        503: "model_unavailable (no live worker serves the model) or service_unavailable (the database "
             "or the broker is unreachable)",
    }
    return {s: {"model": ErrorBody, "description": described[s]} for s in statuses}


def error_response(status: int, code: ErrorCode, message: str, details: Any = None, headers=None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, details=details))
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"), headers=headers)


def _field_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc[:1] in (["body"], ["header"], ["path"], ["query"]):
            loc = loc[1:]
        if err.get("type") == "json_invalid":
            out.append({"field": "body", "reason": f"not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"})
            continue
        if loc == [] and err.get("type") in ("model_attributes_type", "dict_type"):
            out.append({"field": "body", "reason": "must be a JSON object"})
            continue
        reason = err.get("msg", "invalid").removeprefix("Value error, ")
        out.append({"field": ".".join(loc) or "body", "reason": reason})
    return out


def worker_public(w: Worker, alive: bool) -> WorkerPublic:
    return WorkerPublic.model_validate({**{c: getattr(w, c) for c in WorkerPublic.model_fields if c != "alive"},
                                        "alive": alive})


def request_hash(job: JobCreate) -> str:
    return hashlib.sha256(json.dumps(job.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    sessions = session_factory(settings.database_url)
    celery = make_celery(settings)
    broker = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    keys_configured = {"value": False, "checked": 0.0}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine = engine_for(settings.database_url)
        wait_for_database(engine)
        migrate(engine)
        yield

    app = FastAPI(
        title="sdfleet",
        summary="Text-to-image jobs on a fleet of CPU workers that never run out of memory",
        version="0.1.0",
        lifespan=lifespan,
    )

    @app.exception_handler(SdfleetError)
    async def _sdfleet_error(_req: Request, exc: SdfleetError):
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(exc.http_status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError):
        details = _field_errors(exc)
        first = details[0] if details else {"field": "body", "reason": "invalid"}
        return error_response(422, ErrorCode.invalid_request, f"{first['field']}: {first['reason']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException):
        code = ErrorCode.not_found if exc.status_code == 404 else ErrorCode.invalid_request
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(OperationalError)
    async def _database_down(_req: Request, exc: OperationalError):
        log.warning("database error: %s", exc)
        return error_response(503, ErrorCode.service_unavailable, "the database is unreachable; retry shortly")

    @app.exception_handler(redis.RedisError)
    async def _broker_down(_req: Request, exc: redis.RedisError):
        log.warning("redis error: %s", exc)
        return error_response(503, ErrorCode.service_unavailable, "the job queue is unreachable; retry shortly")

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, ErrorCode.internal, f"internal error ({type(exc).__name__})")

    def principal(authorization: Annotated[str | None, Header()] = None) -> ApiKey | None:
        """The caller's key; None when the API is open (no key configured)."""
        now = time.monotonic()
        if now - keys_configured["checked"] > 5:  # a new key takes effect within seconds on every API host
            with sessions() as session:
                keys_configured.update(value=keys.any_keys(session), checked=now)
        if not keys_configured["value"]:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        with sessions() as session:
            key = keys.lookup(session, token.strip())
        if key is None:
            raise Unauthorized("unknown or revoked API key")
        return key

    Caller = Annotated[ApiKey | None, Depends(principal)]

    def owner_id(caller: ApiKey | None) -> str | None:
        return caller.id if caller else None

    def check_rate(caller: ApiKey | None) -> None:
        if caller is None or not caller.rate_limit_per_min:
            return
        now = time.time()
        window = int(now // 60)
        key = RATE_LIMIT_KEY.format(key_id=caller.id, window=window)
        pipe = broker.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        used = pipe.execute()[0]
        if used > caller.rate_limit_per_min:
            retry = max(1, math.ceil((window + 1) * 60 - now))
            raise RateLimited(f"this key may submit {caller.rate_limit_per_min} jobs a minute; retry in {retry} s",
                              retry)

    @app.post("/v1/jobs", status_code=202, response_model=JobPublic, tags=["jobs"],
              responses={200: {"model": JobPublic, "description": "an Idempotency-Key replay: the same job"},
                         **_errors(401, 409, 422, 429, 503)})
    def submit_job(
        job: JobCreate, response: Response, caller: Caller,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
    ) -> JobPublic:
        """Queue a text-to-image job; answers at once with its ID (poll GET /v1/jobs/{id})."""
        digest = request_hash(job)
        if idempotency_key is not None:
            with sessions() as session:
                earlier = store.find_idempotent(session, owner_id(caller), idempotency_key)
                if earlier is not None:
                    if earlier.request_hash != digest:
                        raise IdempotencyConflict(
                            "this Idempotency-Key was used with a different body", {"job_id": earlier.id})
                    response.status_code = 200
                    response.headers["Location"] = f"/v1/jobs/{earlier.id}"
                    return store.to_public(earlier)
        check_rate(caller)
        model = job.model or settings.default_model
        if model is None:
            raise InvalidRequest(
                "model: no model named and the API has no default (SDFLEET_DEFAULT_MODEL)",
                [{"field": "model", "reason": "required when the API has no default model"}],
            )
        params = JobParameters(
            **job.model_dump(exclude={"model", "seed", "priority", "webhook_url"}),
            model=model,
            seed=job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1),
        )
        try:
            with sessions.begin() as session:
                prediction = admit(session, params, settings.worker_stale_s)
                row = store.create_job(session, store.NewJob(
                    params=params, priority=job.priority, owner_key_id=owner_id(caller),
                    idempotency_key=idempotency_key, request_hash=digest, webhook_url=job.webhook_url,
                    predicted_peak_bytes=prediction.bytes, prediction_source=prediction.source,
                ))
        except IntegrityError:  # the same key submitted concurrently: the other request won
            if idempotency_key is None:
                raise
            return submit_job(job, response, caller, idempotency_key)
        try:
            send_generate(celery, row.id, row.delivery_id, model, job.priority)
        except Exception as exc:  # the broker is down: keep nothing the client was not told about
            with sessions.begin() as session:
                session.delete(session.get(Job, row.id))
            raise ServiceUnavailable(f"the job queue is unreachable ({type(exc).__name__}); nothing was stored") from exc
        response.headers["Location"] = f"/v1/jobs/{row.id}"
        return store.to_public(row, queue_position=None)

    def owned_job(session, job_id: str, caller: ApiKey | None) -> Job:
        job = store.get_job(session, job_id, owner_id(caller))
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    @app.get("/v1/jobs/{job_id}", response_model=JobPublic, responses=_errors(401, 404), tags=["jobs"])
    def get_job(job_id: str, caller: Caller) -> JobPublic:
        with sessions() as session:
            job = owned_job(session, job_id, caller)
            position = store.queue_position(session, job) if job.status == JobStatus.queued.value else None
            return store.to_public(job, position)

    @app.delete("/v1/jobs/{job_id}", response_model=JobPublic, responses=_errors(401, 404, 409), tags=["jobs"],
                status_code=200)
    def cancel_job(job_id: str, caller: Caller, response: Response) -> JobPublic:
        """Cancel: a queued job never runs (200, cancelled); a running one stops at its next denoising
        step (202, cancel_requested); a finished one is 409."""
        with sessions.begin() as session:
            job = store.cancel(session, job_id, owner_id(caller))
            if job is None:
                raise NotFound(f"no job {job_id}")
            record = store.to_public(job)
        if record.status is JobStatus.cancelled:
            if record.webhook_status == "pending":
                send_webhook(celery, job_id)
        else:
            response.status_code = 202
        return record

    @app.get(
        "/v1/jobs/{job_id}/images/{index}.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **_errors(401, 404)},
        tags=["jobs"],
    )
    def get_image(job_id: str, index: int, caller: Caller) -> Response:
        if not 0 <= index < 2**31:  # no such image; and past the database's integers
            raise NotFound(f"job {job_id} has no image {index}")
        with sessions() as session:
            png = store.image_png(session, job_id, index, owner_id(caller))
        if png is None:
            raise NotFound(f"job {job_id} has no image {index}")
        return Response(png, media_type="image/png")

    @app.get("/v1/jobs/{job_id}/memory", response_model=JobMemoryPublic, responses=_errors(401, 404),
             tags=["jobs"])
    def get_job_memory(job_id: str, caller: Caller) -> JobMemoryPublic:
        """The job's memory timeline (its last attempt): RSS samples with phase marks."""
        with sessions() as session:
            job = owned_job(session, job_id, caller)
            row = fleet.timeline(session, job_id)
            if row is None:
                raise NotFound(f"no memory timeline for job {job_id} yet")
            return JobMemoryPublic(job_id=job_id, attempt=row.attempt, interval_s=row.interval_s,
                                   peak_rss_bytes=job.peak_rss_bytes, samples=row.timeline)

    @app.get("/v1/workers", response_model=list[WorkerPublic], responses=_errors(401), tags=["fleet"])
    def list_workers(caller: Caller) -> list[WorkerPublic]:
        """Every worker that has sent a heartbeat; `alive` is false once it stops (not counted as capacity)."""
        with sessions() as session:
            return [worker_public(w, fleet.is_alive(w, settings.worker_stale_s)) for w in fleet.workers(session)]

    @app.get("/v1/models", response_model=list[ModelPublic], responses=_errors(401), tags=["fleet"])
    def list_models(caller: Caller) -> list[ModelPublic]:
        """The models live workers serve, with the memory profiles their jobs measured."""
        with sessions() as session:
            live = fleet.live_workers(session, settings.worker_stale_s)
            profiles = fleet.all_profiles(session)
        out = []
        for name in sorted({w.model for w in live}):
            ws = [w for w in live if w.model == name]
            out.append(ModelPublic(
                name=name, workers=len(ws), largest_budget_bytes=max(w.budget_bytes for w in ws),
                runtimes=sorted({f"{w.backend}/{w.precision}/{w.memory_mode}" for w in ws}),
                profiles=[ProfilePublic.model_validate(p, from_attributes=True) for p in profiles if p.model == name],
            ))
        return out

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}},
                                                            **_errors(401)}, tags=["ops"])
    def metrics(caller: Caller) -> Response:
        """Prometheus text format, read from the database and Redis: the same on every API host."""
        body, content_type = render_metrics(sessions, broker, settings)
        return Response(body, media_type=content_type)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
