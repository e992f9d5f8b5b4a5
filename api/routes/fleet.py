"""/v1/workers, /v1/models, /metrics and /healthz: the fleet as the database sees it."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Response
from sqlalchemy import text

from api.admission import (
    FleetView, WorkerFit, decide_on_fleet, fit_auto, fits_on, model_defaults, parameters_on, refusal, requested_model,
    shape_on,
)
from api.deps import Caller, Ctx
from api.errors import responses
from api.metrics import render_metrics
from shared import fleet
from shared.errors import InsufficientMemory
from shared.fleet_contract import (ModelPublic, ModePlan, PlanFit, PlanPublic, ProfilePublic, WorkerPlan,
                                   WorkerPublic)
from shared.jobs import JobParameters, JobShape
from shared.memory import fmt_size, predict
from shared.models import Worker
from shared.queue import top_class
from shared.settings import decodes_in_tiles

router = APIRouter()


@dataclass(frozen=True)
class PlanDecision:
    view: FleetView
    serving: list[Worker]
    params: JobParameters
    fits: list[WorkerFit]


@router.get("/v1/workers", response_model=list[WorkerPublic], responses=responses(), tags=["fleet"])
def list_workers(caller: Caller, ctx: Ctx) -> list[WorkerPublic]:
    """Every worker heard from in the last SDFLEET_WORKER_FORGET_S; `alive` is false once it stops sending
    heartbeats (it is no capacity then), and it is forgotten after that long."""
    with ctx.sessions() as session:
        now = fleet.db_now(session)
        return [fleet.public(w, ctx.settings.worker_stale_s, now)
                for w in fleet.workers(session, seen_within_s=ctx.settings.worker_forget_s)]


@router.post("/v1/plan", response_model=PlanPublic, responses=responses(422, 503), tags=["fleet"])
async def plan(shape: JobShape, caller: Caller, ctx: Ctx) -> PlanPublic:
    """What admission would decide for a job of this shape: each live worker's predicted peak (the same
    prediction a submission is admitted by, on the same cached view of the fleet), its memory class and
    whether it fits; the prediction of each runtime with measured profiles; and, when none fits, the changes
    that would, and what a submission with `fit: auto` would be admitted with."""
    model = requested_model(shape.model, ctx.settings.default_model)
    fixed = {"prompt": "", "negative_prompt": None, "seed": 0}

    def decide(view: FleetView) -> PlanDecision:
        serving, params = parameters_on(view, model, shape.model_dump(exclude={"model"}), **fixed)
        return PlanDecision(view, serving, params, fits_on(view, params, serving))

    decided = await decide_on_fleet(ctx.fleet, decide, refused=lambda d: not any(f.fits for f in d.fits))
    view, serving, params, fits = decided.view, decided.serving, decided.params, decided.fits
    fitting = [f for f in fits if f.fits]
    hints, fit = [], None
    if not fitting:
        refused = refusal(view, params, fits)
        hints = refused.details["hints"]
        try:
            _, admitted, record = fit_auto(view, params, shape.model_dump(exclude={"model"}), refused, **fixed)
            fit = PlanFit(**record.model_dump(), predicted_peak_bytes=admitted.prediction.bytes,
                          memory_class_bytes=admitted.memory_class_bytes)
        except InsufficientMemory:
            pass
    runtimes = {(backend, precision, mode): known
                for (name, backend, precision, mode), known in view.profiles.items() if name == model}
    job_shape = shape_on(serving[0], params)
    best = min(fitting, key=lambda f: f.memory_class_bytes) if fitting else None
    modes = []
    for (backend, precision, mode), known in sorted(runtimes.items()):
        p = predict(job_shape, known, None, decodes_in_tiles(mode))
        modes.append(ModePlan(backend=backend, precision=precision, memory_mode=mode, predicted_peak_bytes=p.bytes,
                              prediction_source=p.source, detail=p.detail))
    if best:
        message = (f"admitted: {len(fitting)} of {len(fits)} live worker(s) fit; routed to the "
                   f"{fmt_size(best.memory_class_bytes)} class (predicted peak {fmt_size(best.prediction.bytes)})")
    else:
        message = f"refused: no live worker serving {model!r} fits a predicted {fmt_size(fits[0].prediction.bytes)}"
    return PlanPublic(
        model=model, width=params.width, height=params.height, guidance_scale=params.guidance_scale,
        guidance=job_shape.guidance,
        num_images=params.num_images, admitted=best is not None,
        memory_class_bytes=best.memory_class_bytes if best else None, message=message,
        workers=[WorkerPlan(name=f.worker.name, host=f.worker.host, state=f.worker.state, backend=f.worker.backend,
                            precision=f.worker.precision, memory_mode=f.worker.memory_mode,
                            budget_bytes=f.worker.budget_bytes, class_limit_bytes=top_class(f.worker.budget_bytes),
                            resident_bytes=f.worker.resident_bytes, predicted_peak_bytes=f.prediction.bytes,
                            prediction_source=f.prediction.source, detail=f.prediction.detail,
                            memory_class_bytes=f.memory_class_bytes, fits=f.fits) for f in fits],
        modes=modes, hints=hints, fit=fit,
    )


@router.get("/v1/models", response_model=list[ModelPublic], responses=responses(), tags=["fleet"])
def list_models(caller: Caller, ctx: Ctx) -> list[ModelPublic]:
    """The models live workers serve, with the memory profiles their jobs measured."""
    with ctx.sessions() as session:
        live = fleet.live_workers(session, ctx.settings.worker_stale_s)
        profiles = fleet.all_profiles(session)
    out = []
    for name in sorted({w.model for w in live}):
        ws = [w for w in live if w.model == name]
        out.append(ModelPublic(
            name=name, workers=len(ws), largest_budget_bytes=max(w.budget_bytes for w in ws),
            runtimes=sorted({f"{w.backend}/{w.precision}/{w.memory_mode}" for w in ws}),
            defaults=model_defaults(ws),
            profiles=[ProfilePublic.model_validate(p, from_attributes=True) for p in profiles if p.model == name],
        ))
    return out


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}, **responses(503)},
            tags=["ops"])
def metrics(caller: Caller, ctx: Ctx) -> Response:
    """Prometheus text format, read from the database and Redis: the same on every API host."""
    body, content_type = render_metrics(ctx.sessions, ctx.broker, ctx.settings)
    return Response(body, media_type=content_type)


@router.get("/healthz", tags=["ops"], responses={503: responses(503)[503]})
def healthz(ctx: Ctx) -> dict:
    """200 when the database answers; never needs a key."""
    with ctx.sessions() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok"}
