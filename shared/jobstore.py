"""Jobs in the database. Every status change goes through `transition`, a compare-and-set on the row, so two
processes (an API and a worker, or two workers after a redelivery) can never both win the same change. Also
here: a worker's claim on a job (`Attempt`) and its outcome, queue positions, cancel, and the public record."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace

from sqlalchemy import and_, case, false, func, or_, select, update
from sqlalchemy.orm import Session, aliased, defer, raiseload, selectinload

from shared import checkpoints, ids, previews
from shared.checkpoints import GeneratedImage  # noqa: F401  (jobstore.GeneratedImage: the results' type)
from shared.errors import Conflict, ErrorCode
from shared.jobs import (
    PRIORITY_ORDER, AttemptRecord, FitRecord, ImageLink, InputLink, JobError, JobParameters, JobPublic, JobStatus,
    PreviewLink, Progress,
    ResumeRecord, WebhookStatus, check_transition, check_webhook_transition,
)
from shared.memory import fmt_size
from shared.timing import Waiting
from shared.models import Job, JobImage, JobInput, JobTombstone, utcnow
from shared.queue import new_delivery_id


@dataclass(frozen=True)
class MemoryReading:
    peak_rss_bytes: int
    peak_rss_anon_bytes: int | None
    peak_rss_file_bytes: int | None
    rss_before_bytes: int
    method: str  # "vmhwm" or "sampler"

    def columns(self) -> dict:
        return {
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_anon_bytes": self.peak_rss_anon_bytes,
            "peak_rss_file_bytes": self.peak_rss_file_bytes,
            "rss_before_bytes": self.rss_before_bytes,
            "peak_rss_method": self.method,
        }

@dataclass(frozen=True)
class Attempt:
    """A worker's claim on a job: the attempt number fences off writes from an older, lost attempt."""

    job_id: str
    number: int
    parameters: JobParameters

def transition(
    session: Session, job_id: str, expect: JobStatus, new: JobStatus, *, attempt: int | None = None,
    expect_delivery: str | None = None, **values
) -> bool:
    """The one way a job's status changes: from `expect` to `new`, setting `values`, as a compare-and-set.
    False if the row was not in `expect` any more (or, given `attempt` or `delivery_id`, if another attempt
    or another enqueue has claimed it since). A job that ends with a webhook gets its delivery marked
    pending, with a fresh webhook delivery ID, in the same statement."""
    check_transition(expect, new)
    stmt = update(Job).where(Job.id == job_id, Job.status == expect.value)
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    if expect_delivery is not None:
        stmt = stmt.where(Job.delivery_id == expect_delivery)
    if new.is_terminal:
        check_webhook_transition(None, WebhookStatus.pending)
        values.setdefault("finished_at", utcnow())
        values["webhook_status"] = case((Job.has_webhook, WebhookStatus.pending.value), else_=None)
        values["webhook_delivery_id"] = case((Job.has_webhook, new_delivery_id()), else_=None)
        values.update(progress_step=None, progress_steps=None, progress_image=None)
    changed = session.execute(stmt.values(status=new.value, **values)).rowcount == 1
    if changed and new.is_terminal:
        checkpoints.drop(session, job_id)  # an ended job is never resumed
        previews.drop(session, job_id)  # its images are the result
    return changed

@dataclass(frozen=True)
class NewJob:
    params: JobParameters
    priority: str = "normal"
    owner_key_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    webhook_url: str | None = None
    predicted_peak_bytes: int | None = None
    prediction_source: str | None = None
    memory_class_bytes: int | None = None
    predicted_generation_s: float | None = None
    fitted: dict | None = None  # FitRecord, as JSON: what `fit: auto` changed

_JOB_COLUMNS = tuple(c.key for c in Job.__table__.columns)

def new_job_values(new: NewJob) -> dict:
    """Every column of a queued job's row (its ID, delivery ID, creation and enqueue time are set here): what
    `Job.__table__.insert()` takes, and, as `as_record`, what `to_public` reads."""
    now = utcnow()
    values = dict.fromkeys(_JOB_COLUMNS)
    values.update(new.params.model_dump(), id=ids.uuid4(), status=JobStatus.queued.value,
                  priority=new.priority, owner_key_id=new.owner_key_id, idempotency_key=new.idempotency_key,
                  request_hash=new.request_hash, webhook_url=new.webhook_url,
                  has_webhook=new.webhook_url is not None,
                  predicted_peak_bytes=new.predicted_peak_bytes, prediction_source=new.prediction_source,
                  memory_class_bytes=new.memory_class_bytes, predicted_generation_s=new.predicted_generation_s,
                  fitted=new.fitted,
                  delivery_id=new_delivery_id(), created_at=now,
                  enqueued_at=now, attempts=0, webhook_attempts=0, handoffs=0, leaves=0)
    return values

def as_record(values: dict, inputs: list[dict] = ()) -> SimpleNamespace:
    """A stored row's values read like a Job with no images (for `to_public` and `queue_position`), and the
    rows of the images it was given."""
    return SimpleNamespace(**values, images=[], inputs=[SimpleNamespace(**i) for i in inputs])

def create_job(session: Session, new: NewJob) -> Job:
    job = Job(**new_job_values(new), images=[])
    session.add(job)
    session.flush()
    return job

def find_idempotent(session: Session, owner_key_id: str | None, key: str) -> Job | None:
    return session.scalar(select(Job).where(
        func.coalesce(Job.owner_key_id, "") == (owner_key_id or ""), Job.idempotency_key == key))

def get_job(session: Session, job_id: str, owner_key_id: str | None = None) -> Job | None:
    """The job, or None; with an owner (a keyed API), only that owner's jobs exist for it."""
    job = session.get(Job, job_id)
    if job is not None and owner_key_id is not None and job.owner_key_id != owner_key_id:
        return None
    return job

def list_jobs(session: Session, owner_key_id: str | None, statuses: list[JobStatus], limit: int,
              after: tuple[datetime, str] | None = None) -> list[Job]:
    """The owner's jobs (every job on an open API), newest first, from just past `after` (the last row of
    the previous page: created_at, id). A keyset page: as cheap at the millionth job as at the first."""
    stmt = (select(Job).options(selectinload(Job.images), selectinload(Job.preview))
            .order_by(Job.created_at.desc(), Job.id.desc()).limit(limit))
    if owner_key_id is not None:
        stmt = stmt.where(Job.owner_key_id == owner_key_id)
    if statuses:
        stmt = stmt.where(Job.status.in_([s.value for s in statuses]))
    if after is not None:
        created, job_id = after
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    return list(session.scalars(stmt))

def count_jobs(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job))

def image_png(session: Session, job_id: str, index: int, owner_key_id: str | None = None) -> bytes | None:
    stmt = select(JobImage.png).join(Job).where(JobImage.job_id == job_id, JobImage.index == index)
    if owner_key_id is not None:
        stmt = stmt.where(Job.owner_key_id == owner_key_id)
    return session.scalar(stmt)

def input_png(session: Session, job_id: str, role: str, owner_key_id: str | None = None) -> bytes | None:
    stmt = select(JobInput.png).join(Job).where(JobInput.job_id == job_id, JobInput.role == role)
    if owner_key_id is not None:
        stmt = stmt.where(Job.owner_key_id == owner_key_id)
    return session.scalar(stmt)


def input_images(session: Session, job_id: str) -> dict[str, bytes]:
    """A job's input images by role (image, mask): what its worker reads once per attempt."""
    return dict(session.execute(select(JobInput.role, JobInput.png).where(JobInput.job_id == job_id)).all())


# The columns a worker never reads, nor may (its database role, `sdfleet db worker-role`, has no right to them):
# whose job it is and where its webhook goes. The worker's reads of a whole job leave them out (and its images).
WORKER_HIDDEN_COLUMNS = ("webhook_url", "owner_key_id", "idempotency_key", "request_hash")
_AS_WORKER = (*(defer(getattr(Job, c), raiseload=True) for c in WORKER_HIDDEN_COLUMNS), raiseload(Job.images),
              raiseload(Job.inputs), raiseload(Job.preview))


def parameters_of(job: Job) -> JobParameters:
    return JobParameters.model_validate(
        {name: getattr(job, name) for name in JobParameters.model_fields}
    )

def start_attempt(session: Session, job_id: str, delivery_id: str | None, host: str, worker_name: str,
                  max_attempts: int, job_timeout_s: float | None = None,
                  levers: tuple[str, str, int] | None = None) -> Attempt | None:
    """Claim a delivered job for this worker, or None when it must not run. `levers`: the lever set it will
    run in, why, and the worker's prediction there (note_levers), written with the claim.

    A message from an older enqueue (the reconciler has re-sent the job since) is stale: dropped. A job
    found `running` was delivered again because the worker running it died before anyone took the job
    back: it is taken back here (or ends worker_lost / timeout), then runs again.
    """
    job = session.get(Job, job_id, with_for_update=True, options=_AS_WORKER)
    if job is None or (delivery_id is not None and job.delivery_id != delivery_id):
        return None
    status = JobStatus(job.status)
    if status.is_terminal:
        return None
    if status is JobStatus.running:
        lost = f"the worker running attempt {job.attempts} (on {job.worker_host}) was lost"
        if take_back(session, job, lost, max_attempts, job_timeout_s, keep_delivery=True).outcome \
                is not TakeBackOutcome.queued:
            return None
        session.refresh(job)
    number = job.attempts + 1
    if not transition(
        session, job_id, JobStatus.queued, JobStatus.running,
        attempts=number, started_at=utcnow(), worker_host=host, worker_name=worker_name,
        error_code=None, error_message=None, peak_rss_bytes=None, peak_rss_method=None,
        peak_rss_anon_bytes=None, peak_rss_file_bytes=None, rss_before_bytes=None,
        progress_image=None, progress_step=None, progress_steps=None,
        **dict(zip(("lever_set", "lever_reason", "lever_predicted_bytes"), levers or (None, None, None))),
    ):
        return None
    return Attempt(job_id=job_id, number=number, parameters=parameters_of(job))

def _history(job: Job, code: ErrorCode, message: str) -> list[dict]:
    entry = AttemptRecord(attempt=job.attempts, worker_host=job.worker_host, started_at=job.started_at,
                          ended_at=utcnow(), error=JobError(code=code.value, message=message),
                          peak_rss_bytes=job.peak_rss_bytes)
    return [*(job.history or []), entry.model_dump(mode="json")]

class TakeBackOutcome(str, enum.Enum):
    queued = "queued again"  # its message is to be sent with `delivery_id`
    ended = "ended"  # past its timeout, or out of attempts: timeout / worker_lost
    changed = "it had moved on"  # another process changed the job first: nothing was written


@dataclass(frozen=True)
class TakeBack:
    outcome: TakeBackOutcome
    delivery_id: str | None = None  # with `queued`: the delivery to send (the old one with keep_delivery)


def take_back(session: Session, job: Job, lost: str, max_attempts: int, job_timeout_s: float | None = None,
              keep_delivery: bool = False) -> TakeBack:
    """A running job whose worker was lost: back to queued (its attempt in the history, its attempt count
    kept) with a new delivery ID (the old one with `keep_delivery`: its message is already back in the
    queue), or, once past its timeout or out of attempts, ended timeout / worker_lost."""
    reading = (f", at {fmt_size(job.peak_rss_bytes)} resident when last seen" if job.peak_rss_bytes else "")
    if job_timeout_s and job.started_at and utcnow() - job.started_at > timedelta(seconds=job_timeout_s):
        ended = transition(
            session, job.id, JobStatus.running, JobStatus.failed, attempt=job.attempts,
            expect_delivery=job.delivery_id, error_code=ErrorCode.timeout.value,
            error_message=f"the job ran past SDFLEET_JOB_TIMEOUT_S={job_timeout_s:g} ({lost}{reading})")
        return TakeBack(TakeBackOutcome.ended if ended else TakeBackOutcome.changed)
    counted = job.attempts - (job.leaves or 0)  # attempts handed back politely do not count
    if counted >= max_attempts:
        ended = transition(
            session, job.id, JobStatus.running, JobStatus.failed, attempt=job.attempts,
            expect_delivery=job.delivery_id, error_code=ErrorCode.worker_lost.value,
            error_message=(f"{lost}{reading}; that was attempt {counted} of {max_attempts}: "
                           "it will not be run again"))
        return TakeBack(TakeBackOutcome.ended if ended else TakeBackOutcome.changed)
    delivery = job.delivery_id if keep_delivery else new_delivery_id()
    moved = transition(
        session, job.id, JobStatus.running, JobStatus.queued, attempt=job.attempts,
        expect_delivery=job.delivery_id, history=_history(job, ErrorCode.worker_lost, lost + reading),
        delivery_id=delivery, progress_image=None, progress_step=None, progress_steps=None,
    )
    return TakeBack(TakeBackOutcome.queued, delivery) if moved else TakeBack(TakeBackOutcome.changed)

def hand_back(session: Session, attempt: Attempt, why: str) -> Job | None:
    """A worker gives a running job back (it is stopping, or its owner took the host back), its checkpoint
    written: back to queued with a new delivery ID, the attempt in the history as `worker_left` and not
    counted against SDFLEET_MAX_ATTEMPTS. The job (to send its message), or None if this attempt no longer
    held it."""
    job = session.get(Job, attempt.job_id, with_for_update=True, options=_AS_WORKER)
    if job is None or job.status != JobStatus.running.value or job.attempts != attempt.number:
        return None
    reading = f", at {fmt_size(job.peak_rss_bytes)} resident" if job.peak_rss_bytes else ""
    if not transition(
        session, job.id, JobStatus.running, JobStatus.queued, attempt=attempt.number,
        history=_history(job, ErrorCode.worker_left, f"{why}{reading}; handed back, not counted as an attempt"),
        delivery_id=new_delivery_id(), enqueued_at=utcnow(), leaves=Job.leaves + 1,
        progress_image=None, progress_step=None, progress_steps=None,
    ):
        return None
    session.refresh(job)
    return job


def note_resume(session: Session, attempt: Attempt, record: ResumeRecord) -> None:
    """How this attempt started from the checkpoint it found (resumed, or again and why): the job's record."""
    job = session.get(Job, attempt.job_id, with_for_update=True, options=_AS_WORKER)
    if job is None or job.status != JobStatus.running.value or job.attempts != attempt.number:
        return
    job.resumes = [*(job.resumes or []), record.model_dump(mode="json")]


def hand_on(session: Session, job: Job, delivery_id: str, ceiling: int) -> str | None:
    """A worker's own pre-check found a queued job too big for it: it goes to the queue of a larger memory
    class, with a new delivery ID (compare-and-set on the one this worker was handed), counted in `handoffs`.
    The delivery ID to send, or None if the job changed meanwhile."""
    new = new_delivery_id()
    moved = session.execute(update(Job).where(
        Job.id == job.id, Job.status == JobStatus.queued.value, Job.delivery_id == delivery_id,
    ).values(delivery_id=new, memory_class_bytes=ceiling, handoffs=Job.handoffs + 1)).rowcount
    return new if moved else None

def queued_job(session: Session, job_id: str, delivery_id: str | None) -> Job | None:
    """The job this message is for, if it is queued and the message is its current delivery."""
    job = session.get(Job, job_id, options=_AS_WORKER)
    if job is None or job.status != JobStatus.queued.value:
        return None
    if delivery_id is not None and job.delivery_id != delivery_id:
        return None
    return job

def fail_unplaceable(session: Session, job: Job, message: str) -> bool:
    """No live worker can take this queued job any more: it ends insufficient_memory."""
    return transition(session, job.id, JobStatus.queued, JobStatus.failed, expect_delivery=job.delivery_id,
                      error_code=ErrorCode.insufficient_memory.value, error_message=message)

def running_on(session: Session, worker_name: str) -> list[Job]:
    return list(session.scalars(select(Job).options(*_AS_WORKER).where(
        Job.status == JobStatus.running.value, Job.worker_name == worker_name).with_for_update()))

def requeue_lost_message(session: Session, job: Job) -> str | None:
    """A queued job whose message Redis lost: a new delivery ID (the old message, should it turn up, is
    stale); the caller sends it. None if another process changed the job first."""
    changed = session.execute(update(Job).where(
        Job.id == job.id, Job.status == JobStatus.queued.value, Job.delivery_id == job.delivery_id,
    ).values(delivery_id=(delivery := new_delivery_id()), enqueued_at=utcnow())).rowcount
    return delivery if changed == 1 else None

def cancel(session: Session, job_id: str, owner_key_id: str | None) -> Job | None:
    """Cancel a queued job (it will never run) or ask a running one to stop at its next step.
    None if there is no such job for this owner; Conflict if it has finished (also when it finished a
    moment ago, between our read and our write: the cancel request is itself a compare-and-set)."""
    job = get_job(session, job_id, owner_key_id)
    if job is None:
        return None
    status = JobStatus(job.status)
    if status is JobStatus.queued and transition(
        session, job_id, JobStatus.queued, JobStatus.cancelled, error_code=ErrorCode.cancelled.value,
        error_message="cancelled before it ran",
    ):
        session.expire(job)
        return job
    # running (or claimed by a worker a moment ago): it stops at its next denoising step
    asked = session.execute(update(Job).where(
        Job.id == job_id, Job.status.in_([JobStatus.queued.value, JobStatus.running.value]),
    ).values(cancel_requested_at=func.coalesce(Job.cancel_requested_at, utcnow()))).rowcount
    session.expire(job)
    if not asked:
        status = JobStatus(job.status)
        ended = "was already cancelled" if status is JobStatus.cancelled else f"has already {status.value}"
        raise Conflict(f"job {job_id} {ended}; there is nothing to cancel",
                       {"status": status.value})
    return job

def sync_running(session: Session, attempt: Attempt, progress: tuple[int, int, int] | None) -> bool:
    """Write a running job's progress (image, step, steps) if given; True if a cancel was asked for."""
    if progress is not None:
        image, step, steps = progress
        session.execute(update(Job).where(
            Job.id == attempt.job_id, Job.status == JobStatus.running.value, Job.attempts == attempt.number,
        ).values(progress_image=image, progress_step=step, progress_steps=steps))
    return session.scalar(select(Job.cancel_requested_at).where(Job.id == attempt.job_id)) is not None

def queue_position(session: Session, job: Job) -> int:
    """1 for the next job its model's workers will take: higher priorities first, then by enqueue time
    (ix_jobs_queue: one index range per priority ahead)."""
    mine = PRIORITY_ORDER[job.priority]
    higher = [p for p, rank in PRIORITY_ORDER.items() if rank < mine]
    ahead = select(func.count()).select_from(Job).where(
        Job.model == job.model, Job.status == JobStatus.queued.value, Job.id != job.id,
        or_(Job.priority.in_(higher), and_(Job.priority == job.priority, Job.enqueued_at < job.enqueued_at)),
    )
    return session.scalar(ahead) + 1

@dataclass(frozen=True)
class Ahead:
    """What is queued ahead of a job: its queue position (1: next for its model), and of the jobs ahead those
    that the workers able to take it take too (memory class up to `cap`): how many, the sum of their predicted
    generation seconds, and how many of them have a prediction."""

    position: int
    ahead: int
    predicted_s: float
    predicted: int


def queue_ahead(session: Session, jobs: list, caps: dict[str, int | None]) -> dict[str, Ahead]:
    """`Ahead` of each of these queued jobs, `caps` by job ID: the largest memory class the workers that can
    take it cover (None: none). One statement per model, priority and cap among them (a page of jobs is
    usually one), each walking the queue index once per job (ix_jobs_queue), not a query per job."""
    groups: dict[tuple, list] = {}
    for job in jobs:
        groups.setdefault((job.model, job.priority, caps.get(job.id)), []).append(job)
    out = {}
    for (model, priority, cap), members in groups.items():
        mine = PRIORITY_ORDER[priority]
        higher = [p for p, rank in PRIORITY_ORDER.items() if rank < mine]
        a = aliased(Job)
        # (an outer join's unmatched row has no ID: it is not a job ahead)
        taken = and_(a.id.is_not(None), func.coalesce(a.memory_class_bytes, 0) <= cap) if cap is not None else false()
        stmt = (select(Job.id, func.count(a.id), func.sum(case((taken, 1), else_=0)),
                       func.sum(case((taken, a.predicted_generation_s), else_=None)),
                       func.count(case((taken, a.predicted_generation_s), else_=None)))
                .select_from(Job)
                .outerjoin(a, and_(a.model == model, a.status == JobStatus.queued.value, a.id != Job.id,
                                   or_(a.priority.in_(higher),
                                       and_(a.priority == priority, a.enqueued_at < Job.enqueued_at))))
                .where(Job.id.in_([j.id for j in members]))
                .group_by(Job.id))
        for job_id, count, ahead, predicted_s, predicted in session.execute(stmt):
            out[job_id] = Ahead(count + 1, ahead or 0, predicted_s or 0.0, predicted or 0)
    return out


def queue_positions(session: Session, jobs: list[Job]) -> dict[str, int]:
    """`queue_position` of jobs stored together (in enqueue order): one count per model and priority, for the
    first of them; each later one of the same model and priority has exactly the earlier ones more ahead."""
    out, first = {}, {}
    for job in jobs:
        group = (job.model, job.priority)
        if group not in first:
            first[group] = (job, queue_position(session, job), 0)
        head, position, seen = first[group]
        out[job.id] = position + seen
        first[group] = (head, position, seen + 1)
    return out

def finish_succeeded(
    session: Session, attempt: Attempt, images: list[GeneratedImage], generation_s: float,
    memory: MemoryReading,
) -> bool:
    """Store the images and mark the job succeeded, all or nothing; False if this attempt was superseded."""
    if not transition(
        session, attempt.job_id, JobStatus.running, JobStatus.succeeded, attempt=attempt.number,
        generation_s=generation_s, **memory.columns(),
    ):
        return False
    session.add_all(
        JobImage(job_id=attempt.job_id, index=i.index, seed=i.seed, width=i.width, height=i.height, png=i.png)
        for i in images
    )
    return True

def note_peak(session: Session, attempt: Attempt, peak_bytes: int) -> None:
    """The running job's peak so far: what remains known if its worker is killed before it finishes."""
    session.execute(update(Job).where(
        Job.id == attempt.job_id, Job.status == JobStatus.running.value, Job.attempts == attempt.number,
    ).values(peak_rss_bytes=peak_bytes, peak_rss_method="partial"))

def note_levers(session: Session, attempt: Attempt, key: str, reason: str, predicted_bytes: int) -> None:
    """The lever set the running attempt runs in (its worker's memory mode, or auto's choice), why, and the
    worker's own prediction of the job's peak there."""
    session.execute(update(Job).where(
        Job.id == attempt.job_id, Job.status == JobStatus.running.value, Job.attempts == attempt.number,
    ).values(lever_set=key, lever_reason=reason, lever_predicted_bytes=predicted_bytes))


def finish_failed(
    session: Session, attempt: Attempt, code: ErrorCode, message: str, memory: MemoryReading | None,
    generation_s: float | None = None,
) -> bool:
    """End a running attempt without images: failed, or cancelled when the code says so."""
    new = JobStatus.cancelled if code is ErrorCode.cancelled else JobStatus.failed
    return transition(
        session, attempt.job_id, JobStatus.running, new, attempt=attempt.number,
        generation_s=generation_s, error_code=code.value, error_message=message,
        **(memory.columns() if memory else {}),
    )

def tombstone(session: Session, job_id: str, owner_key_id: str | None = None) -> JobTombstone | None:
    stone = session.get(JobTombstone, job_id)
    if stone is not None and owner_key_id is not None and stone.owner_key_id != owner_key_id:
        return None
    return stone

def to_public(job: Job, queue_position: int | None = None, waiting: Waiting | None = None) -> JobPublic:
    """The public record of a job (what GET answers and what a webhook carries); `waiting`, for a queued job,
    when it may start and why it has not (the API's read of the fleet)."""
    wait = (job.started_at - job.created_at).total_seconds() if job.started_at else None
    error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobPublic(
        id=job.id,
        status=JobStatus(job.status),
        parameters=parameters_of(job),
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
        predicted_generation_s=getattr(job, "predicted_generation_s", None),
        fitted=FitRecord.model_validate(job.fitted) if getattr(job, "fitted", None) else None,
        lever_set=getattr(job, "lever_set", None),
        lever_reason=getattr(job, "lever_reason", None),
        lever_predicted_bytes=getattr(job, "lever_predicted_bytes", None),
        priority=job.priority,
        queue_position=queue_position,
        expected_start_s=waiting.expected_start_s if waiting else None,
        waiting_reason=waiting.reason if waiting else None,
        progress=(Progress(image=job.progress_image, images=job.num_images, step=job.progress_step,
                           steps=job.progress_steps) if job.progress_steps else None),
        preview=_preview_link(job),
        cancel_requested=job.cancel_requested_at is not None,
        webhook_status=job.webhook_status,
        worker_host=job.worker_host,
        attempts=job.attempts,
        memory_class_bytes=job.memory_class_bytes,
        handoffs=job.handoffs or 0,
        history=[AttemptRecord.model_validate(h) for h in (job.history or [])],
        resumes=[ResumeRecord.model_validate(r) for r in (getattr(job, "resumes", None) or [])],
        error=error,
        images=[
            ImageLink(index=i.index, seed=i.seed, width=i.width, height=i.height,
                      url=f"/v1/jobs/{job.id}/images/{i.index}.png")
            for i in job.images
        ],
        inputs=[InputLink(role=i.role, width=i.width, height=i.height, source_format=i.source_format,
                          url=f"/v1/jobs/{job.id}/inputs/{i.role}.png") for i in getattr(job, "inputs", ())],
    )


def _preview_link(job) -> PreviewLink | None:
    """The job's latest preview, if it has one (an ended job has none: not even looked for)."""
    if JobStatus(job.status).is_terminal:
        return None
    p = getattr(job, "preview", None)
    if p is None:
        return None
    return PreviewLink(url=f"/v1/jobs/{job.id}/preview", image=p.image, step=p.step, steps=p.steps, width=p.width,
                       height=p.height, written_at=p.written_at)
