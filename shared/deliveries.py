"""A finished job's webhook delivery, in the job's row: pending -> delivered or failed. Each hand-out to the ops
workers has a delivery ID and each message the attempt it is for, so a duplicate message, or one from a
hand-out the reconciler has replaced, finds them changed and sends nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.jobs import WebhookStatus, check_webhook_transition
from shared.jobstore import get_job, to_public
from shared.models import Job, utcnow
from shared.queue import new_delivery_id


@dataclass(frozen=True)
class WebhookSend:
    url: str
    body: bytes
    owner_key_id: str | None
    attempt: int

def webhook_to_send(session: Session, job_id: str, delivery_id: str | None, attempts_done: int) -> str | None:
    """The URL a webhook message is for, without taking its attempt; None when the message has nothing to
    send (as claim_webhook would find)."""
    return session.execute(select(Job.webhook_url).where(
        Job.id == job_id, Job.webhook_status == WebhookStatus.pending.value,
        Job.webhook_attempts == attempts_done, Job.webhook_delivery_id.is_not_distinct_from(delivery_id),
    )).scalar()


def claim_webhook(session: Session, job_id: str, delivery_id: str | None, attempts_done: int) -> WebhookSend | None:
    """Take attempt `attempts_done + 1` of a job's webhook: a compare-and-set on its delivery ID and attempt
    count, both carried by the message. None when there is nothing to send: delivered, failed, a message
    from an older hand-out, or a duplicate of a message whose attempt another ops worker already took."""
    job = get_job(session, job_id)
    if job is None or job.webhook_status != WebhookStatus.pending.value:
        return None
    claimed = session.execute(update(Job).where(
        Job.id == job_id, Job.webhook_status == WebhookStatus.pending.value,
        Job.webhook_attempts == attempts_done, Job.webhook_delivery_id.is_not_distinct_from(delivery_id),
    ).values(webhook_attempts=attempts_done + 1, webhook_sent_at=utcnow())).rowcount
    if not claimed:
        return None
    return WebhookSend(job.webhook_url, to_public(job).model_dump_json().encode(), job.owner_key_id,
                       attempts_done + 1)

def end_webhook(session: Session, job_id: str, delivery_id: str | None, new: WebhookStatus) -> bool:
    """pending -> delivered or failed, for the hand-out that holds `delivery_id`."""
    check_webhook_transition(WebhookStatus.pending, new)
    stmt = update(Job).where(Job.id == job_id, Job.webhook_status == WebhookStatus.pending.value)
    if delivery_id is not None:
        stmt = stmt.where(Job.webhook_delivery_id == delivery_id)
    return session.execute(stmt.values(webhook_status=new.value)).rowcount == 1

@dataclass(frozen=True)
class WebhookHandout:
    """What a webhook message carries: the hand-out's delivery ID and the attempts already made."""

    delivery_id: str | None
    attempts_done: int

def resend_webhook(session: Session, job_id: str, stale_before: datetime) -> WebhookHandout | None:
    """A pending webhook whose last attempt (or the job's end) is older than `stale_before`: its hand-out is
    taken to be lost, and a new one replaces it (compare-and-set: of several reconcilers, one wins)."""
    job = get_job(session, job_id)
    if job is None or job.webhook_status != WebhookStatus.pending.value:
        return None
    last = job.webhook_sent_at or job.finished_at
    if last is not None and last >= stale_before:
        return None
    delivery = new_delivery_id()
    changed = session.execute(update(Job).where(
        Job.id == job_id, Job.webhook_status == WebhookStatus.pending.value,
        Job.webhook_delivery_id.is_not_distinct_from(job.webhook_delivery_id),
    ).values(webhook_delivery_id=delivery, webhook_sent_at=utcnow())).rowcount
    return WebhookHandout(delivery, job.webhook_attempts) if changed else None

def webhook_handout(session: Session, job_id: str) -> WebhookHandout | None:
    """The current hand-out of a pending webhook (what the process that just ended the job sends)."""
    row = session.execute(select(Job.webhook_delivery_id, Job.webhook_attempts).where(
        Job.id == job_id, Job.webhook_status == WebhookStatus.pending.value)).first()
    return WebhookHandout(row[0], row[1]) if row else None
