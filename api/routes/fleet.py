"""/v1/workers, /v1/models, /metrics and /healthz: the fleet as the database sees it."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import text

from api.deps import Caller, Ctx
from api.errors import responses
from api.metrics import render_metrics
from shared import fleet
from shared.jobs import ModelPublic, ProfilePublic, WorkerPublic

router = APIRouter()


@router.get("/v1/workers", response_model=list[WorkerPublic], responses=responses(), tags=["fleet"])
def list_workers(caller: Caller, ctx: Ctx) -> list[WorkerPublic]:
    """Every worker that has sent a heartbeat; `alive` is false once it stops (not counted as capacity)."""
    with ctx.sessions() as session:
        now = fleet.db_now(session)
        return [fleet.public(w, ctx.settings.worker_stale_s, now) for w in fleet.workers(session)]


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
