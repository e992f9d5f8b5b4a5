"""Admission: a job is accepted only if some live worker serving its model has the memory it is predicted
to need; otherwise the refusal carries the numbers and concrete changes that would fit."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar

from sqlalchemy.orm import Session

from shared import fleet
from shared.errors import InsufficientMemory, InvalidRequest, ModelUnavailable
from shared.jobs import FALLBACK_DEFAULTS, FitRecord, JobParameters, ModelDefaults, Work, job_work
from shared.memory import LeverSet, Prediction, Profile, Shape, choose_lever_set, fmt_size, predict
from shared.models import Worker
from shared.queue import memory_class, top_class
from shared.settings import decoded_key, decodes_in_tiles, job_decoder, lever_set_keys
from shared.timing import TimePrediction, predict_time, unet_passes

if TYPE_CHECKING:
    from api.submit import FleetCache

T = TypeVar("T")

_FORMAT_TOKENS = re.compile(r"(^|[-_.])(int8|int4|fp16|fp32|f16|bf16|ov|openvino)(?=$|[-_.])")
_SIZES = (1024, 768, 512)


def _family(model: str) -> str:
    return _FORMAT_TOKENS.sub("", model.lower().rsplit("/", 1)[-1])


def announced_defaults(worker: Worker) -> ModelDefaults:
    """What the worker announced of its model (a row from before defaults were announced: SD 1.5's)."""
    return ModelDefaults.model_validate(worker.defaults) if worker.defaults else FALLBACK_DEFAULTS


def model_defaults(serving: list[Worker]) -> ModelDefaults:
    """A model's defaults: its largest live worker's (`serving` is largest first)."""
    return announced_defaults(serving[0]) if serving else FALLBACK_DEFAULTS


_DEFAULTED = ("width", "height", "steps", "guidance_scale")


def with_defaults(fields: dict, defaults: ModelDefaults, model: str) -> dict:
    """A request's fields with what it left out (None) taken from the model's defaults; refuses what the
    model cannot do (a negative prompt for an LCM, whose guidance is an embedding)."""
    if fields.get("negative_prompt") and not defaults.negative_prompt:
        reason = (f"model {model!r} ({defaults.family}, {defaults.pipeline}) takes no negative prompt: its "
                  f"guidance is an embedding, not a second pass")
        raise InvalidRequest(f"negative_prompt: {reason}", [{"field": "negative_prompt", "reason": reason}])
    return {**fields, **{k: getattr(defaults, k) for k in _DEFAULTED if fields.get(k) is None}}


def requested_model(model: str | None, default: str | None) -> str:
    """The model a request names, or the API's default (SDFLEET_DEFAULT_MODEL)."""
    if not (model or default):
        raise InvalidRequest("model: no model named and the API has no default (SDFLEET_DEFAULT_MODEL)",
                             [{"field": "model", "reason": "required when the API has no default model"}])
    return model or default


def parameters_on(view: "FleetView", model: str, fields: dict, **fixed) -> tuple[list[Worker], JobParameters]:
    """The live workers serving `model` (largest first; ModelUnavailable when none does) and the job's
    parameters: what the request left out is the model's own default, as its workers announce it now."""
    serving = view.serving(model)
    return serving, JobParameters(**with_defaults(fields, model_defaults(serving), model), model=model, **fixed)


async def decide_on_fleet(cache: "FleetCache", decide: Callable[["FleetView"], T],
                          refused: Callable[[T], bool] = lambda _: False) -> T:
    """`decide` on the cached view of the fleet; a refusal (ModelUnavailable or InsufficientMemory raised, or
    `refused`) is decided again on a fresh read: a worker may have come up, or its profiles changed."""
    try:
        decided = decide(await cache.get())
        if not refused(decided):
            return decided
    except (ModelUnavailable, InsufficientMemory):
        pass
    return decide(await cache.get(fresh=True))


def work_on(worker: Worker, params) -> Work:
    """The job's work on this worker's model (`params`: JobParameters or a job's row): guidance doubles the
    UNet's batch unless the model takes it as an embedding (LCM); an init image adds its encode."""
    defaults = announced_defaults(worker)
    return job_work(params, defaults.guidance_doubles_batch, defaults.family)


def shape_on(worker: Worker, params) -> Shape:
    return work_on(worker, params).shape


@dataclass
class FleetView:
    """What admission decides by, read in one go: the live workers (largest budget first) and the memory
    profiles of the models they serve. The submit path keeps one for about a second (SDFLEET_API_CACHE_S)
    and decides every job it admits on it; a refusal is always decided on a fresh read."""

    live: list[Worker]
    profiles: dict[tuple[str, str, str, str], list[Profile]]
    read_at: float = field(default_factory=time.monotonic)
    decided: dict = field(default_factory=dict)  # (model, width, height, guidance) -> Admission, on this view

    @classmethod
    def read(cls, session: Session, stale_s: float) -> "FleetView":
        live = fleet.live_workers(session, stale_s)
        return cls(live, fleet.profiles_of(session, {w.model for w in live}))

    def serving(self, model: str) -> list[Worker]:
        """The live workers serving `model`, largest budget first. Raises when none serves it."""
        serving = [w for w in self.live if w.model == model]
        if not serving:
            served = sorted({w.model for w in self.live})
            raise ModelUnavailable(
                f"no live worker serves model {model!r}"
                + (f"; served now: {', '.join(served)}" if served else "; no worker is live"),
                {"model": model, "served_models": served},
            )
        return serving


def _sets_on(view: FleetView, worker: Worker, model: str, shape: Shape, decoder: str | None) -> list[LeverSet]:
    """The lever sets a worker runs jobs in that admission can judge, fastest first, with their profiles: its
    memory mode's, or an auto worker's sets measured so far (its cheapest alone, by the prior, before any was).
    Every one starts from the resident figure the worker announces (an auto worker's: its cheapest set's); a
    set that keeps components between jobs has them in its profiles' base. A job decoded by the model's own VAE
    on a worker with a tiny one is judged by the profiles of such jobs (`decoder`: the one the job asks for)."""
    decoder = job_decoder(worker.memory_mode, "img2img" if shape.encodes else "txt2img", decoder)
    sets = [LeverSet(key, view.profiles.get((model, worker.backend, worker.precision, decoded_key(key, decoder)), []),
                     worker.resident_bytes, decodes_in_tiles(key)) for key in lever_set_keys(worker.memory_mode)]
    return [s for s in sets if s.profiles] or sets[-1:]


def _predict_on(view: FleetView, worker: Worker, model: str, shape: Shape, decoder: str | None) -> Prediction:
    """A job's peak on a worker: in its lever set, or on an auto worker in the cheapest set it can switch to:
    the least of the predictions of its sets measured so far (each from its own profiles), or the cheapest
    set's prior when none is."""
    return min((predict(shape, s.profiles, s.resident_bytes, s.tiled_decode)
                for s in _sets_on(view, worker, model, shape, decoder)), key=lambda p: p.bytes)


@dataclass(frozen=True)
class Admission:
    prediction: Prediction
    memory_class_bytes: int  # the queue it is routed to: the smallest class that holds the prediction


def _hint(message: str, change: dict, prediction: Prediction, budget: int) -> dict:
    return {"message": f"{message} would need ~{fmt_size(prediction.bytes)}", "change": change,
            "predicted_bytes": prediction.bytes, "fits": prediction.bytes <= budget}


def hints(view: FleetView, params: JobParameters, worker: Worker) -> list[dict]:
    """Changes of this job, each with its predicted peak on the largest worker, the ones that fit first."""
    shape = shape_on(worker, params)
    budget = top_class(worker.budget_bytes)
    out = []
    no_cfg = Shape(shape.width, shape.height, False, encodes=shape.encodes)
    if shape.guidance:
        out.append(_hint("guidance_scale 1", {"guidance_scale": 1.0},
                         _predict_on(view, worker, params.model, no_cfg, params.decoder), budget))
    for side in _SIZES if params.kind != "upscale" else ():  # (an upscale's own size is its tiles')
        if side * side >= params.width * params.height:
            continue
        out.append(_hint(f"{side}x{side}", {"width": side, "height": side},
                         _predict_on(view, worker, params.model, Shape(side, side, shape.guidance, encodes=shape.encodes),
                                     params.decoder),
                         budget))
        if shape.guidance:
            out.append(_hint(f"{side}x{side} with guidance_scale 1",
                             {"width": side, "height": side, "guidance_scale": 1.0},
                             _predict_on(view, worker, params.model, Shape(side, side, False, encodes=shape.encodes),
                                         params.decoder),
                             budget))
    if job_decoder(worker.memory_mode, params.kind, params.decoder) == "full" and params.kind == "txt2img" \
            and worker.memory_mode.endswith("+tiny_vae"):
        out.append(_hint("decoder tiny (the tiny VAE)", {"decoder": "tiny"},
                         _predict_on(view, worker, params.model, shape, "tiny"), budget))
    family = _family(params.model)
    for other in {w.model for w in view.live if w.model != params.model and _family(w.model) == family}:
        kind = "int4" if "int4" in other.lower() else "int8" if "int8" in other.lower() else "other"
        best = max((w for w in view.live if w.model == other), key=lambda w: w.budget_bytes)
        pred = _predict_on(view, best, other, shape, params.decoder)
        out.append({"message": f"the {kind} variant of this model ({other}) would need ~{fmt_size(pred.bytes)}",
                    "change": {"model": other}, "predicted_bytes": pred.bytes,
                    "fits": pred.bytes <= top_class(best.budget_bytes)})
    out.sort(key=lambda h: (not h["fits"], h["predicted_bytes"]))
    return out


@dataclass(frozen=True)
class WorkerFit:
    """One live worker's view of a job: its prediction, the class that holds it, and whether that fits."""

    worker: Worker
    prediction: Prediction
    memory_class_bytes: int | None  # None: larger than the largest class
    fits: bool


def fits_on(view: FleetView, params: JobParameters, serving: list[Worker]) -> list[WorkerFit]:
    """The prediction admission uses, on each worker: what `sdfleet plan` shows and what `admit` decides by."""
    out = []
    for worker in serving:
        prediction = _predict_on(view, worker, params.model, shape_on(worker, params), params.decoder)
        ceiling = memory_class(prediction.bytes)
        out.append(WorkerFit(worker, prediction, ceiling,
                             ceiling is not None and ceiling <= top_class(worker.budget_bytes)))
    return out


def admit(view: FleetView, params: JobParameters) -> Admission:
    """Route the job among the live workers serving its model: on each, its predicted peak and the memory
    class that holds it; the smallest class some worker covers wins (a job never waits for a bigger worker
    than it needs). Raises when none covers the class its job needs. The decision depends on the model and
    the shape only, so it is kept on the view for the next job of the same shape."""
    memo = (params.model, params.width, params.height, params.guidance_scale, params.kind, params.tile,
            params.decoder)
    if memo in view.decided:
        return view.decided[memo]
    fits = fits_on(view, params, view.serving(params.model))
    fitting = [f for f in fits if f.fits]
    if fitting:
        best = min(fitting, key=lambda f: f.memory_class_bytes)
        view.decided[memo] = Admission(best.prediction, best.memory_class_bytes)
        return view.decided[memo]
    raise refusal(view, params, fits)


def refusal(view: FleetView, params: JobParameters, fits: list[WorkerFit]) -> InsufficientMemory:
    """Why no worker can take the job, with the changes that would fit on the largest one."""
    first, largest = fits[0].prediction, fits[0].worker
    tips = hints(view, params, largest)
    fitting = [h["message"] for h in tips if h["fits"]]
    usable = top_class(largest.budget_bytes)
    return InsufficientMemory(
        f"this job is predicted to need {fmt_size(first.bytes)} ({first.source}: {first.detail}); the largest "
        f"live worker serving {params.model!r} has a budget of {fmt_size(largest.budget_bytes)}, of which its "
        f"memory class takes jobs up to {fmt_size(usable)}"
        + (f". Would fit: {'; '.join(fitting)}" if fitting else ". No single change listed would fit"),
        {"predicted_bytes": first.bytes, "prediction_source": first.source,
         "largest_budget_bytes": largest.budget_bytes, "largest_class_bytes": usable, "worker": largest.name,
         "hints": tips},
    )


def fit_auto(view: FleetView, params: JobParameters, fields: dict, refused: InsufficientMemory,
             **fixed) -> tuple[JobParameters, Admission, FitRecord]:
    """`fit: auto`: a job `admit` refused, admitted with the first of the refusal's hints that fits. The hint's
    change is a plain change of the parameters: the request's `fields` with it merged in, made parameters
    again as the request's were (`fixed` as there); a change of model takes that model's defaults for what
    the request left out (parameters_on). Admitted again, not taken on the hint's word: a hint whose change
    does not pass (the other model's defaults make another shape, or refuse the request) is passed over for
    the next one that fits. Raises the refusal when none passes."""
    for hint in refused.details["hints"]:
        if not hint["fits"]:
            break  # the hints that fit come first
        change = hint["change"]
        try:
            _, fitted = parameters_on(view, change.get("model", params.model),
                                      {**fields, **{k: v for k, v in change.items() if k != "model"}}, **fixed)
            admitted = admit(view, fitted)
        except (InsufficientMemory, InvalidRequest, ModelUnavailable):
            continue
        asked, runs = params.model_dump(), fitted.model_dump()
        changed = [k for k in runs if runs[k] != asked[k]]
        return fitted, admitted, FitRecord(changes={k: runs[k] for k in changed},
                                           original={k: asked[k] for k in changed},
                                           reason=refused.message, hint=hint["message"])
    raise refused


def time_on(view: FleetView, worker: Worker, params) -> TimePrediction | None:
    """A job's generation seconds on this worker (`params`: JobParameters or a job's row): from its runtime's
    profiles (shared/timing.py), or None."""
    work = work_on(worker, params)
    # the set the worker would run it in: on an auto worker, the fastest measured one that fits its class
    sets = _sets_on(view, worker, params.model, work.shape, getattr(params, "decoder", None))
    chosen = choose_lever_set(work.shape, sets, top_class(worker.budget_bytes))
    known = next(s.profiles for s in sets if s.key == chosen.key)
    return predict_time(work.shape, work.steps, work.passes, known,
                        unet_passes(params.guidance_scale, announced_defaults(worker)))


def class_workers(view: FleetView, model: str, memory_class_bytes: int | None) -> list[Worker]:
    """The live workers of `model` that take jobs of this memory class (their largest class covers it)."""
    return [w for w in view.live if w.model == model and top_class(w.budget_bytes) >= (memory_class_bytes or 0)]


def predict_generation(view: FleetView, params, memory_class_bytes: int | None) -> float | None:
    """A job's predicted generation seconds on the workers that can take it (those whose memory class covers
    its class: any of them may): the median of their predictions (with runtimes that differ, the middle one:
    neither the fastest's promise nor the slowest's), or None when none has measured time yet. Kept on the
    view per model, shape, steps, images and class."""
    memo = ("time", params.model, params.width, params.height, params.guidance_scale, params.steps,
            params.num_images, getattr(params, "kind", None), getattr(params, "strength", None),
            getattr(params, "tile", None), getattr(params, "decoder", None), memory_class_bytes)
    if memo not in view.decided:
        seconds = [p.seconds for w in class_workers(view, params.model, memory_class_bytes)
                   if (p := time_on(view, w, params)) is not None]
        view.decided[memo] = statistics.median(seconds) if seconds else None
    return view.decided[memo]
