"""Job persistence. Every status change goes through `transition`, a compare-and-set on the row, so two
processes (an API and a worker, or two workers after a redelivery) can never both win the same change."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from dataclasses import asdict

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from shared.errors import Conflict, ErrorCode
from shared.jobs import (
    PRIORITY_ORDER, ImageLink, JobError, JobParameters, JobPublic, JobStatus, Progress, check_transition,
)
from shared.models import Job, JobImage, utcnow
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
class GeneratedImage:
    index: int
    seed: int
    width: int
    height: int
    png: bytes


@dataclass(frozen=True)
class Attempt:
    """A worker's claim on a job: the attempt number fences off writes from an older, lost attempt."""

    job_id: str
    number: int
    parameters: JobParameters


def transition(
    session: Session, job_id: str, expect: JobStatus, new: JobStatus, *, attempt: int | None = None, **values
) -> bool:
    """Move a job from `expect` to `new`, setting `values`; False if the row was not in `expect` any more
    (or, given `attempt`, if another attempt has claimed it since). A job that ends with a webhook gets
    its delivery marked pending in the same statement."""
    check_transition(expect, new)
    stmt = update(Job).where(Job.id == job_id, Job.status == expect.value)
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    if new.is_terminal:
        values.setdefault("finished_at", utcnow())
        values["webhook_status"] = case((Job.webhook_url.is_not(None), "pending"), else_=None)
        values.update(progress_step=None, progress_steps=None, progress_image=None)
    return session.execute(stmt.values(status=new.value, **values)).rowcount == 1


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


def create_job(session: Session, new: NewJob) -> Job:
    fields = {k: v for k, v in asdict(new).items() if k != "params"}
    job = Job(id=str(uuid.uuid4()), status=JobStatus.queued.value, **new.params.model_dump(), **fields,
              attempts=0, images=[], delivery_id=new_delivery_id(), enqueued_at=utcnow(), webhook_attempts=0)
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


def count_jobs(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job))


def image_png(session: Session, job_id: str, index: int, owner_key_id: str | None = None) -> bytes | None:
    stmt = select(JobImage.png).join(Job).where(JobImage.job_id == job_id, JobImage.index == index)
    if owner_key_id is not None:
        stmt = stmt.where(Job.owner_key_id == owner_key_id)
    return session.scalar(stmt)


def parameters_of(job: Job) -> JobParameters:
    return JobParameters.model_validate(
        {name: getattr(job, name) for name in JobParameters.model_fields}
    )


def start_attempt(session: Session, job_id: str, delivery_id: str | None, host: str, worker_name: str,
                  max_attempts: int) -> Attempt | None:
    """Claim a delivered job for this worker, or None when it must not run.

    A message from an older enqueue (the reconciler has re-sent the job since) is stale: dropped. A job
    found `running` was delivered again because the worker running it died (the broker counts nothing, so
    the database does): it runs again until `max_attempts`, then fails `worker_lost`.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or (delivery_id is not None and job.delivery_id != delivery_id):
        return None
    status = JobStatus(job.status)
    if status.is_terminal:
        return None
    if status is JobStatus.running:
        if job.attempts >= max_attempts:
            fail_worker_lost(session, job)
            return None
        if not transition(session, job_id, JobStatus.running, JobStatus.queued):
            return None
    number = job.attempts + 1
    if not transition(
        session, job_id, JobStatus.queued, JobStatus.running,
        attempts=number, started_at=utcnow(), worker_host=host, worker_name=worker_name,
        error_code=None, error_message=None, peak_rss_bytes=None, peak_rss_method=None,
        progress_image=None, progress_step=None, progress_steps=None,
    ):
        return None
    return Attempt(job_id=job_id, number=number, parameters=parameters_of(job))


def fail_worker_lost(session: Session, job: Job) -> bool:
    return transition(
        session, job.id, JobStatus.running, JobStatus.failed, error_code=ErrorCode.worker_lost.value,
        error_message=(
            f"the worker running this job was lost {job.attempts} time(s) (last on {job.worker_host}"
            + (f", at {job.peak_rss_bytes / 2**30:.2f} GB resident when last seen" if job.peak_rss_bytes else "")
            + "); it will not be run again"
        ),
    )


def requeue(session: Session, job: Job, from_status: JobStatus) -> str | None:
    """Give the job a new delivery ID (the old message, wherever it is, becomes stale); the caller sends it.
    None if another process changed the job first."""
    delivery_id = new_delivery_id()
    stmt = update(Job).where(Job.id == job.id, Job.status == from_status.value, Job.delivery_id == job.delivery_id)
    if from_status is JobStatus.running:
        check_transition(JobStatus.running, JobStatus.queued)
    changed = session.execute(stmt.values(status=JobStatus.queued.value, delivery_id=delivery_id,
                                          enqueued_at=utcnow())).rowcount
    return delivery_id if changed == 1 else None


def cancel(session: Session, job_id: str, owner_key_id: str | None) -> Job | None:
    """Cancel a queued job (it will never run) or ask a running one to stop at its next step.
    None if there is no such job for this owner; Conflict if it has finished."""
    job = get_job(session, job_id, owner_key_id)
    if job is None:
        return None
    status = JobStatus(job.status)
    if status.is_terminal:
        raise Conflict(f"job {job_id} has already {status.value}; there is nothing to cancel",
                       {"status": status.value})
    cancelled = status is JobStatus.queued and transition(
        session, job_id, JobStatus.queued, JobStatus.cancelled, error_code=ErrorCode.cancelled.value,
        error_message="cancelled before it ran",
    )
    if not cancelled and job.cancel_requested_at is None:
        # running (or claimed by a worker a moment ago): it stops at its next denoising step
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested_at=utcnow()))
    session.flush()
    session.expire(job)
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
    """1 for the next job its model's workers will take: higher priorities first, then by enqueue time."""
    rank = case(*((Job.priority == p, r) for p, r in PRIORITY_ORDER.items()), else_=len(PRIORITY_ORDER))
    mine = PRIORITY_ORDER[job.priority]
    ahead = select(func.count()).select_from(Job).where(
        Job.status == JobStatus.queued.value, Job.model == job.model, Job.id != job.id,
        or_(rank < mine, and_(rank == mine, Job.enqueued_at < job.enqueued_at)),
    )
    return session.scalar(ahead) + 1


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


def to_public(job: Job, queue_position: int | None = None) -> JobPublic:
    """The public record of a job (what GET answers and what a webhook carries)."""
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
        priority=job.priority,
        queue_position=queue_position,
        progress=(Progress(image=job.progress_image, images=job.num_images, step=job.progress_step,
                           steps=job.progress_steps) if job.progress_steps else None),
        cancel_requested=job.cancel_requested_at is not None,
        webhook_status=job.webhook_status,
        worker_host=job.worker_host,
        attempts=job.attempts,
        error=error,
        images=[
            ImageLink(index=i.index, seed=i.seed, width=i.width, height=i.height,
                      url=f"/v1/jobs/{job.id}/images/{i.index}.png")
            for i in job.images
        ],
    )
