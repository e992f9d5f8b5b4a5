"""The fleet's memory facts in the database: workers' heartbeats and the memory profiles jobs feed."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.memory import Profile, Shape
from shared.models import JobMemory, MemoryProfile, Worker, utcnow


@dataclass(frozen=True)
class Heartbeat:
    name: str
    host: str
    model: str
    backend: str
    precision: str
    memory_mode: str
    budget_bytes: int
    cgroup_limit_bytes: int | None
    total_ram_bytes: int
    available_bytes: int
    resident_bytes: int
    current_job_id: str | None


def beat(session: Session, hb: Heartbeat, started_at: datetime) -> None:
    """Upsert this worker's row (only this worker writes it)."""
    now = utcnow()
    values = {**asdict(hb), "last_seen": now}
    if session.execute(update(Worker).where(Worker.name == hb.name).values(**values)).rowcount == 0:
        session.add(Worker(**values, started_at=started_at))


def is_alive(worker: Worker, stale_s: float, now: datetime | None = None) -> bool:
    return (now or utcnow()) - worker.last_seen <= timedelta(seconds=stale_s)


def workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.model, Worker.name)))


def live_workers(session: Session, stale_s: float, model: str | None = None) -> list[Worker]:
    stmt = select(Worker).where(Worker.last_seen >= utcnow() - timedelta(seconds=stale_s))
    if model is not None:
        stmt = stmt.where(Worker.model == model)
    return list(session.scalars(stmt.order_by(Worker.budget_bytes.desc())))


def _profile(row: MemoryProfile) -> Profile:
    return Profile(Shape(row.width, row.height, row.guidance, row.images_per_pass), row.peak_bytes,
                   row.base_bytes, row.samples)


def profiles(session: Session, model: str, backend: str, precision: str, memory_mode: str) -> list[Profile]:
    rows = session.scalars(select(MemoryProfile).where(
        MemoryProfile.model == model, MemoryProfile.backend == backend, MemoryProfile.precision == precision,
        MemoryProfile.memory_mode == memory_mode))
    return [_profile(r) for r in rows]


def all_profiles(session: Session) -> list[MemoryProfile]:
    return list(session.scalars(select(MemoryProfile).order_by(
        MemoryProfile.model, MemoryProfile.memory_mode, MemoryProfile.width, MemoryProfile.height,
        MemoryProfile.guidance)))


def record_profile(session: Session, model: str, backend: str, precision: str, memory_mode: str, shape: Shape,
                   peak_bytes: int, base_bytes: int) -> None:
    key = dict(model=model, backend=backend, precision=precision, memory_mode=memory_mode, width=shape.width,
               height=shape.height, images_per_pass=shape.images_per_pass, guidance=shape.guidance)
    row = session.get(MemoryProfile, key, with_for_update=True)
    if row is None:
        session.add(MemoryProfile(**key, peak_bytes=peak_bytes, base_bytes=base_bytes, samples=1,
                                  updated_at=utcnow()))
        return
    row.samples += 1
    row.updated_at = utcnow()
    if peak_bytes > row.peak_bytes:  # keep the worst case, with the base it was measured above
        row.peak_bytes, row.base_bytes = peak_bytes, base_bytes


def save_timeline(session: Session, job_id: str, attempt: int, interval_s: float, timeline: list[dict]) -> None:
    row = session.get(JobMemory, job_id)
    if row is None:
        session.add(JobMemory(job_id=job_id, attempt=attempt, interval_s=interval_s, timeline=timeline))
    else:
        row.attempt, row.interval_s, row.timeline = attempt, interval_s, timeline


def timeline(session: Session, job_id: str) -> JobMemory | None:
    return session.get(JobMemory, job_id)
