"""Admission: a job is accepted only if some live worker serving its model has the memory it is predicted
to need; otherwise the refusal carries the numbers and concrete changes that would fit."""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from shared import fleet
from shared.errors import InsufficientMemory, ModelUnavailable
from shared.jobs import JobParameters
from shared.memory import Prediction, Shape, fmt_gb, guidance_on, predict
from shared.models import Worker

_FORMAT_TOKENS = re.compile(r"(^|[-_.])(int8|int4|fp16|fp32|f16|bf16|ov|openvino)(?=$|[-_.])")
_SIZES = (1024, 768, 512)


def _family(model: str) -> str:
    return _FORMAT_TOKENS.sub("", model.lower().rsplit("/", 1)[-1])


def _predict_on(session: Session, worker: Worker, model: str, shape: Shape) -> Prediction:
    known = fleet.profiles(session, model, worker.backend, worker.precision, worker.memory_mode)
    return predict(shape, known, worker.resident_bytes)


def _hint(message: str, change: dict, prediction: Prediction, budget: int) -> dict:
    return {"message": f"{message} would need ~{fmt_gb(prediction.bytes)}", "change": change,
            "predicted_bytes": prediction.bytes, "fits": prediction.bytes <= budget}


def hints(session: Session, params: JobParameters, worker: Worker, live: list[Worker]) -> list[dict]:
    """Changes of this job, each with its predicted peak on the largest worker, the ones that fit first."""
    shape = Shape(params.width, params.height, guidance_on(params.guidance_scale))
    budget = worker.budget_bytes
    out = []
    no_cfg = Shape(shape.width, shape.height, False)
    if shape.guidance:
        out.append(_hint("guidance_scale 1", {"guidance_scale": 1.0},
                         _predict_on(session, worker, params.model, no_cfg), budget))
    for side in _SIZES:
        if side * side >= params.width * params.height:
            continue
        out.append(_hint(f"{side}x{side}", {"width": side, "height": side},
                         _predict_on(session, worker, params.model, Shape(side, side, shape.guidance)), budget))
        if shape.guidance:
            out.append(_hint(f"{side}x{side} with guidance_scale 1",
                             {"width": side, "height": side, "guidance_scale": 1.0},
                             _predict_on(session, worker, params.model, Shape(side, side, False)), budget))
    family = _family(params.model)
    for other in {w.model for w in live if w.model != params.model and _family(w.model) == family}:
        kind = "int4" if "int4" in other.lower() else "int8" if "int8" in other.lower() else "other"
        best = max((w for w in live if w.model == other), key=lambda w: w.budget_bytes)
        pred = _predict_on(session, best, other, shape)
        out.append({"message": f"the {kind} variant of this model ({other}) would need ~{fmt_gb(pred.bytes)}",
                    "change": {"model": other}, "predicted_bytes": pred.bytes,
                    "fits": pred.bytes <= best.budget_bytes})
    out.sort(key=lambda h: (not h["fits"], h["predicted_bytes"]))
    return out


def admit(session: Session, params: JobParameters, stale_s: float) -> Prediction:
    """The prediction on the first live worker it fits; raises when none serves the model or none fits."""
    live = fleet.live_workers(session, stale_s)
    serving = [w for w in live if w.model == params.model]  # largest budget first
    if not serving:
        served = sorted({w.model for w in live})
        raise ModelUnavailable(
            f"no live worker serves model {params.model!r}"
            + (f"; served now: {', '.join(served)}" if served else "; no worker is live"),
            {"model": params.model, "served_models": served},
        )
    shape = Shape(params.width, params.height, guidance_on(params.guidance_scale))
    first = None
    for worker in serving:
        prediction = _predict_on(session, worker, params.model, shape)
        first = first or prediction
        if prediction.bytes <= worker.budget_bytes:
            return prediction
    largest = serving[0]
    tips = hints(session, params, largest, live)
    fitting = [h["message"] for h in tips if h["fits"]]
    raise InsufficientMemory(
        f"this job is predicted to need {fmt_gb(first.bytes)} ({first.source}: {first.detail}); the largest "
        f"live worker serving {params.model!r} has a budget of {fmt_gb(largest.budget_bytes)}"
        + (f". Would fit: {'; '.join(fitting)}" if fitting else ". No single change listed would fit"),
        {"predicted_bytes": first.bytes, "prediction_source": first.source,
         "largest_budget_bytes": largest.budget_bytes, "worker": largest.name, "hints": tips},
    )
