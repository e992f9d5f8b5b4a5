"""Retention: finished jobs past `SDFLEET_RETENTION_DAYS`, or the oldest while the stored PNGs (the images jobs
made and those they were given) exceed `SDFLEET_RETENTION_MAX_IMAGE_BYTES`, are deleted with their images,
inputs and memory timelines (and a preview, were one left). Each leaves a tombstone, so GET of it answers 410
with when and why. Run by the reconciler's pass."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, union_all
from sqlalchemy.orm import Session

from shared.jobs import TERMINAL
from shared.memory import fmt_size
from shared.models import Job, JobImage, JobInput, JobMemory, JobPreview, JobTombstone, utcnow
from shared.settings import Settings

log = logging.getLogger(__name__)


def enforce_retention(sessions, settings: Settings) -> list[str]:
    """Delete what the retention settings say is past keeping; each deletion leaves a tombstone."""
    if not settings.retention_days and not settings.retention_max_image_bytes:
        return []
    older_than = utcnow() - timedelta(days=settings.retention_days) if settings.retention_days else None
    with sessions.begin() as session:
        stones = delete_expired(session, older_than, settings.retention_max_image_bytes or None)
    if stones:
        log.info("retention deleted %d job(s), %d image bytes: %s", len(stones),
                 sum(s.image_bytes for s in stones), sorted({s.reason for s in stones}))
    return [s.job_id for s in stones]


def delete_expired(session: Session, older_than: datetime | None, max_image_bytes: int | None,
                   limit: int = 500) -> list[JobTombstone]:
    """Retention: finished jobs that ended before `older_than`, then the oldest finished jobs while all
    PNGs add up to more than `max_image_bytes`. Each deletion leaves a tombstone (GET answers 410)."""
    # a job's images: those it made and those it was given (init image, mask)
    stored = union_all(select(JobImage.job_id, func.length(JobImage.png).label("n")),
                       select(JobInput.job_id, func.length(JobInput.png).label("n"))).subquery()
    sizes = select(stored.c.job_id, func.sum(stored.c.n).label("bytes")).group_by(stored.c.job_id).subquery()
    finished = (select(Job, func.coalesce(sizes.c.bytes, 0))
                .outerjoin(sizes, sizes.c.job_id == Job.id)
                .where(Job.status.in_([s.value for s in TERMINAL]))
                .order_by(Job.finished_at, Job.id))
    doomed: list[tuple[Job, int, str]] = []
    if older_than is not None:
        for job, size in session.execute(finished.where(Job.finished_at < older_than).limit(limit)):
            doomed.append((job, int(size), f"retention: finished before {older_than.isoformat()}"))
    if max_image_bytes:
        total = int(session.scalar(select(func.coalesce(func.sum(stored.c.n), 0))))
        total -= sum(size for _, size, _ in doomed)
        taken = {job.id for job, _, _ in doomed}
        if total > max_image_bytes:
            for job, size in session.execute(finished.where(sizes.c.bytes > 0).limit(limit * 4)):
                if total <= max_image_bytes or len(doomed) >= limit:
                    break
                if job.id in taken:
                    continue
                doomed.append((job, int(size), f"retention: the stored images exceeded {fmt_size(max_image_bytes)}"))
                total -= int(size)
    now = utcnow()
    stones = [JobTombstone(job_id=job.id, owner_key_id=job.owner_key_id, status=job.status,
                           created_at=job.created_at, finished_at=job.finished_at, deleted_at=now, image_bytes=size,
                           reason=reason) for job, size, reason in doomed]
    if doomed:
        ids = [job.id for job, _, _ in doomed]
        session.add_all(stones)
        session.execute(delete(JobImage).where(JobImage.job_id.in_(ids)))
        session.execute(delete(JobInput).where(JobInput.job_id.in_(ids)))
        session.execute(delete(JobMemory).where(JobMemory.job_id.in_(ids)))
        session.execute(delete(JobPreview).where(JobPreview.job_id.in_(ids)))  # none once ended, but said here
        session.execute(delete(Job).where(Job.id.in_(ids)))
    return stones
