"""The generate task's body: claim the job, check it fits this host, run it one image per pass under the
memory meter and guard, with progress and cancel checked at a bounded rate and checkpoints written as it
goes (worker/resume.py), and store the outcome, its memory timeline, and what it teaches the memory profile.
A Python exception fails the job (with its code) and the worker goes on to the next one; a worker that
leaves (SIGTERM, its owner taking the host back) hands the job back with its checkpoint."""

from __future__ import annotations

import dataclasses
import enum
import gc
import io
import logging
import threading
import time
from dataclasses import dataclass

from celery import Celery
from celery.exceptions import Reject, SoftTimeLimitExceeded
from PIL import Image

from shared import deliveries, fleet, jobstore, previews
from shared.db import session_factory
from shared.errors import ErrorCode
from shared.jobs import JobParameters, Work, job_work
from shared.memory import LeverChoice, LeverSet, Prediction, Shape, choose_lever_set, fmt_size
from shared.queue import memory_class, send_generate, send_webhook, top_class
from shared.retry import is_transient, retrying
from shared.settings import decoded_key, job_decoder
from shared.timing import StepTiming, measured, predict_time, unet_passes
from worker.process import HOST, RunningJob, WorkerProcess
from worker.meter import JobMeter, MemoryBudgetExceeded, release_free_memory
from worker.pipelines import PHASES, CheckpointError, ImageRequest
from worker.preview import MEDIA_TYPE, encode
from worker.resume import Keeper
from worker.upscale import upscale

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    pass


class JobLeft(Exception):
    """The worker leaves the job (it is stopping, or its owner took the host back): hand it back."""


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def work_of(params: JobParameters, worker: WorkerProcess) -> Work:
    return job_work(params, worker.defaults.guidance_doubles_batch, worker.defaults.family)


def shape_of(params: JobParameters, worker: WorkerProcess) -> Shape:
    return work_of(params, worker).shape


def kind_of(params: JobParameters, worker: WorkerProcess, key: str) -> tuple:
    """A job's kind: its lever set, decoder and shape. The runtime's buffers are kept for a next job of the same."""
    return key, job_decoder(worker.memory_mode, params.kind, params.decoder), shape_of(params, worker)


class InputMissing(Exception):
    """An image job whose init image is not stored (it fails the job: no attempt would find it)."""


def _read_inputs(sessions, params: JobParameters, job_id: str) -> dict[str, Image.Image]:
    """The job's input images, at the size the job runs at: the init image (RGB; an upscale's enlarged to its
    output) and the mask (L). The API stored them decoded and checked, as PNG."""
    if params.kind == "txt2img":
        return {}

    def read():
        with sessions() as session:
            return jobstore.input_images(session, job_id)

    stored = retrying(read)
    if "image" not in stored:
        raise InputMissing(f"job {job_id} is a {params.kind} job but its init image is not stored")
    out = {}
    for role, png in stored.items():
        image = Image.open(io.BytesIO(png))
        image.load()
        if image.size != (params.width, params.height):
            image = image.resize((params.width, params.height), Image.Resampling.LANCZOS if role == "image"
                                 else Image.Resampling.BILINEAR)
        out[role] = image.convert("RGB" if role == "image" else "L")
    return out


class Monitor:
    """Writes a running job's progress and reads its cancel flag every `interval_s`, in its own thread:
    the denoising loop only touches memory (no database write per step on a fast model). With previews on
    (`preview_interval_s` > 0), the loop hands it the latents of a step at most that often (the first step at
    once); it renders, encodes and writes the preview with its next progress write, in the same transaction."""

    def __init__(self, sessions, attempt: jobstore.Attempt, interval_s: float, preview_interval_s: float = 0.0):
        self.sessions, self.attempt, self.interval_s = sessions, attempt, interval_s
        self.position = (0, 0, attempt.parameters.steps)  # image, step, steps
        self.cancelled = threading.Event()
        self._written = None
        self._stop = threading.Event()
        self.preview_interval_s = preview_interval_s
        self._preview_due = 0.0 if preview_interval_s > 0 else float("inf")  # time.monotonic() it is due at
        self._preview = None  # (image, step, steps, render) from the loop, for the next sync
        self.preview_writes: list[tuple[int, float]] = []  # (bytes, seconds to render, encode and write)

    def preview_due(self) -> bool:
        """From on_step: whether to hand over this step's latents (one clock read per step)."""
        return time.monotonic() >= self._preview_due

    def offer_preview(self, image: int, step: int, steps: int, render) -> None:
        """From on_step: `render` (the pipeline's `preview()`) makes the preview of this step, in the monitor's
        thread; None: this pipeline has none."""
        self._preview_due = time.monotonic() + self.preview_interval_s
        if render is not None:
            self._preview = (image, step, steps, render)

    def _rendered(self):
        taken, self._preview = self._preview, None
        if taken is None:
            return None
        image, step, steps, render = taken
        try:
            picture = render()
            return None if picture is None else (image, step, steps, encode(picture), picture.width, picture.height)
        except Exception:  # a preview is a nicety: never the job's failure
            log.warning("job %s: preview not rendered; no more for this job", self.attempt.job_id, exc_info=True)
            self._preview_due = float("inf")
            return None

    def sync(self) -> None:
        position = self.position
        t0 = time.perf_counter()
        preview = self._rendered()
        try:
            self._write(position, preview)
        except Exception as exc:
            if preview is None or is_transient(exc):
                raise
            # e.g. a worker's database role not brought up to date (`sdfleet db worker-role` after an upgrade):
            # the progress and the cancel check go on without previews
            log.warning("job %s: preview not written (%s: %s); no more for this job", self.attempt.job_id,
                        type(exc).__name__, str(exc)[:200])
            self._preview_due = float("inf")
            self._write(position, None)
            preview = None
        if preview is not None:
            self.preview_writes.append((len(preview[3]), time.perf_counter() - t0))
        self._written = position

    def _write(self, position, preview) -> None:
        """The progress (if it moved), the cancel check and the preview, in one transaction."""
        with self.sessions.begin() as session:
            if jobstore.sync_running(session, self.attempt, position if position != self._written else None):
                self.cancelled.set()
            if preview is not None:
                image, step, steps, data, width, height = preview
                previews.save(session, self.attempt.job_id, self.attempt.number, image, step, steps, data,
                              MEDIA_TYPE, width, height)

    def _try_sync(self) -> None:
        try:
            self.sync()
        except Exception as exc:  # progress is best effort; the job's result is what must be stored
            if not is_transient(exc):
                raise
            log.warning("progress of job %s not written: database unreachable", self.attempt.job_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._try_sync()

    def __enter__(self) -> "Monitor":
        self._try_sync()  # a cancel asked for before the job started is seen before its first step
        self._thread = threading.Thread(target=self._run, name="sdfleet-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class StepClock:
    """The denoising steps' and images' times: the slowest step (what the hard time limit must leave room for),
    and for the time profile every step apart from each image's first (which also holds the prompt's
    encoding), those first ones, and each image's whole time (encoding to PNG). `clean` stays true while every
    image ran whole in this attempt (none resumed from a checkpoint or run twice): only then does the job's
    time teach its profile."""

    def __init__(self):
        self.last = self.image_start = time.perf_counter()
        self.slowest = 0.0
        self.steps: list[float] = []
        self.first_steps: list[float] = []
        self.images: list[float] = []
        self.clean = True
        self._first = True

    def restart(self) -> None:
        """An image starts (or starts again)."""
        self.last = self.image_start = time.perf_counter()
        self._first = True

    def tick(self) -> None:
        now = time.perf_counter()
        took = now - self.last
        self.slowest = max(self.slowest, took)
        (self.first_steps if self._first else self.steps).append(took)
        self._first = False
        self.last = now

    def image_done(self) -> None:
        self.images.append(time.perf_counter() - self.image_start)


def _generate_all(worker: WorkerProcess, params: JobParameters, meter: JobMeter, monitor: Monitor,
                  clock: StepClock, keeper: Keeper, given: dict[str, Image.Image]) -> list[jobstore.GeneratedImage]:
    start = keeper.start()
    images = list(start.images)
    image_index = len(images)
    if images or start.state is not None:
        clock.clean = False  # part of the job was done by an earlier attempt

    def leaving() -> str | None:
        # the worker is stopping, paused too long, or the owner's programs took memory back: the job goes
        # elsewhere with its checkpoint (not the job's fault, not an attempt)
        starved = meter.starved_reason()
        return worker.leave_reason or (str(MemoryBudgetExceeded(*starved)) if starved else None)

    # an upscale's tiles are steps of one image: a snapshot of a tile is not the job's (it starts again)
    snapshot = worker.pipeline.snapshot if params.kind != "upscale" else None

    def on_step(step: int, total: int) -> None:
        clock.tick()
        monitor.position = (image_index, step, total)
        if monitor.preview_due():
            monitor.offer_preview(image_index, step, total, worker.pipeline.preview())
        if monitor.cancelled.is_set():
            raise JobCancelled()
        keeper.taken()
        leave = leaving()
        if leave is not None or (keeper.due() and step < total):
            keeper.save_step(image_index, step, total, snapshot)
        if leave is not None:
            raise JobLeft(leave)
        meter.check()  # the guard: abort at the next step once the sampler saw the budget crossed
        meter.mark("decode" if step == total else "denoise")

    for i in range(len(images), params.num_images):
        # one image per pass: N images cost the peak of one; seed + i makes image i reproducible alone
        image_index, seed = i, params.seed + i
        if monitor.cancelled.is_set():
            raise JobCancelled()
        meter.mark("encode", i)
        clock.restart()
        request = ImageRequest(
            prompt=params.prompt, negative_prompt=params.negative_prompt, width=params.width,
            height=params.height, steps=params.steps, guidance_scale=params.guidance_scale, seed=seed,
            resume=start.state if i == start.image else None, image=given.get("image"), mask=given.get("mask"),
            strength=params.strength, decoder=params.decoder,
        )
        try:
            if params.kind == "upscale":
                image = upscale(worker.pipeline, request, params.tile, on_step)
            else:
                image = worker.pipeline.generate(request, on_step)
        except CheckpointError as exc:
            keeper.refused(i, str(exc))
            clock.restart()
            clock.clean = False
            image = worker.pipeline.generate(dataclasses.replace(request, resume=None), on_step)
        done = jobstore.GeneratedImage(index=i, seed=seed, width=image.width, height=image.height, png=_png(image))
        last = i + 1 == params.num_images
        leave = leaving()
        if leave is not None and not last:  # it left during the decode: the finished image is kept
            keeper.save_image(done)
            raise JobLeft(leave)
        if leave is None:  # the last image done as the worker leaves: the job is stored, not handed back
            meter.check()
        images.append(done)
        if not last:
            keeper.save_image(done)
        clock.image_done()
    return images


class RunOutcome(str, enum.Enum):
    """What became of one delivered message (the task's result, in the worker's log)."""

    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    skipped = "skipped"  # nothing to run: unknown, a stale delivery, finished, or out of attempts
    handed_on = "handed on"  # too big for this worker: sent to a larger memory class
    handed_back = "handed back"  # the worker left it (stopping, or its owner's): queued again, checkpointed
    superseded = "superseded"  # another attempt took the job over while this one ran: its result is dropped


def run_job(job_id: str, delivery_id: str | None, worker: WorkerProcess, celery: Celery) -> RunOutcome:
    """Run one delivered job and say what became of it. Messages this sends (a webhook's hand-out to the ops
    workers, a job handed on to a larger class) go through `celery`."""
    with worker.buffer_lock:  # (the heartbeat gives idle buffers back only with it)
        worker.busy = True
        try:
            return _run_job(job_id, delivery_id, worker, celery)
        finally:
            _release_after_job(worker)  # a job that raised before its own release (it releases before its result)
            worker.busy = False
            worker.idle_since = time.monotonic()


def _run_job(job_id: str, delivery_id: str | None, worker: WorkerProcess, celery: Celery) -> RunOutcome:
    """Pre-check, claim, run, account, store."""
    sessions = session_factory(worker.settings.database_url)
    if worker.stopping is not None:
        raise Reject(f"stopping: {worker.stopping}", requeue=True)
    if worker.state == "paused":
        # a message taken just before the worker paused (its queues are cancelled at the pause): back to
        # the queue for another worker, after a moment so that a lost cancel cannot spin
        time.sleep(1)
        raise Reject(f"paused: {worker.state_reason}", requeue=True)
    check = _pre_check(sessions, job_id, delivery_id, worker, celery)
    if check.outcome is PreCheckOutcome.handed_on:
        return RunOutcome.handed_on
    if check.outcome is PreCheckOutcome.failed:
        return RunOutcome.failed
    attempt = _claim(sessions, job_id, delivery_id, worker, check.choice)
    if attempt is None:
        log.info("job %s: nothing to run (unknown, stale delivery, finished, or out of attempts)", job_id)
        _notify_if_due(sessions, job_id, celery)  # this delivery may just have ended it worker_lost / timeout
        return RunOutcome.skipped
    params = attempt.parameters
    if params.model != worker.model:
        return _fail_unrun(sessions, attempt, celery, ErrorCode.model_unavailable,
                           f"this worker serves {worker.model!r}, not {params.model!r}")
    # the pre-check's prediction for the job it read queued; a redelivered job that was already running
    # (the pre-check saw it not queued) is checked here
    choice = check.choice
    if check.params != params:
        choice = _expected(sessions, worker, params)
        _note_levers(sessions, attempt, choice)
    expected = choice.prediction
    if expected.bytes > worker.budget:
        return _fail_unrun(sessions, attempt, celery, ErrorCode.insufficient_memory,
                           f"predicted peak {fmt_size(expected.bytes)} ({expected.source}) exceeds this worker's "
                           f"budget of {fmt_size(worker.budget)}")
    if worker.leave_reason is not None:  # the worker began stopping as it claimed the job
        _release_after_job(worker)
        return _hand_back(sessions, worker, attempt, worker.leave_reason, celery)
    kind = kind_of(params, worker, choice.key)
    if worker.buffers is not None and worker.buffers[0] != kind:  # kept for a job of another kind
        worker.release_buffers()
    worker.use_levers(choice.key)
    worker.pipeline.keep(choice.kept, choice.kept_buffers, kind)
    worker.start_resident = worker.resident_for(worker.pipeline.levers)
    # what the job starts with beyond its lever set's own way: the last job's buffers, the components kept
    start_buffers = worker.buffers[1] if worker.buffers else 0
    start_components = sum(worker.pipeline.kept_compiled().values())
    if len(worker.lever_sets) > 1 or choice.kept:
        log.info("job %s: %s", attempt.job_id, choice.reason)
    run = _run(sessions, worker, attempt)
    if run.left is not None:
        _release_after_job(worker)
        return _hand_back(sessions, worker, attempt, run.left, celery)
    base = _account(worker, run, start_buffers, start_components)
    # Release and beat before the result is written: a client that submits its next job the moment this one
    # shows succeeded is admitted on what the worker holds now (the buffers this job left), not on a beat
    # from before it (once the API process's fleet view is renewed: within SDFLEET_API_CACHE_S).
    _release_after_job(worker, kind if run.code is None else None)
    return _store(sessions, worker, attempt, run, base, choice, celery)


def _hand_back(sessions, worker: WorkerProcess, attempt: jobstore.Attempt, why: str, celery: Celery) -> RunOutcome:
    """The worker leaves a running job (its checkpoint written): queued again, for any host, at once."""
    def write():
        with sessions.begin() as session:
            return jobstore.hand_back(session, attempt, why)

    job = retrying(write, patience_s=10)
    if job is None:
        return RunOutcome.superseded
    send_generate(celery, job.id, job.delivery_id, job.model, job.priority, job.memory_class_bytes)
    log.info("job %s handed back: %s", job.id, why)
    return RunOutcome.handed_back


def _release_after_job(worker: WorkerProcess, kind: tuple | None = None) -> None:
    """After a job's generation, once (a job is running until then): the job's garbage and freed heap go back to
    the OS, the runtime's buffers for the job's shape too (unless kept for a next job of its `kind`: a job that
    succeeded, of a kind whose buffers were measured), the weights' file pages are dropped (with the levers
    that say so), and a heartbeat at once: admission predicts the next jobs from what this one left resident."""
    if worker.running is None:
        return
    worker.running = None
    worker.paused_leave = None  # a pause hands back the job it ran through, not the next one
    gc.collect()
    release_free_memory()
    worker.release_buffers(kind)
    worker.pipeline.drop_weight_pages()
    worker.try_beat()


def _notify_if_due(sessions, job_id: str, celery: Celery) -> None:
    """A job that just ended with a webhook: hand its delivery to the ops workers."""
    def read():
        with sessions() as session:
            return deliveries.webhook_handout(session, job_id)

    handout = retrying(read, patience_s=10)
    if handout:
        send_webhook(celery, job_id, handout.delivery_id, handout.attempts_done)


class PreCheckOutcome(str, enum.Enum):
    run = "run"  # it fits here: claim it
    not_queued = "not queued"  # a redelivery after a lost worker, or nothing to run: the claim decides
    handed_on = "handed on"  # sent to the queue of the memory class that holds this worker's prediction
    failed = "failed"  # no live worker's class holds it: ended insufficient_memory


@dataclass(frozen=True)
class PreCheck:
    outcome: PreCheckOutcome
    params: JobParameters | None = None  # with `run`: the parameters checked
    choice: LeverChoice | None = None  # and the lever set it runs them in, with this worker's prediction there
    delivery_id: str | None = None  # with `handed on`: the delivery to send (None: the job changed meanwhile)
    ended: bool = False  # with `failed`: this worker ended the job (not another process first)

    @property
    def expected(self) -> Prediction | None:
        return self.choice.prediction if self.choice is not None else None


def _pre_check(sessions, job_id: str, delivery_id: str | None, worker: WorkerProcess, celery: Celery) -> PreCheck:
    """The worker's own pre-check, before it claims the job: profiles may have grown since admission, and
    this worker may run another memory mode than the one admission predicted for. A job it cannot fit goes
    to the queue of the memory class that holds this worker's prediction, if a live worker covers it, else
    it ends insufficient_memory."""
    def read():
        with sessions() as session:
            job = jobstore.queued_job(session, job_id, delivery_id)
            return (jobstore.parameters_of(job), job) if job is not None and job.model == worker.model else (None, None)

    params, job = retrying(read)
    if params is None:
        return PreCheck(PreCheckOutcome.not_queued)
    choice = _expected(sessions, worker, params)
    if choice.prediction.bytes <= worker.budget:
        return PreCheck(PreCheckOutcome.run, params, choice)
    return _hand_on(sessions, job, delivery_id, worker, choice.prediction, celery)


def _hand_on(sessions, job, delivery_id: str | None, worker: WorkerProcess, expected: Prediction,
             celery: Celery) -> PreCheck:
    target = memory_class(expected.bytes)

    def move() -> PreCheck:
        with sessions.begin() as session:
            classes = [top_class(w.budget_bytes) for w in fleet.live_workers(session, worker.settings.worker_stale_s,
                                                                              worker.model) if w.name != worker.name]
            if target is not None and any(c >= target for c in classes):
                return PreCheck(PreCheckOutcome.handed_on,
                                delivery_id=jobstore.hand_on(session, job, delivery_id or job.delivery_id, target))
            message = (f"predicted to need {fmt_size(expected.bytes)} ({expected.source}) on {worker.name}, past its "
                       f"budget of {fmt_size(worker.budget)}, and no live worker's memory class holds it (largest: "
                       f"{fmt_size(max(classes, default=0))})")
            return PreCheck(PreCheckOutcome.failed, ended=jobstore.fail_unplaceable(session, job, message))

    moved = retrying(move)
    if moved.outcome is PreCheckOutcome.handed_on and moved.delivery_id:
        send_generate(celery, job.id, moved.delivery_id, worker.model, job.priority, target)
        log.info("job %s: predicted %s here, past the budget %s: handed on to memory class %s", job.id,
                 fmt_size(expected.bytes), fmt_size(worker.budget), fmt_size(target))
    elif moved.ended:
        _notify_if_due(sessions, job.id, celery)
    return moved


def _claim(sessions, job_id: str, delivery_id: str | None, worker: WorkerProcess,
           choice: LeverChoice | None) -> jobstore.Attempt | None:
    settings = worker.settings
    levers = (choice.key, choice.reason, choice.expected_bytes) if choice is not None else None

    def claim():
        with sessions.begin() as session:
            return jobstore.start_attempt(session, job_id, delivery_id, HOST, worker.name, settings.max_attempts,
                                          settings.job_timeout_s, levers)

    try:
        return retrying(claim, patience_s=30)
    except Exception as exc:
        if not is_transient(exc):
            raise
        # The database stayed away: the job is not this worker's fault. Its message goes back to the queue
        # (late ack) and the job is tried again; the reconciler covers the case where Redis loses it.
        log.warning("job %s: database unreachable at start (%s); handing the message back", job_id, exc)
        raise Reject(f"database unreachable: {type(exc).__name__}", requeue=True) from exc


def _expected(sessions, worker: WorkerProcess, params: JobParameters) -> LeverChoice:
    """The lever set this worker would run the job in, and its predicted peak there: its only set, or (auto) the
    fastest whose prediction fits its budget, each judged by its own profiles from what a job in it starts from."""
    pipeline = worker.pipeline

    def read_profiles():
        with sessions() as session:
            return fleet.profiles_of(session, {worker.model})

    known = retrying(read_profiles)
    decoder = job_decoder(worker.memory_mode, params.kind, params.decoder)
    sets = [LeverSet(lv.key, known.get((worker.model, pipeline.backend, pipeline.precision,
                                        decoded_key(lv.key, decoder)), []),
                     worker.resident_for(lv), lv.vae_tiles) for lv in worker.lever_sets]
    choice = choose_lever_set(shape_of(params, worker), sets, worker.budget)
    # what the chosen set releases and the job would load again, kept compiled where the budget has room
    task = "img2img" if params.kind == "upscale" else params.kind  # (an upscale's tiles are image-to-image)
    kept, buffers, kept_bytes = worker.keep_for(choice.key, choice.prediction.bytes, task, params.decoder,
                                                kind_of(params, worker, choice.key))
    if not kept:
        return choice
    with_buffers = f"; their buffers too: {', '.join(buffers)}" if buffers else ""
    return dataclasses.replace(choice, kept=kept, kept_buffers=buffers, kept_bytes=kept_bytes, reason=(
        f"{choice.reason}; kept compiled through the job: {', '.join(kept)}{with_buffers} ({fmt_size(kept_bytes)}: "
        f"the prediction plus them is {fmt_size(choice.prediction.bytes + kept_bytes)}, under the budget)"))


def _note_levers(sessions, attempt: jobstore.Attempt, choice: LeverChoice) -> None:
    """The job's lever set, chosen again after its claim (a redelivered job the pre-check did not see queued;
    otherwise the claim writes it)."""
    def write():
        with sessions.begin() as session:
            jobstore.note_levers(session, attempt, choice.key, choice.reason, choice.expected_bytes)

    retrying(write)


def _fail_unrun(sessions, attempt: jobstore.Attempt, celery: Celery, code: ErrorCode, message: str) -> RunOutcome:
    """End a claimed attempt that this worker will not run (another model, or more than its budget)."""
    def write():
        with sessions.begin() as session:
            jobstore.finish_failed(session, attempt, code, message, None, None)

    retrying(write)
    _notify_if_due(sessions, attempt.job_id, celery)
    return RunOutcome.failed


@dataclass(frozen=True)
class Generation:
    """What one attempt's run came to: its images, or why it stopped (`code`), and what it measured."""

    images: list[jobstore.GeneratedImage]
    code: ErrorCode | None
    message: str | None
    elapsed_s: float
    meter: JobMeter
    clock: StepClock
    left: str | None = None  # the worker left the job (why): to be handed back, not stored

    @property
    def slowest_step_s(self) -> float:
        return self.clock.slowest

    @property
    def outcome(self) -> RunOutcome:
        if self.code is None:
            return RunOutcome.succeeded
        return RunOutcome.cancelled if self.code is ErrorCode.cancelled else RunOutcome.failed


def _run(sessions, worker: WorkerProcess, attempt: jobstore.Attempt) -> Generation:
    """Generate the job's images under the memory guard and the job monitor (progress, cancel)."""
    settings = worker.settings
    # the guard: the job's own RSS against the budget, and the host's available memory against half the
    # pause threshold (the owner's programs came back while the job ran)
    meter = JobMeter(settings.memory_sample_interval_s, budget_bytes=worker.budget,
                     min_available_bytes=settings.pause_available_bytes // 2)
    clock = StepClock()
    keeper = Keeper(sessions, attempt, worker.model, worker.pipeline, HOST, settings.checkpoint_interval_s)
    monitor = Monitor(sessions, attempt, settings.progress_interval_s, settings.preview_interval_s)
    images, code, message, left = [], None, None, None
    t0 = time.perf_counter()
    try:
        with meter, monitor:
            worker.running = RunningJob(attempt, meter)
            worker.try_beat()  # at once, not at the next beat: a worker killed now still leaves a reading
            given = _read_inputs(sessions, attempt.parameters, attempt.job_id)
            # the pipeline's phases as its components start (the prompt's encode, an init image's, the steps from
            # the first UNet pass, the decode): the timeline's marks, and what a profile is split by
            worker.pipeline.on_phase = meter.mark
            try:
                images = _generate_all(worker, attempt.parameters, meter, monitor, clock, keeper, given)
            finally:
                worker.pipeline.on_phase = None
    except JobLeft as exc:
        left = str(exc)
    except JobCancelled:
        code, message = ErrorCode.cancelled, "cancelled while running"
    except MemoryBudgetExceeded as exc:
        code, message = ErrorCode.out_of_memory, f"aborted: {exc}"
    except InputMissing as exc:
        code, message = ErrorCode.generation_failed, str(exc)
    except SoftTimeLimitExceeded:
        code, message = ErrorCode.timeout, f"the job ran past SDFLEET_JOB_TIMEOUT_S={settings.job_timeout_s}"
    except Exception as exc:
        log.exception("job %s failed", attempt.job_id)
        code, message = ErrorCode.generation_failed, f"{type(exc).__name__}: {exc}"
    if keeper.writes:
        sizes, times = zip(*keeper.writes)
        log.info("job %s: %d checkpoint(s) written, %d KiB and %.1f ms each at most", attempt.job_id, len(sizes),
                 max(sizes) >> 10, 1000 * max(times))
    if monitor.preview_writes:
        sizes, times = zip(*monitor.preview_writes)
        log.info("job %s: %d preview(s) written, %d bytes and %.1f ms (render, encode, write) each at most",
                 attempt.job_id, len(sizes), max(sizes), 1000 * max(times))
    return Generation(images, code, message, time.perf_counter() - t0, meter, clock, left)


def _account(worker: WorkerProcess, run: Generation, start_buffers: int, start_components: int) -> int:
    """The memory-accounting rule: what this job teaches the worker's resident figure, and the base its
    profile is recorded against (returned). Buffers kept from the last job (`start_buffers`) are out of both:
    the job reuses them, so its peak has them, and its rise above its base must too. Components kept compiled
    are in both, as in the job's peak: scaled to another shape they cancel, and a worker that no longer keeps
    them is predicted high, never low. The resident figure leaves both out (`start_components`: what the kept
    components held as the job started)."""
    reading = run.meter.reading
    rss_before = reading.rss_before_bytes - start_buffers
    # What encoding the prompt took above the job's start (text encoders compiled for it, in a mode that
    # releases them): the same for every shape, on top of whatever the worker holds then. Not so where
    # every component is loaded per phase: the UNet is compiled before the first step ends the "encode" mark.
    encode_peak = run.meter.phase_peak("encode")
    prompt_only = not worker.pipeline.levers.release_all
    encode_bytes = max(0, encode_peak - reading.rss_before_bytes) if encode_peak is not None and prompt_only else 0
    encoders_kept = any(PHASES.get(name) == "encode" for name in worker.pipeline.kept_compiled())
    # The profile's base is what predictions start from (for a pipeline that releases components between
    # jobs, what it loads again in each, which holds the weights), or the RSS the job started at if higher;
    # never the little a low-memory worker holds between jobs, or the weights would count twice when scaled
    # to another size. The prompt encoding stays out of it: scaled with the shape, it covers the VAE's
    # attention, which grows faster than the pixels (SD 1.5 at 1024x1024 from 768x512).
    base = max(worker.start_resident, rss_before)
    worker.last_start = rss_before - start_components
    if run.code is None and not encoders_kept:  # (kept, they were not compiled for the prompt)
        worker.encode_bytes = encode_bytes
    return base


def _profile_key(worker: WorkerProcess, params: JobParameters) -> str:
    """The key of the profile a job of these parameters teaches: its lever set's, without the tiny VAE for a job
    decoded by the model's own."""
    return decoded_key(worker.pipeline.levers.key, job_decoder(worker.memory_mode, params.kind, params.decoder))


def _timing(sessions, worker: WorkerProcess, params: JobParameters, run: Generation) -> StepTiming | None:
    """What this job teaches its profile of time: its mean step (per UNet pass), the time per image beside
    the steps, and the job's own beside its images (its whole generation is what its record's generation_s
    says, and what is predicted). None for a job that did not run whole here (resumed, or an image run
    twice)."""
    clock = run.clock
    work = work_of(params, worker)
    if not clock.clean or params.kind == "upscale" or not work.steps:  # (an upscale's steps are its tiles')
        return None
    passes = unet_passes(params.guidance_scale, worker.defaults)
    known = None
    if not clock.steps:  # one step per image: the step's share of it is what this worker's profiles predict
        def read_profiles():
            with sessions() as session:
                return fleet.profiles(session, worker.model, worker.pipeline.backend, worker.pipeline.precision,
                                      _profile_key(worker, params))

        predicted = predict_time(work.shape, work.steps, work.passes, retrying(read_profiles), passes)
        known = predicted.step_s / passes if predicted else None
    return measured(clock.steps, clock.first_steps, clock.images, run.elapsed_s, work.steps, passes, known)


def _store(sessions, worker: WorkerProcess, attempt: jobstore.Attempt, run: Generation, base: int,
           choice: LeverChoice, celery: Celery) -> RunOutcome:
    """The profile (complete runs only: what the job measured, with what it kept compiled), then the result and
    its memory timeline; the webhook's hand-out."""
    reading, pipeline = run.meter.reading, worker.pipeline

    def learn() -> None:
        # Only complete runs teach the profile: an aborted job's peak is a lower bound, and scaled to other
        # sizes it would refuse jobs that fit. Its own transaction: a profile can never undo a result. Before
        # the result, like the beat: whoever sees the job succeeded is admitted on what it measured.
        timing = _timing(sessions, worker, attempt.parameters, run)
        with sessions.begin() as session:
            fleet.record_profile(session, worker.model, pipeline.backend, pipeline.precision,
                                 _profile_key(worker, attempt.parameters), shape_of(attempt.parameters, worker),
                                 reading.peak_rss_bytes, base, run.slowest_step_s or None, timing,
                                 run.meter.first_image_phases())

    def finish() -> bool:
        with sessions.begin() as session:
            if run.code is None:
                ok = jobstore.finish_succeeded(session, attempt, run.images, run.elapsed_s, reading)
            else:
                ok = jobstore.finish_failed(session, attempt, run.code, run.message, reading, run.elapsed_s)
            if ok:
                fleet.save_timeline(session, attempt.job_id, attempt.number, run.meter.interval_s, run.meter.timeline())
            return ok

    if run.code is None:
        try:
            retrying(learn)
        except Exception:
            log.exception("job %s: its memory profile was not recorded", attempt.job_id)
    ok = retrying(finish)
    log.info("job %s %s in %.2f s, peak %s (predicted %s, %s%s), slowest step %.2f s", attempt.job_id,
             run.outcome.value, run.elapsed_s, fmt_size(reading.peak_rss_bytes), fmt_size(choice.expected_bytes),
             choice.prediction.source, f", with {', '.join(choice.kept)} kept" if choice.kept else "",
             run.slowest_step_s)
    if ok:
        _notify_if_due(sessions, attempt.job_id, celery)
    return run.outcome if ok else RunOutcome.superseded
