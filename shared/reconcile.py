"""The reconciler: the database is the truth, Redis only the transport. It re-sends queued jobs whose
message Redis lost (a restart, a flush, an API that died between storing and sending), takes back running
jobs whose worker is gone or has moved on without them, and re-sends webhooks that were never handed out.
Every change is a compare-and-set on the row (a new delivery ID), and only the winner sends: it is safe to
run on several hosts at once, and a message from before a re-send is recognised as stale and dropped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select

from shared import fleet, store
from shared.jobs import JobStatus
from shared.models import Job, utcnow
from shared.queue import message_ids_in_broker, send_generate, send_webhook
from shared.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_RESEND_AFTER = timedelta(minutes=10)  # longer than a webhook's whole retry schedule


@dataclass
class Report:
    requeued_lost_messages: list[str] = field(default_factory=list)
    requeued_from_lost_workers: list[str] = field(default_factory=list)
    failed_worker_lost: list[str] = field(default_factory=list)
    webhooks_resent: list[str] = field(default_factory=list)


def reconcile(sessions, broker, celery, settings: Settings) -> Report:
    report = Report()
    now = utcnow()
    old = now - timedelta(seconds=settings.reconcile_grace_s)
    with sessions() as session:
        queued = list(session.scalars(select(Job).where(Job.status == JobStatus.queued.value, Job.enqueued_at < old)))
        running = list(session.scalars(select(Job).where(Job.status == JobStatus.running.value,
                                                          Job.started_at < old)))
        workers = {w.name: w for w in fleet.workers(session)}
        hooks = list(session.scalars(select(Job.id).where(
            Job.webhook_status == "pending", Job.finished_at < now - WEBHOOK_RESEND_AFTER)))
    # read after the rows: a message sent since is either found here or belongs to a younger job
    present = message_ids_in_broker(broker, sorted({j.model for j in queued + running}))

    for job in queued:
        if job.delivery_id in present:
            continue
        with sessions.begin() as session:
            delivery = store.requeue(session, job, JobStatus.queued)
        if delivery:
            send_generate(celery, job.id, delivery, job.model, job.priority)
            report.requeued_lost_messages.append(job.id)

    for job in running:
        worker = workers.get(job.worker_name)
        alive = worker is not None and fleet.is_alive(worker, settings.worker_stale_s)
        if alive and (worker.current_job_id == job.id or job.delivery_id in present):
            continue  # running there, or redelivered to it after its pool child died
        with sessions.begin() as session:
            if job.attempts >= settings.max_attempts:
                if store.fail_worker_lost(session, job):
                    report.failed_worker_lost.append(job.id)
                continue
            delivery = store.requeue(session, job, JobStatus.running)
        if delivery:
            send_generate(celery, job.id, delivery, job.model, job.priority)
            report.requeued_from_lost_workers.append(job.id)

    for job_id in hooks + report.failed_worker_lost:
        if send_webhook(celery, job_id):
            report.webhooks_resent.append(job_id)
    if any(vars(report).values()):
        log.info("reconciled: %s", report)
    return report
