"""The submission API: validates a job, admits it against the fleet's memory, stores it, enqueues its ID,
and answers from the database by job ID.
It imports no model stack (torch, diffusers, OpenVINO): it stays small and starts in about a second."""

from __future__ import annotations

import contextlib
import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.admission import admit
from shared import fleet, store
from shared.db import engine_for, migrate, session_factory, wait_for_database
from shared.errors import ErrorCode, InvalidRequest, NotFound, SdfleetError, ServiceUnavailable
from shared.jobs import (
    MAX_SEED, ImageLink, JobCreate, JobError, JobMemoryPublic, JobParameters, JobPublic, JobStatus, ModelPublic,
    ProfilePublic, WorkerPublic,
)
from shared.models import Job, Worker
from shared.queue import GENERATE_TASK, make_celery, queue_name
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {
    404: {"model": ErrorBody, "description": "No such job or image"},
    422: {"model": ErrorBody, "description": "invalid_request (the field and the reason are in details) or "
          "insufficient_memory (the predicted peak, the largest budget, and hints that would fit)"},
    503: {"model": ErrorBody, "description": "model_unavailable (no live worker serves the model) or "
          "service_unavailable (the database or the broker is unreachable)"},
}


def error_response(status: int, code: ErrorCode, message: str, details: Any = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, details=details))
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"))


def _field_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc[:1] == ["body"]:
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


def job_public(job: Job) -> JobPublic:
    wait = (job.started_at - job.created_at).total_seconds() if job.started_at else None
    error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobPublic(
        id=job.id,
        status=JobStatus(job.status),
        parameters=store.parameters_of(job),
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_wait_s=wait,
        generation_s=job.generation_s,
        peak_rss_bytes=job.peak_rss_bytes,
        peak_rss_anon_bytes=job.peak_rss_anon_bytes,
        peak_rss_file_bytes=job.peak_rss_file_bytes,
        rss_before_bytes=job.rss_before_bytes,
        peak_rss_method=job.peak_rss_method,
        predicted_peak_bytes=job.predicted_peak_bytes,
        prediction_source=job.prediction_source,
        worker_host=job.worker_host,
        attempts=job.attempts,
        error=error,
        images=[
            ImageLink(index=i.index, seed=i.seed, width=i.width, height=i.height,
                      url=f"/v1/jobs/{job.id}/images/{i.index}.png")
            for i in job.images
        ],
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    sessions = session_factory(settings.database_url)
    celery = make_celery(settings)

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
        return error_response(exc.http_status, exc.code, exc.message, exc.details)

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

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, ErrorCode.internal, f"internal error ({type(exc).__name__})")

    @app.post("/v1/jobs", status_code=202, response_model=JobPublic, responses=ERRORS, tags=["jobs"])
    def submit_job(job: JobCreate, response: Response) -> JobPublic:
        """Queue a text-to-image job; answers at once with its ID (poll GET /v1/jobs/{id})."""
        model = job.model or settings.default_model
        if model is None:
            raise InvalidRequest(
                "model: no model named and the API has no default (SDFLEET_DEFAULT_MODEL)",
                [{"field": "model", "reason": "required when the API has no default model"}],
            )
        params = JobParameters(
            **job.model_dump(exclude={"model", "seed"}),
            model=model,
            seed=job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1),
        )
        with sessions.begin() as session:
            prediction = admit(session, params, settings.worker_stale_s)
            row = store.create_job(session, params, prediction.bytes, prediction.source)
        try:
            celery.send_task(GENERATE_TASK, args=[row.id], queue=queue_name(model))
        except Exception as exc:  # the broker is down: keep nothing the client was not told about
            with sessions.begin() as session:
                session.delete(session.get(Job, row.id))
            raise ServiceUnavailable(f"the job queue is unreachable ({type(exc).__name__}); nothing was stored") from exc
        response.headers["Location"] = f"/v1/jobs/{row.id}"
        return job_public(row)

    @app.get("/v1/jobs/{job_id}", response_model=JobPublic, responses=ERRORS, tags=["jobs"])
    def get_job(job_id: str) -> JobPublic:
        with sessions() as session:
            job = store.get_job(session, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            return job_public(job)

    @app.get(
        "/v1/jobs/{job_id}/images/{index}.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **ERRORS},
        tags=["jobs"],
    )
    def get_image(job_id: str, index: int) -> Response:
        with sessions() as session:
            png = store.image_png(session, job_id, index)
        if png is None:
            raise NotFound(f"job {job_id} has no image {index}")
        return Response(png, media_type="image/png")

    @app.get("/v1/jobs/{job_id}/memory", response_model=JobMemoryPublic, responses=ERRORS, tags=["jobs"])
    def get_job_memory(job_id: str) -> JobMemoryPublic:
        """The job's memory timeline (its last attempt): RSS samples with phase marks."""
        with sessions() as session:
            job = store.get_job(session, job_id)
            row = fleet.timeline(session, job_id) if job else None
            if row is None:
                raise NotFound(f"no memory timeline for job {job_id}" + (" yet" if job else ""))
            return JobMemoryPublic(job_id=job_id, attempt=row.attempt, interval_s=row.interval_s,
                                   peak_rss_bytes=job.peak_rss_bytes, samples=row.timeline)

    @app.get("/v1/workers", response_model=list[WorkerPublic], tags=["fleet"])
    def list_workers() -> list[WorkerPublic]:
        """Every worker that has sent a heartbeat; `alive` is false once it stops (not counted as capacity)."""
        with sessions() as session:
            return [worker_public(w, fleet.is_alive(w, settings.worker_stale_s)) for w in fleet.workers(session)]

    @app.get("/v1/models", response_model=list[ModelPublic], tags=["fleet"])
    def list_models() -> list[ModelPublic]:
        """The models live workers serve, with the memory profiles their jobs measured."""
        with sessions() as session:
            live = fleet.live_workers(session, settings.worker_stale_s)
            profiles = fleet.all_profiles(session)
        out = []
        for name in sorted({w.model for w in live}):
            ws = [w for w in live if w.model == name]
            out.append(ModelPublic(
                name=name, workers=len(ws), largest_budget_bytes=max(w.budget_bytes for w in ws),
                runtimes=sorted({f"{w.backend}/{w.precision}" for w in ws}),
                profiles=[ProfilePublic.model_validate(p, from_attributes=True) for p in profiles if p.model == name],
            ))
        return out

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
