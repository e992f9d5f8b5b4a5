"""Job persistence. Every status change goes through `transition`, a compare-and-set on the row, so two
processes (an API and a worker, or two workers after a redelivery) can never both win the same change."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.errors import ErrorCode
from shared.jobs import JobParameters, JobStatus, check_transition
from shared.models import Job, JobImage, utcnow


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
    (or, given `attempt`, if another attempt has claimed it since)."""
    check_transition(expect, new)
    stmt = update(Job).where(Job.id == job_id, Job.status == expect.value)
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    return session.execute(stmt.values(status=new.value, **values)).rowcount == 1


def create_job(session: Session, params: JobParameters, predicted_bytes: int | None = None,
               prediction_source: str | None = None) -> Job:
    job = Job(id=str(uuid.uuid4()), status=JobStatus.queued.value, **params.model_dump(), attempts=0, images=[],
              predicted_peak_bytes=predicted_bytes, prediction_source=prediction_source)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def count_jobs(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job))


def image_png(session: Session, job_id: str, index: int) -> bytes | None:
    return session.scalar(select(JobImage.png).where(JobImage.job_id == job_id, JobImage.index == index))


def parameters_of(job: Job) -> JobParameters:
    return JobParameters.model_validate(
        {name: getattr(job, name) for name in JobParameters.model_fields}
    )


def start_attempt(session: Session, job_id: str, host: str, max_attempts: int) -> Attempt | None:
    """Claim a delivered job for this worker, or None when it must not run.

    A job found `running` was delivered again because the worker running it died (the broker counts
    nothing, so the database does): it runs again until `max_attempts`, then fails `worker_lost`.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return None
    status = JobStatus(job.status)
    if status.is_terminal:
        return None
    if status is JobStatus.running:
        if job.attempts >= max_attempts:
            transition(
                session, job_id, JobStatus.running, JobStatus.failed,
                finished_at=utcnow(), error_code=ErrorCode.worker_lost.value,
                error_message=(
                    f"the worker running this job was lost {job.attempts} time(s) (last on {job.worker_host}"
                    + (f", at {job.peak_rss_bytes / 2**30:.2f} GB resident when last seen" if job.peak_rss_bytes else "")
                    + "); it will not be run again"
                ),
            )
            return None
        if not transition(session, job_id, JobStatus.running, JobStatus.queued):
            return None
    number = job.attempts + 1
    if not transition(
        session, job_id, JobStatus.queued, JobStatus.running,
        attempts=number, started_at=utcnow(), worker_host=host,
        error_code=None, error_message=None, peak_rss_bytes=None, peak_rss_method=None,
    ):
        return None
    return Attempt(job_id=job_id, number=number, parameters=parameters_of(job))


def finish_succeeded(
    session: Session, attempt: Attempt, images: list[GeneratedImage], generation_s: float,
    memory: MemoryReading,
) -> bool:
    """Store the images and mark the job succeeded, all or nothing; False if this attempt was superseded."""
    if not transition(
        session, attempt.job_id, JobStatus.running, JobStatus.succeeded, attempt=attempt.number,
        finished_at=utcnow(), generation_s=generation_s, **memory.columns(),
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
    return transition(
        session, attempt.job_id, JobStatus.running, JobStatus.failed, attempt=attempt.number,
        finished_at=utcnow(), generation_s=generation_s, error_code=code.value, error_message=message,
        **(memory.columns() if memory else {}),
    )
