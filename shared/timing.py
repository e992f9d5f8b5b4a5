"""Time, as memory is: a job's predicted generation seconds from what the same worker's jobs measured (seconds
per denoising step, and per image around the steps: prompt encoding, decode, PNG), kept in the memory profile
of each shape; and a queued job's expected start from the predicted work ahead of it on the workers that can
take it, or why none is taking it. Pure functions: the API predicts at admission and at every read of a queued
job, the worker measures, the bench compares."""

from __future__ import annotations

import heapq
import math
import statistics
from dataclasses import dataclass

from shared.jobs import ModelDefaults
from shared.memory import Profile, Shape, guidance_on, latent_pixels

# How much the latest job counts in a profile's time (an exponential moving average): a host's speed changes
# with what else runs on it, and the latest jobs say best what the next one will take.
LATEST_WEIGHT = 0.5


def unet_passes(guidance_scale: float, defaults: ModelDefaults) -> int:
    """UNet passes per denoising step that a job's memory shape does not show: 2 where classifier-free guidance
    runs as two batch-1 passes (split guidance: the worker announces `guidance_doubles_batch: false` for a
    model whose guidance is no embedding), else 1 (no guidance; an LCM's embedding; or one batch-2 pass, which
    the shape's `guidance` already counts)."""
    split = not defaults.guidance_doubles_batch and defaults.family != "lcm"
    return 2 if split and guidance_on(guidance_scale) else 1


@dataclass(frozen=True)
class StepTiming:
    """What one complete job measured, for its shape's profile."""

    step_s: float | None  # per UNet pass of a step (the mean step, each image's first excluded); None: 1 step
    image_overhead_s: float | None  # per image, beside its steps: prompt encoding, decode, PNG
    job_overhead_s: float | None = None  # per job, beside its images: the start's heartbeat, progress, checkpoint


def measured(step_times: list[float], first_steps: list[float], image_times: list[float], elapsed_s: float,
             steps: int, passes: int, known_step_s: float | None) -> StepTiming:
    """A job's timing from its step intervals: the mean of `step_times`, every step but each image's first (which
    also holds the prompt's encoding), `first_steps` those first ones, `image_times` each image's whole time, `elapsed_s`
    the job's whole generation (what the record's generation_s is). A job of one step per image measures no
    step alone: its images' time is split with `known_step_s` (per pass, predicted from this worker's
    profiles), else with the first step itself (encoding included: an over-estimate, replaced once a job of 2
    steps or more measures the step)."""
    if not image_times:
        return StepTiming(None, None)
    # the mean, not the median: what n steps take is n times the mean, slow ones included (the median would
    # leave the slow steps' excess to the image's overhead, and a 1-step job would be predicted with it)
    step = statistics.mean(step_times) / passes if step_times else None
    basis = step if step is not None else known_step_s
    if basis is None and first_steps:
        basis = statistics.median(first_steps) / passes
    if basis is None:
        return StepTiming(None, None)
    image = max(0.0, statistics.mean(image_times) - steps * passes * basis)
    job = max(0.0, elapsed_s - sum(image_times))
    return StepTiming(step if step is not None else (None if known_step_s is not None else basis), image, job)


@dataclass(frozen=True)
class TimePrediction:
    seconds: float  # the whole generation: job overhead + images x (image overhead + steps x passes x step)
    source: str  # "profile" (this shape measured) or "scaled" (from other measured shapes)
    detail: str
    step_s: float  # per denoising step of this job
    image_overhead_s: float
    job_overhead_s: float


def _along(points: list[tuple[float, float]], x: float) -> float:
    """y at x, piecewise linearly from measured (x, y) points: between the nearest points below and above x;
    past the largest, along the line through the two largest (never sloping down); below the smallest, along
    that line too while it stays between what the smallest gives in proportion (no fixed part) and as it is
    (all fixed), else at the geometric middle of those two (the curve bends at small sizes: within the square
    root of their ratio of either); from a single point, in proportion above it and at that middle below. A
    fixed part per step (the
    scheduler, the calls into OpenVINO) shows as the line's intercept, which a proportion from one point would
    scale with the size."""
    by_x: dict[float, list[float]] = {}
    for px, py in points:
        by_x.setdefault(px, []).append(py)
    pts = sorted((px, sum(ys) / len(ys)) for px, ys in by_x.items())
    near_x, near_y = min(pts, key=lambda p: abs(p[0] - x))
    if near_x == x:
        return near_y
    proportional = near_y * x / near_x if near_x else near_y
    if len(pts) == 1:
        return proportional if x > near_x else math.sqrt(proportional * near_y)
    below = [p for p in pts if p[0] < x]
    above = [p for p in pts if p[0] > x]
    if below and above:
        (x0, y0), (x1, y1) = below[-1], above[0]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = sorted(sorted(pts, key=lambda p: abs(p[0] - x))[:2])
    y = near_y + max(0.0, (y1 - y0) / (x1 - x0)) * (x - near_x)
    if above:  # below the smallest measured: between no fixed part (in proportion) and all fixed (as there)
        return y if proportional <= y <= near_y else math.sqrt(proportional * near_y)
    return y


def _step_along(timed: list[Profile], shape: Shape) -> float:
    """A step's seconds (per UNet pass) at a shape not measured, from the measured ones, along latent pixels:
    from the profiles with the same UNet batch (guidance or not) where there are two or more; from one such
    profile, in the proportion the other batch's profiles change between its size and this one; with none, the
    other batch's figure at this size, times the batch's ratio (guidance runs a batch of two: twice the work)."""
    x = latent_pixels(shape.width, shape.height)
    same = [p for p in timed if p.shape.guidance == shape.guidance]
    other = [p for p in timed if p.shape.guidance != shape.guidance]

    def points(ps: list[Profile]) -> list[tuple[float, float]]:
        return [(latent_pixels(p.shape.width, p.shape.height), p.step_s) for p in ps]

    if len(same) >= 2 or (same and not other):
        return _along(points(same), x)
    if same:
        (p,) = same
        at = latent_pixels(p.shape.width, p.shape.height)
        return p.step_s * _along(points(other), x) / _along(points(other), at)
    return _along(points(other), x) * (2.0 if shape.guidance else 0.5)


def predict_time(shape: Shape, steps: int, images: int, profiles: list[Profile],
                 passes: int = 1) -> TimePrediction | None:
    """A job's generation seconds on a worker with these profiles (its model, backend, precision and memory
    mode), or None when none of them measured time yet: the job's own overhead + images x (the image's overhead
    + steps x passes x the step). This shape's own figures when measured, else from the measured shapes: the
    step along latent pixels among the shapes of the same UNet batch (`_step_along`), the image's overhead
    along latent pixels among all (decode and PNG grow with the image; the prompt's encoding does not: the
    line's intercept), the job's the median of all (it does not depend on the shape)."""
    timed = [p for p in profiles if p.step_s is not None and p.image_overhead_s is not None]
    if not timed:
        return None
    own = next((p for p in timed if p.shape == shape), None)
    jobs = [p.job_overhead_s for p in ([own] if own is not None and own.job_overhead_s is not None else timed)
            if p.job_overhead_s is not None]
    job = statistics.median(jobs) if jobs else 0.0  # the same whatever the shape: the median of those measured
    if own is not None:
        step, overhead = own.step_s, own.image_overhead_s
        source, detail = "profile", f"measured on {own.samples} job(s) of this shape"
    else:
        step = _step_along(timed, shape)
        overhead = _along([(latent_pixels(p.shape.width, p.shape.height), p.image_overhead_s) for p in timed],
                          latent_pixels(shape.width, shape.height))
        names = sorted({f"{p.shape.width}x{p.shape.height}{' with guidance' if p.shape.guidance else ''}"
                        for p in timed})
        source = "scaled"
        detail = f"scaled by latent pixels from {len(names)} measured shape(s): {', '.join(names[:4])}" + \
            (", ..." if len(names) > 4 else "")
    per_step = step * passes
    return TimePrediction(job + images * (overhead + steps * per_step), source, detail, per_step, overhead, job)


# ---- waiting ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    """A live worker that covers a queued job's memory class, as its heartbeat says."""

    name: str
    state: str  # loading, ready, paused
    state_reason: str | None
    running_left_s: float | None  # the predicted seconds left of the job it runs (0: idle; None: unknown)
    busy: bool


@dataclass(frozen=True)
class Waiting:
    expected_start_s: float | None
    reason: str | None


def waiting(servers: list[Server], ahead: int, ahead_s: float | None, model: str,
            no_server: str | None = None) -> Waiting:
    """When a queued job may start, and why it has not. `servers`: the live workers of its model whose memory
    class covers it; `ahead`: the queued jobs those workers take before it (higher priority, or the same and
    enqueued earlier), `ahead_s` their predicted seconds (None: unknown). `no_server`: why no worker covers it.

    The expected start (`expected_start`) is when the ready workers, each free once its running job has what
    it has left, have taken the jobs ahead: seconds from now, or None when it cannot be said (no ready worker,
    or some of that work has no measurement yet)."""
    if not servers:
        return Waiting(None, no_server or f"no live worker serves model {model!r}: it waits for one")
    ready = [s for s in servers if s.state == "ready"]
    if not ready:
        if all(s.state == "paused" for s in servers):
            why = "; ".join(f"{s.name}: {s.state_reason or 'paused'}" for s in servers)
            every = "the only worker" if len(servers) == 1 else f"every worker ({len(servers)})"
            return Waiting(None, f"{every} that can take it is paused ({why})")
        if all(s.state == "loading" for s in servers):
            why = "; ".join(sorted({s.state_reason or "loading" for s in servers}))
            return Waiting(None, f"its worker{'s are' if len(servers) > 1 else ' is'} loading the model ({why})")
        why = "; ".join(f"{s.name} {s.state}" + (f": {s.state_reason}" if s.state_reason else "") for s in servers)
        return Waiting(None, f"no worker that can take it is ready ({why})")
    running = [s for s in ready if s.busy]
    free_at = [s.running_left_s if s.busy else 0.0 for s in ready]
    start = expected_start(free_at, ahead, ahead_s) if ahead_s is not None and None not in free_at else None
    others = [s for s in servers if s.state != "ready"]
    aside = f"; {len(others)} more {'is' if len(others) == 1 else 'are'} " + \
        ", ".join(sorted({s.state for s in others})) if others else ""
    n = len(ready)
    if len(running) < n:  # a worker is free: it takes the jobs ahead first, then this one
        if ahead == 0:
            return Waiting(start, f"starting: a worker that can take it is free{aside}")
        return Waiting(start, f"{ahead} job(s) queued ahead of it, for {n} worker(s) that can take it "
                              f"({len(running)} busy){aside}")
    return Waiting(start, f"{'the' if n == 1 else f'all {n}'} worker{'s' if n > 1 else ''} that can take it "
                          f"{'are' if n > 1 else 'is'} busy: {len(running)} job(s) running, {ahead} queued ahead of it"
                          + aside)


def expected_start(free_at: list[float], ahead: int, ahead_s: float) -> float:
    """When a job starts behind `ahead` jobs of `ahead_s` seconds in all, on workers free in `free_at` seconds:
    each job ahead (at their average) goes to whichever worker is free first, and this one to the first free
    after them. Past a thousand jobs ahead, their work shared evenly (what that comes to anyway)."""
    if ahead > 1000:
        return (sum(free_at) + ahead_s) / len(free_at)
    each = ahead_s / ahead if ahead else 0.0
    heap = list(free_at)
    heapq.heapify(heap)
    for _ in range(ahead):
        heapq.heappush(heap, heapq.heappop(heap) + each)
    return heap[0]
