"""Live previews of running jobs, in the database where any API host reads them: the latest small image of the
latents of the image being denoised, with the step it shows. An attempt writes one only while it holds the job
(as checkpoints are written); it goes when the job ends (`jobstore.transition` to a terminal status drops it),
so that a finished job's images are what is read."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, undefer

from shared.db import upsert
from shared.jobs import JobStatus
from shared.models import Job, JobPreview, utcnow


def save(session: Session, job_id: str, attempt: int, image: int, step: int, steps: int, data: bytes,
         media_type: str, width: int, height: int) -> bool:
    """The preview of image `image` after `step` of `steps`, replacing the last one; False (nothing written) if
    this attempt no longer holds the job (the jobs row is locked on PostgreSQL until the write commits)."""
    held = session.execute(select(Job.status, Job.attempts).where(Job.id == job_id).with_for_update()).first()
    if held is None or held.status != JobStatus.running.value or held.attempts != attempt:
        return False
    values = dict(job_id=job_id, attempt=attempt, image=image, step=step, steps=steps, media_type=media_type,
                  width=width, height=height, data=data, written_at=utcnow())
    upsert(session, JobPreview.__table__, values, ["job_id"],
           lambda _c, new: {k: getattr(new, k) for k in values if k != "job_id"})
    return True


def load(session: Session, job_id: str, owner_key_id: str | None = None) -> JobPreview | None:
    """The job's latest preview with its bytes (with an owner: only if the job is that owner's)."""
    stmt = select(JobPreview).options(undefer(JobPreview.data)).where(JobPreview.job_id == job_id)
    if owner_key_id is not None:
        stmt = stmt.join(Job, Job.id == JobPreview.job_id).where(Job.owner_key_id == owner_key_id)
    return session.scalar(stmt)


def drop(session: Session, job_id: str) -> None:
    session.execute(delete(JobPreview).where(JobPreview.job_id == job_id))
