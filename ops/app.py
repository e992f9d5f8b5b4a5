"""The ops worker: webhook deliveries (retried with backoff, never in a model worker's way, each within one
deadline, many at once and a few at most to any one receiver, so a slow receiver delays no other) and, in a
thread of its own, the periodic reconciler and retention. It imports no model stack; run several, on any hosts: a
webhook hand-out is sent by one of them (compare-and-set), and the reconciler runs one pass per interval in the
whole fleet (a Redis key that expires), so webhook deliveries can never starve it."""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
import uuid

import httpx
import redis
from celery.signals import worker_ready

from shared import deliveries, keys, webhooks
from shared.db import session_factory
from shared.jobs import WebhookStatus
from shared.models import ApiKey
from shared.queue import RECONCILE_LOCK_KEY, WEBHOOK_QUEUE, WEBHOOK_TASK, make_celery
from ops.reconcile import reconcile
from ops.retention import enforce_retention
from shared.retry import retrying
from shared.webhook_schedule import webhook_backoff_s
from shared.settings import get_settings

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
sessions = session_factory(settings.database_url)


def _end(job_id: str, delivery_id: str | None, status: WebhookStatus) -> None:
    def write():
        with sessions.begin() as session:
            deliveries.end_webhook(session, job_id, delivery_id, status)

    retrying(write)


class ReceiverSlots:
    """How many deliveries this process has under way to each receiver, at most `per_receiver`: a slow
    receiver, however many webhooks it has, holds that many of the ops worker's threads, never all of them."""

    def __init__(self, per_receiver: int):
        self.per_receiver = per_receiver
        self._busy: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def take(self, receiver: str) -> bool:
        with self._lock:
            if self._busy[receiver] >= self.per_receiver:
                return False
            self._busy[receiver] += 1
            return True

    def give_back(self, receiver: str) -> None:
        with self._lock:
            self._busy[receiver] -= 1
            if not self._busy[receiver]:
                del self._busy[receiver]


slots = ReceiverSlots(settings.webhook_per_receiver)


def turn_wait_s(waits: int, deadline_s: float) -> float:
    """How long a delivery whose receiver is busy waits before it looks again: 0.25, 0.5, 1, ... s, at most
    one deadline (by then a slot of that receiver has come free), spread by jitter."""
    return min(deadline_s, 0.25 * 2 ** min(waits, 16)) * random.uniform(0.5, 1.0)


@app.task(name=WEBHOOK_TASK, bind=True, max_retries=None, acks_late=True)
def deliver_webhook(self, job_id: str, delivery_id: str | None = None, attempts_done: int = 0,
                    waits: int = 0) -> str:
    """POST the finished job's record to its webhook_url, signed with its key's secret (HMAC-SHA256 of the
    body in X-Sdfleet-Signature); retried on the schedule in shared/webhook_schedule.py; at least once
    (X-Sdfleet-Job dedups). While this process has webhook_per_receiver deliveries under way to the same
    receiver, the message comes back later (its attempt not taken) instead of waiting in a thread."""
    def peek():
        with sessions() as session:
            return deliveries.webhook_to_send(session, job_id, delivery_id, attempts_done)

    url = retrying(peek)
    if url is None:
        return "nothing to send"
    receiver = webhooks.receiver(url)
    if not slots.take(receiver):
        raise self.retry(args=[job_id, delivery_id, attempts_done], kwargs={"waits": waits + 1},
                         countdown=turn_wait_s(waits, settings.webhook_timeout_s))
    try:
        return _attempt(self, job_id, delivery_id, attempts_done)
    finally:
        slots.give_back(receiver)


def _attempt(task, job_id: str, delivery_id: str | None, attempts_done: int) -> str:
    def claim():
        with sessions.begin() as session:
            send = deliveries.claim_webhook(session, job_id, delivery_id, attempts_done)
            owner = session.get(ApiKey, send.owner_key_id) if send and send.owner_key_id else None
            return send, (owner.webhook_secret if owner else settings.webhook_secret)

    send, secret = retrying(claim)
    if send is None:
        return "nothing to send"
    headers = {"Content-Type": "application/json", "X-Sdfleet-Job": job_id, "X-Sdfleet-Event": "job.finished"}
    if secret:
        headers[keys.SIGNATURE_HEADER] = keys.sign(secret, send.body)
    try:
        # the host is checked again (DNS may have changed since submit); lookup and exchange in one deadline
        status = webhooks.deliver(send.url, settings.webhook_allowed, send.body, headers, settings.webhook_timeout_s)
        ok = 200 <= status < 300
    except webhooks.WebhookRefused as exc:
        log.warning("webhook of job %s not sent: %s", job_id, exc)
        _end(job_id, delivery_id, WebhookStatus.failed)
        return "refused"
    except (httpx.HTTPError, TimeoutError, OSError) as exc:
        log.info("webhook of job %s to %s: %s", job_id, send.url, type(exc).__name__)
        ok = False
    if ok:
        _end(job_id, delivery_id, WebhookStatus.delivered)
        return "delivered"
    if send.attempt >= settings.webhook_max_attempts:
        _end(job_id, delivery_id, WebhookStatus.failed)
        return "failed"
    raise task.retry(args=[job_id, delivery_id, send.attempt], kwargs={},
                     countdown=webhook_backoff_s(send.attempt))


def periodic_pass(broker: redis.Redis, me: str, sessions, celery, settings) -> bool:
    """One reconciler + retention pass, if no ops worker in the fleet ran one in the last interval."""
    interval_ms = int(settings.reconcile_interval_s * 1000)
    if not broker.set(RECONCILE_LOCK_KEY, me, nx=True, px=interval_ms):
        return False
    t0 = time.perf_counter()
    reconcile(sessions, broker, celery, settings)
    enforce_retention(sessions, settings)
    log.info("reconciler pass in %.0f ms", 1000 * (time.perf_counter() - t0))
    return True


def _periodic_loop() -> None:
    broker = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    me = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    while True:
        try:
            periodic_pass(broker, me, sessions, app, settings)
        except Exception:  # Redis or the database away: the next interval tries again
            log.exception("reconciler pass failed")
        time.sleep(settings.reconcile_interval_s)


def main(extra_args: list[str] | None = None) -> None:
    # the reconciler starts once Celery has parsed its arguments and is up (a usage error starts nothing)
    worker_ready.connect(lambda **_: threading.Thread(target=_periodic_loop, name="sdfleet-reconciler",
                                                      daemon=True).start(), weak=False)
    app.worker_main([
        "worker", "--queues", WEBHOOK_QUEUE, "--pool", "threads",
        "--concurrency", str(settings.webhook_concurrency),
        "--hostname", f"sdfleet-ops@%h.{os.getpid()}", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", *(extra_args or []),
    ])
