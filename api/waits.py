"""Queued jobs as a reader sees them: when each may start and why none is taking it, from the API's view of the
fleet (the live workers that can take it and their state), the jobs those workers run and the queue ahead of
it. For a page of jobs it costs the same few statements as for one: one per model, priority and class among
them for the queue ahead, and one for the jobs the workers run."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.admission import FleetView, class_workers, predict_generation, time_on
from shared import jobstore
from shared.jobs import JobStatus
from shared.memory import fmt_size
from shared.models import Job, Worker, utcnow
from shared.queue import top_class
from shared.timing import Server, Waiting, waiting

_RUNNING_COLUMNS = (Job.id, Job.worker_name, Job.status, Job.model, Job.width, Job.height, Job.guidance_scale, Job.steps,
                    Job.num_images, Job.started_at, Job.predicted_generation_s, Job.progress_image, Job.progress_step,
                    Job.progress_steps)


def queued_views(session: Session, view: FleetView, jobs: list) -> dict[str, tuple[int, Waiting]]:
    """(queue position, Waiting) of each queued job among `jobs`, by job ID."""
    queued = [j for j in jobs if j.status == JobStatus.queued.value]
    if not queued:
        return {}
    servers = {j.id: class_workers(view, j.model, j.memory_class_bytes) for j in queued}
    caps = {job_id: max((top_class(w.budget_bytes) for w in ws), default=None) for job_id, ws in servers.items()}
    ahead = jobstore.queue_ahead(session, queued, caps)
    # the jobs these workers run, from the database (a worker's heartbeat names its job a moment after the claim)
    names = sorted({w.name for ws in servers.values() for w in ws})
    running = {}
    if names:
        # (not these jobs themselves: one claimed since it was read queued is not what it waits for)
        for row in session.execute(select(*_RUNNING_COLUMNS).where(
                Job.status == JobStatus.running.value, Job.worker_name.in_(names),
                Job.id.not_in([j.id for j in queued])).order_by(Job.started_at)):
            running[row.worker_name] = row  # (the latest, should a lost attempt still show running)
    now = utcnow()
    out = {}
    for job in queued:
        a = ahead[job.id]
        serving = [_server(view, w, running.get(w.name), now) for w in servers[job.id]]
        out[job.id] = (a.position, waiting(serving, a.ahead, _ahead_s(view, job, a), job.model,
                                           _no_server(view, job)))
    return out


def _server(view: FleetView, worker: Worker, job, now: datetime) -> Server:
    """A worker as a queued job's possible taker, with what the job it runs has left (`left_s`)."""
    if job is None:  # idle
        return Server(worker.name, worker.state, worker.state_reason, 0.0, False)
    predicted = job.predicted_generation_s
    if predicted is None:
        p = time_on(view, worker, job)
        predicted = p.seconds if p else None
    return Server(worker.name, worker.state, worker.state_reason, left_s(job, predicted, now), True)


def left_s(job, predicted: float | None, now: datetime) -> float | None:
    """What a running job has left: its prediction less the time it has run, and, as its progress grows, the
    rate it has gone at (the time it has run, over the share of its steps done) weighing more, by that share:
    a job running slower than predicted is not taken for nearly done. None with neither."""
    ran = max(0.0, (now - job.started_at).total_seconds()) if job.started_at else 0.0
    done = None
    if job.progress_steps and job.num_images:
        done = min(1.0, ((job.progress_image or 0) * job.progress_steps + (job.progress_step or 0))
                   / (job.num_images * job.progress_steps))
    by_rate = ran * (1 - done) / done if done else None
    by_prediction = max(0.0, predicted - ran) if predicted is not None else None
    if by_rate is None:
        return by_prediction
    if by_prediction is None:
        return by_rate
    return (1 - done) * by_prediction + done * by_rate


def _ahead_s(view: FleetView, job, a: jobstore.Ahead) -> float | None:
    """The predicted seconds of the jobs ahead: a job with no prediction (submitted before anything was
    measured) counts as the average of those with one, else as this job's own prediction now."""
    missing = a.ahead - a.predicted
    if not missing:
        return a.predicted_s
    fill = a.predicted_s / a.predicted if a.predicted else (
        job.predicted_generation_s if job.predicted_generation_s is not None else
        predict_generation(view, job, job.memory_class_bytes))
    return None if fill is None else a.predicted_s + missing * fill


def _no_server(view: FleetView, job) -> str | None:
    """Why no live worker can take it, when workers of its model are live (else `waiting` says none is)."""
    of_model = [w for w in view.live if w.model == job.model]
    if not of_model:
        return None
    largest = max(top_class(w.budget_bytes) for w in of_model)
    return (f"no live worker of {job.model!r} takes its memory class ({fmt_size(job.memory_class_bytes or 0)}): "
            f"the largest takes jobs up to {fmt_size(largest)}")
