"""The Celery app both sides share, with the task and queue names: the API enqueues by name (send_task)
without importing the worker, and the worker registers the task on this same app. Redis key names live here."""

from __future__ import annotations

import json
import logging
import math
import uuid

from celery import Celery

from shared.settings import Settings

log = logging.getLogger(__name__)

GENERATE_TASK = "sdfleet.generate"
WEBHOOK_TASK = "sdfleet.webhook"
QUEUE_PREFIX = "sdfleet.model."
WEBHOOK_QUEUE = "sdfleet.webhooks"  # consumed by the ops workers: never behind an image generation

# The Redis transport emulates priorities with one list per step, consumed lowest number first.
PRIORITIES = {"high": 0, "normal": 3, "low": 6}
_PRIORITY_SEP = ":"
_UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered, unacknowledged messages here
RATE_LIMIT_PREFIX = "sdfleet:ratelimit"  # the `limits` library's moving windows, one per API key
RECONCILE_LOCK_KEY = "sdfleet:lock:reconcile"  # one reconciler pass at a time in the whole fleet


def queue_name(model: str) -> str:
    """One queue per model: a worker consumes only the queue of the model it has loaded."""
    return QUEUE_PREFIX + model


def queue_keys(model: str) -> list[str]:
    """The Redis lists holding a model's queued messages, highest priority first."""
    base = queue_name(model)
    return [base if p == 0 else f"{base}{_PRIORITY_SEP}{p}" for p in sorted(PRIORITIES.values())]


def queue_depth(redis_client, model: str) -> int:
    return sum(redis_client.llen(k) for k in queue_keys(model))


def _message_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        return message["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def message_ids_in_broker(redis_client, models: list[str]) -> set[str]:
    """Task IDs (our delivery IDs) of every message Redis holds for these models: queued or delivered."""
    ids = set()
    for model in models:
        for key in queue_keys(model):
            ids.update(_message_id(m) for m in redis_client.lrange(key, 0, -1))
    ids.update(_message_id(m) for m in redis_client.hvals(_UNACKED_KEY))
    ids.discard(None)
    return ids


def new_delivery_id() -> str:
    return str(uuid.uuid4())


def send_webhook(celery: Celery, job_id: str, delivery_id: str | None, attempts_done: int = 0) -> bool:
    """Hand a finished job's webhook to the ops workers; if Redis is away, the reconciler re-sends it.
    The delivery ID and the attempt count fence the message: one from an older hand-out, or a duplicate of
    one whose attempt was taken, finds them changed and sends nothing."""
    try:
        celery.send_task(WEBHOOK_TASK, args=[job_id, delivery_id, attempts_done], queue=WEBHOOK_QUEUE)
        return True
    except Exception:
        log.warning("could not enqueue the webhook of job %s; the reconciler will", job_id)
        return False


def send_generate(celery: Celery, job_id: str, delivery_id: str, model: str, priority: str) -> None:
    """The message is the job ID and this enqueue's delivery ID (also the Celery task ID)."""
    celery.send_task(GENERATE_TASK, args=[job_id, delivery_id], task_id=delivery_id, queue=queue_name(model),
                     priority=PRIORITIES[priority])


def hard_time_limit(job_timeout_s: int, slowest_step_s: float | None) -> int:
    """When Celery kills a pool child: the soft limit (the job timeout) only takes effect when the current
    step returns to Python, and one SDXL step at f32 with guidance takes over a minute here. So the hard
    limit leaves three of the slowest steps measured on the model (a step and the decode after it), and at
    least five minutes."""
    return job_timeout_s + max(300, math.ceil(3 * (slowest_step_s or 0.0)))


def make_celery(settings: Settings) -> Celery:
    app = Celery("sdfleet", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        # A job belongs to the database; the message only carries its ID.
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # A worker holds one job at a time and acknowledges it only when done: a child killed mid-job
        # (the kernel OOM killer's SIGKILL) puts the message back instead of losing it.
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Redis hands an unacknowledged message to another worker after the visibility timeout:
        # it must exceed the longest job or a running job would run twice.
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout,
            "priority_steps": sorted(PRIORITIES.values()),
            "sep": _PRIORITY_SEP,
            "queue_order_strategy": "priority",
        },
        # The soft limit ends a job as `timeout` when its current step returns; a worker raises the hard
        # limit (which kills the child) above its slowest measured step at start (worker.app).
        task_soft_time_limit=settings.job_timeout_s,
        task_time_limit=hard_time_limit(settings.job_timeout_s, None),
        # The pool child loads the pipeline in worker_process_init; Celery's default wait is 4 s.
        worker_proc_alive_timeout=settings.model_load_timeout_s,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
