"""The fleet's memory facts in the database: workers' heartbeats and the memory profiles jobs feed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import case, delete, func, select, text, update
from sqlalchemy.orm import Session

from shared.db import upsert
from shared.fleet_contract import WorkerPublic, WorkerState
from shared.memory import Profile, Shape
from shared.timing import LATEST_WEIGHT, StepTiming
from shared.models import JobMemory, MemoryProfile, Worker, utcnow



def db_now(session: Session) -> datetime:
    """The database's clock: the one clock heartbeats are written and judged by, so a host whose own clock is
    off by minutes is neither dead nor immortal."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(text("SELECT now()"))
    raw = session.scalar(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))  # SQLite: UTC
    return datetime.fromisoformat(raw).replace(tzinfo=timezone.utc)


def beat(session: Session, hb: WorkerState, started_at: datetime) -> None:
    """Upsert this worker's row (only this worker writes it), stamped with the database's clock."""
    now = db_now(session)
    values = {**hb.model_dump(), "last_seen": now}
    # one statement: the worker's two beating threads (its heartbeat, and a job's start) may write its first
    # row at once (an UPDATE-then-INSERT had one of them fail on the primary key: bench/fleet.py)
    upsert(session, Worker.__table__, {**values, "started_at": started_at}, ["name"],
           lambda _c, new: {k: getattr(new, k) for k in values})


def mark_loading(session: Session, name: str, reason: str) -> bool:
    """A worker whose pool child is (re)loading its model: still alive, shown `loading`, its last figures kept
    (admission keeps routing to it, and its model does not flap to 503). False if it has no row yet (a new
    worker appears once its model is loaded)."""
    return session.execute(update(Worker).where(Worker.name == name).values(
        state="loading", state_reason=reason, current_job_id=None, last_seen=db_now(session))).rowcount == 1


def is_alive(worker: Worker, stale_s: float, now: datetime) -> bool:
    """`now` is the database's (db_now), like the heartbeat's stamp."""
    return now - worker.last_seen <= timedelta(seconds=stale_s)


def public(worker: Worker, stale_s: float, now: datetime) -> WorkerPublic:
    return WorkerPublic.model_validate({**{name: getattr(worker, name) for name in WorkerPublic.model_fields
                                           if name != "alive"}, "alive": is_alive(worker, stale_s, now)})


def workers(session: Session, seen_within_s: float | None = None) -> list[Worker]:
    stmt = select(Worker).order_by(Worker.model, Worker.name)
    if seen_within_s is not None:
        stmt = stmt.where(Worker.last_seen >= db_now(session) - timedelta(seconds=seen_within_s))
    return list(session.scalars(stmt))


def forget_workers(session: Session, silent_for_s: float) -> int:
    """Delete the rows of workers silent for this long (gone for good: a restarted worker is a new row)."""
    return session.execute(delete(Worker).where(
        Worker.last_seen < db_now(session) - timedelta(seconds=silent_for_s))).rowcount


def live_workers(session: Session, stale_s: float, model: str | None = None) -> list[Worker]:
    stmt = select(Worker).where(Worker.last_seen >= db_now(session) - timedelta(seconds=stale_s))
    if model is not None:
        stmt = stmt.where(Worker.model == model)
    return list(session.scalars(stmt.order_by(Worker.budget_bytes.desc())))


def profile_of(row: MemoryProfile) -> Profile:
    return Profile(Shape(row.width, row.height, row.guidance, row.images_per_pass, bool(row.encodes)), row.peak_bytes,
                   row.base_bytes, row.samples, row.step_s, row.image_overhead_s, row.job_overhead_s,
                   row.steps_peak_bytes, row.decode_peak_bytes)


def profiles(session: Session, model: str, backend: str, precision: str, memory_mode: str) -> list[Profile]:
    rows = session.scalars(select(MemoryProfile).where(
        MemoryProfile.model == model, MemoryProfile.backend == backend, MemoryProfile.precision == precision,
        MemoryProfile.memory_mode == memory_mode))
    return [profile_of(r) for r in rows]


def profiles_of(session: Session, models: set[str]) -> dict[tuple[str, str, str, str], list[Profile]]:
    """Every memory profile of these models in one query, by (model, backend, precision, memory mode)."""
    out: dict[tuple[str, str, str, str], list[Profile]] = {}
    if models:
        for row in session.scalars(select(MemoryProfile).where(MemoryProfile.model.in_(sorted(models))).order_by(
                MemoryProfile.width, MemoryProfile.height, MemoryProfile.guidance)):
            out.setdefault((row.model, row.backend, row.precision, row.memory_mode), []).append(profile_of(row))
    return out


def all_profiles(session: Session) -> list[MemoryProfile]:
    return list(session.scalars(select(MemoryProfile).order_by(
        MemoryProfile.model, MemoryProfile.memory_mode, MemoryProfile.width, MemoryProfile.height,
        MemoryProfile.guidance)))


def record_profile(session: Session, model: str, backend: str, precision: str, memory_mode: str, shape: Shape,
                   peak_bytes: int, base_bytes: int, max_step_s: float | None = None,
                   timing: StepTiming | None = None, phases: tuple[int | None, int | None] = (None, None)) -> None:
    """Fold one measured job into its shape's profile: one upsert (INSERT ... ON CONFLICT), so two workers
    finishing the first job of a new shape at once both count, and neither fails. Keeps the worst peak,
    with the base it was measured above and its first image's peaks before and during its decode (`phases`),
    and the slowest step; the time per step, per image and per job are
    moving averages (the latest job weighs LATEST_WEIGHT), each left as it was by a job that did not measure it."""
    key = dict(model=model, backend=backend, precision=precision, memory_mode=memory_mode, width=shape.width,
               height=shape.height, images_per_pass=shape.images_per_pass, guidance=shape.guidance,
               encodes=shape.encodes)

    def fold(old, new) -> dict:
        worse = new.peak_bytes > old.peak_bytes
        return {
            "samples": old.samples + 1,
            "updated_at": new.updated_at,
            "peak_bytes": case((worse, new.peak_bytes), else_=old.peak_bytes),
            "base_bytes": case((worse, new.base_bytes), else_=old.base_bytes),
            "steps_peak_bytes": case((worse, new.steps_peak_bytes), else_=old.steps_peak_bytes),
            "decode_peak_bytes": case((worse, new.decode_peak_bytes), else_=old.decode_peak_bytes),
            "max_step_s": case((old.max_step_s.is_(None), new.max_step_s), (new.max_step_s > old.max_step_s,
                                                                           new.max_step_s), else_=old.max_step_s),
            "step_s": _average(old.step_s, new.step_s),
            "image_overhead_s": _average(old.image_overhead_s, new.image_overhead_s),
            "job_overhead_s": _average(old.job_overhead_s, new.job_overhead_s),
        }

    timing = timing or StepTiming(None, None)
    upsert(session, MemoryProfile.__table__, {**key, "peak_bytes": peak_bytes, "base_bytes": base_bytes,
                                               "samples": 1, "updated_at": utcnow(), "max_step_s": max_step_s,
                                               "step_s": timing.step_s, "image_overhead_s": timing.image_overhead_s,
                                               "job_overhead_s": timing.job_overhead_s,
                                               "steps_peak_bytes": phases[0], "decode_peak_bytes": phases[1]},
           list(key), fold)


def _average(old, new):
    """The moving average of a profile's time, in SQL: the old value where the job measured none."""
    return case((new.is_(None), old), (old.is_(None), new),
                else_=old * (1 - LATEST_WEIGHT) + new * LATEST_WEIGHT)


def slowest_step_s(session: Session, model: str) -> float | None:
    """The slowest denoising step any worker measured on this model (what a hard time limit must allow)."""
    return session.scalar(select(func.max(MemoryProfile.max_step_s)).where(MemoryProfile.model == model))


def save_timeline(session: Session, job_id: str, attempt: int, interval_s: float, timeline: list[dict]) -> None:
    row = session.get(JobMemory, job_id)
    if row is None:
        session.add(JobMemory(job_id=job_id, attempt=attempt, interval_s=interval_s, timeline=timeline))
    else:
        row.attempt, row.interval_s, row.timeline = attempt, interval_s, timeline


def timeline(session: Session, job_id: str) -> JobMemory | None:
    return session.get(JobMemory, job_id)
