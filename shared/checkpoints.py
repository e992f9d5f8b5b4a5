"""Checkpoints of running jobs, in the database where any host can read them: the state of the image being
denoised (opaque bytes of the runtime that wrote it, with the step it had reached) and the images a
multi-image job has finished. An attempt writes them only while it holds the job; they go when the job ends
(`jobstore.transition` to a terminal status drops them)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.db import upsert
from shared.jobs import JobStatus
from shared.models import Job, JobCheckpoint, JobCheckpointImage, utcnow


@dataclass(frozen=True)
class GeneratedImage:
    """A finished image: what a job's result stores, and what a checkpoint keeps of a multi-image job."""

    index: int
    seed: int
    width: int
    height: int
    png: bytes


@dataclass(frozen=True)
class Checkpoint:
    attempt: int
    runtime: str
    host: str
    image: int  # the image being denoised: the ones before it are in `images`
    step: int | None  # denoising loop iterations done on it (None: no state yet)
    steps: int | None
    state: bytes | None
    images: list[GeneratedImage]


def _holds(session: Session, job_id: str, attempt: int) -> bool:
    """Whether this attempt still holds the job (the row is locked on PostgreSQL until the write commits)."""
    row = session.execute(select(Job.status, Job.attempts).where(Job.id == job_id).with_for_update()).first()
    return row is not None and row.status == JobStatus.running.value and row.attempts == attempt


def _write(session: Session, job_id: str, attempt: int, runtime: str, host: str, image: int,
           step: int | None, steps: int | None, state: bytes | None) -> None:
    values = dict(job_id=job_id, attempt=attempt, runtime=runtime, host=host, image=image, step=step, steps=steps,
                  state=state, written_at=utcnow())
    upsert(session, JobCheckpoint.__table__, values, ["job_id"],
           lambda _c, new: {k: getattr(new, k) for k in values if k != "job_id"})


def save_step(session: Session, job_id: str, attempt: int, runtime: str, host: str, image: int, step: int,
              steps: int, state: bytes) -> bool:
    """The state of image `image` after `step` of `steps`; False (nothing written) if the attempt lost the job."""
    if not _holds(session, job_id, attempt):
        return False
    _write(session, job_id, attempt, runtime, host, image, step, steps, state)
    return True


def save_image(session: Session, job_id: str, attempt: int, runtime: str, host: str, image: GeneratedImage) -> bool:
    """A finished image of a multi-image job: kept, and the checkpoint moves on to the next image."""
    if not _holds(session, job_id, attempt):
        return False
    upsert(session, JobCheckpointImage.__table__,
           dict(job_id=job_id, index=image.index, runtime=runtime, seed=image.seed, width=image.width,
                height=image.height, png=image.png), ["job_id", "index"],
           lambda _c, new: {k: getattr(new, k) for k in ("runtime", "seed", "width", "height", "png")})
    _write(session, job_id, attempt, runtime, host, image.index + 1, None, None, None)
    return True


def load(session: Session, job_id: str) -> Checkpoint | None:
    row = session.get(JobCheckpoint, job_id)
    if row is None:
        return None
    images = session.scalars(select(JobCheckpointImage).where(JobCheckpointImage.job_id == job_id)
                             .order_by(JobCheckpointImage.index)).all()
    # only the images of the checkpoint's own runtime, and a run of them from image 0
    kept = []
    for i in images:
        if i.runtime != row.runtime or i.index != len(kept) or i.index >= row.image:
            break
        kept.append(GeneratedImage(i.index, i.seed, i.width, i.height, i.png))
    return Checkpoint(row.attempt, row.runtime, row.host, row.image, row.step, row.steps, row.state, kept)


def drop(session: Session, job_id: str) -> None:
    session.execute(delete(JobCheckpointImage).where(JobCheckpointImage.job_id == job_id))
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id))
