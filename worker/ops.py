"""The ops worker: webhook deliveries (retried with backoff, never in a model worker's way) and the periodic
reconciler (Celery beat). It imports no model stack; run several, on any hosts: both are idempotent."""

from __future__ import annotations

import logging
import os
import tempfile

import httpx
import redis

from shared import keys, store
from shared.db import session_factory
from shared.models import ApiKey
from shared.queue import OPS_QUEUE, RECONCILE_TASK, WEBHOOK_TASK, make_celery
from shared.reconcile import reconcile
from shared.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.beat_schedule = {
    "reconcile": {"task": RECONCILE_TASK, "schedule": settings.reconcile_interval_s, "options": {"queue": OPS_QUEUE}},
}
sessions = session_factory(settings.database_url)
WEBHOOK_TIMEOUT_S = 10.0


def _set_webhook(job_id: str, status: str | None, attempts: int) -> None:
    from sqlalchemy import update

    from shared.models import Job

    with sessions.begin() as session:
        values = {"webhook_attempts": attempts}
        if status:
            values["webhook_status"] = status
        session.execute(update(Job).where(Job.id == job_id, Job.webhook_status == "pending").values(**values))


@app.task(name=WEBHOOK_TASK, bind=True, max_retries=settings.webhook_max_attempts - 1, acks_late=True)
def deliver_webhook(self, job_id: str) -> str:
    """POST the finished job's record to its webhook_url, signed with its key's secret (HMAC-SHA256 of the
    body in X-Sdfleet-Signature); retried with exponential backoff; at-least-once (X-Sdfleet-Job dedups)."""
    with sessions() as session:
        job = store.get_job(session, job_id)
        if job is None or job.webhook_status != "pending":
            return "nothing to send"
        url, attempts = job.webhook_url, job.webhook_attempts + 1
        body = store.to_public(job).model_dump_json().encode()
        owner = session.get(ApiKey, job.owner_key_id) if job.owner_key_id else None
        secret = owner.webhook_secret if owner else settings.webhook_secret
    headers = {"Content-Type": "application/json", "X-Sdfleet-Job": job_id, "X-Sdfleet-Event": "job.finished"}
    if secret:
        headers[keys.SIGNATURE_HEADER] = keys.sign(secret, body)
    try:
        ok = httpx.post(url, content=body, headers=headers, timeout=WEBHOOK_TIMEOUT_S).is_success
    except httpx.HTTPError as exc:
        log.info("webhook of job %s to %s: %s", job_id, url, exc)
        ok = False
    if ok:
        _set_webhook(job_id, "delivered", attempts)
        return "delivered"
    if self.request.retries >= self.max_retries:
        _set_webhook(job_id, "failed", attempts)
        return "failed"
    _set_webhook(job_id, None, attempts)
    raise self.retry(countdown=2 ** self.request.retries)


@app.task(name=RECONCILE_TASK)
def reconcile_task() -> dict:
    broker = redis.Redis.from_url(settings.redis_url)
    report = reconcile(sessions, broker, app, settings)
    return {k: len(v) for k, v in vars(report).items()}


def main(extra_args: list[str] | None = None) -> None:
    schedule = tempfile.mkdtemp(prefix="sdfleet-beat-") + "/schedule"
    app.worker_main([
        "worker", "--queues", OPS_QUEUE, "--pool", "threads", "--concurrency", "4", "--beat",
        "--schedule", schedule, "--hostname", f"sdfleet-ops@%h.{os.getpid()}", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", *(extra_args or []),
    ])
