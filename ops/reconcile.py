"""The reconciler: the database is the truth, Redis only the transport. It re-sends queued jobs whose
message Redis lost (a restart, a flush, an API that died between storing and sending), takes back running
jobs whose worker is gone or has moved on without them, and re-sends webhooks that were never handed out.
Every change is a compare-and-set on the row (a new delivery ID), and only the winner sends: it is safe to
run on several hosts at once, and a message from before a re-send is recognised as stale and dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select

from shared import deliveries, fleet, jobstats, jobstore
from shared.jobs import JobStatus, WebhookStatus
from shared.jobstore import TakeBackOutcome
from shared.models import Job, Worker, utcnow
from shared.memory import fmt_size
from shared.queue import message_ids_in_broker, send_generate, send_webhook, top_class
from shared.webhook_schedule import WEBHOOK_RESEND_AFTER_S
from shared.settings import Settings

log = logging.getLogger(__name__)

# A pending webhook untouched this long has lost its hand-out (Redis restarted, an ops worker died): longer
# than the longest gap between two attempts of one delivery, which the settings check at start.
WEBHOOK_RESEND_AFTER = timedelta(seconds=WEBHOOK_RESEND_AFTER_S)


@dataclass
class Report:
    requeued_lost_messages: list[str] = field(default_factory=list)
    requeued_from_lost_workers: list[str] = field(default_factory=list)
    ended_lost: list[str] = field(default_factory=list)  # out of attempts (worker_lost) or past the timeout
    failed_unplaceable: list[str] = field(default_factory=list)  # no live worker's memory class holds it
    webhooks_resent: list[str] = field(default_factory=list)
    workers_forgotten: int = 0  # rows of workers silent for SDFLEET_WORKER_FORGET_S
    stats_folded: int = 0  # job statistics' deltas folded into their totals (shared/jobstats.py)


# A worker claims a delivered job within a second (its pre-check and claim), or gives the message back
# (paused: after 1 s; the database away: after 30 s of retries). A queued job whose message was delivered
# longer ago than this is not being claimed by anyone; generous for clocks that differ between hosts.
CLAIM_WAIT_S = 120.0


@dataclass(frozen=True)
class Snapshot:
    """What one pass decides by, read in one go: the jobs past the grace period, every worker, the database's
    clock, the pending webhooks left untouched, and then the message IDs Redis holds."""

    queued: list[Job]
    running: list[Job]
    workers: dict[str, Worker]
    db_now: datetime
    stale_hooks: list[str]
    present: set[str]
    claimable: set[str]  # queued, or delivered within CLAIM_WAIT_S: a live worker is about to claim its job

    @classmethod
    def read(cls, sessions, broker, settings: Settings, now: datetime) -> "Snapshot":
        old = now - timedelta(seconds=settings.reconcile_grace_s)
        with sessions() as session:
            queued = list(session.scalars(select(Job).where(Job.status == JobStatus.queued.value,
                                                            Job.enqueued_at < old)))
            running = list(session.scalars(select(Job).where(Job.status == JobStatus.running.value,
                                                             Job.started_at < old)))
            workers = {w.name: w for w in fleet.workers(session)}
            db_now = fleet.db_now(session)
            hooks = list(session.scalars(select(Job.id).where(
                Job.webhook_status == WebhookStatus.pending.value,
                func.coalesce(Job.webhook_sent_at, Job.finished_at) < now - WEBHOOK_RESEND_AFTER)))
        # read after the rows: a message sent since is either found here or belongs to a younger job
        models = sorted({j.model for j in queued + running})
        present = message_ids_in_broker(broker, models)
        claimable = message_ids_in_broker(broker, models, delivered_within_s=CLAIM_WAIT_S) if queued else set()
        return cls(queued, running, workers, db_now, hooks, present, claimable)

    def alive(self, worker: Worker | None, settings: Settings) -> bool:
        return worker is not None and fleet.is_alive(worker, settings.worker_stale_s, self.db_now)


def reconcile(sessions, broker, celery, settings: Settings) -> Report:
    report = Report()
    now = utcnow()
    seen = Snapshot.read(sessions, broker, settings, now)
    _queued(seen, sessions, celery, settings, report)
    _running(seen, sessions, celery, settings, report)
    stale_before = now - WEBHOOK_RESEND_AFTER
    for job_id in seen.stale_hooks + report.ended_lost + report.failed_unplaceable:
        with sessions.begin() as session:
            handout = (deliveries.resend_webhook(session, job_id, stale_before) if job_id in seen.stale_hooks
                       else deliveries.webhook_handout(session, job_id))
        if handout and send_webhook(celery, job_id, handout.delivery_id, handout.attempts_done):
            report.webhooks_resent.append(job_id)
    with sessions.begin() as session:
        report.workers_forgotten = fleet.forget_workers(session, settings.worker_forget_s)
    with sessions.begin() as session:
        report.stats_folded = jobstats.compact(session)
    if any(v for k, v in vars(report).items() if k != "stats_folded"):
        log.info("reconciled: %s", report)
    return report


def _queued(seen: Snapshot, sessions, celery, settings: Settings, report: Report) -> None:
    """Queued jobs: failed when no live worker covers their memory class any more, re-sent when Redis lost
    their message."""
    largest = {}  # the largest memory class a live worker of each model covers (loading and paused included)
    for w in seen.workers.values():
        if seen.alive(w, settings):
            # the configured budget: a desktop squeezed by its owner for now will take the job later
            largest[w.model] = max(largest.get(w.model, 0), top_class(w.max_budget_bytes or w.budget_bytes))
    for job in seen.queued:
        ceiling = job.memory_class_bytes or 0
        if job.model in largest and ceiling > largest[job.model]:
            # the workers that covered its class left: no live worker can take it (with none live at all,
            # it waits for one to come back, as a restart looks the same)
            message = (f"no live worker serving {job.model!r} covers its memory class {fmt_size(ceiling)} any more "
                       f"(largest: {fmt_size(largest[job.model])}; predicted {fmt_size(job.predicted_peak_bytes or 0)})")
            with sessions.begin() as session:
                if jobstore.fail_unplaceable(session, job, message):
                    report.failed_unplaceable.append(job.id)
            continue
        if job.delivery_id in seen.claimable:
            continue
        # Its message is gone, or a worker took it long ago and never claimed the job: that worker died
        # before starting it (a host SIGKILLed or powered off with the message delivered: kombu would restore
        # it only after the visibility timeout, hours). A new delivery ID makes the old message stale.
        with sessions.begin() as session:
            delivery = jobstore.requeue_lost_message(session, job)
        if delivery:
            send_generate(celery, job.id, delivery, job.model, job.priority, job.memory_class_bytes)
            report.requeued_lost_messages.append(job.id)


def _running(seen: Snapshot, sessions, celery, settings: Settings, report: Report) -> None:
    """Running jobs whose worker is gone or has moved on without them: taken back (or ended)."""
    for job in seen.running:
        worker = seen.workers.get(job.worker_name)
        alive = seen.alive(worker, settings)
        if alive and (worker.current_job_id == job.id or job.delivery_id in seen.present):
            continue  # running there, or redelivered to it after its pool child died
        where = f"on {job.worker_host}" if job.worker_host else ""
        lost = (f"the worker running attempt {job.attempts} {where} "
                + ("stopped sending heartbeats" if not alive else "moved on without finishing it"))
        with sessions.begin() as session:
            taken = jobstore.take_back(session, job, lost, settings.max_attempts, settings.job_timeout_s)
        if taken.outcome is TakeBackOutcome.queued:
            send_generate(celery, job.id, taken.delivery_id, job.model, job.priority, job.memory_class_bytes)
            report.requeued_from_lost_workers.append(job.id)
        elif taken.outcome is TakeBackOutcome.ended:
            report.ended_lost.append(job.id)
