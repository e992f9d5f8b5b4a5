"""The Celery app both sides share, with the task and queue names: the API enqueues by name (send_task)
without importing the worker, and the worker registers the task on this same app. Redis key names live here."""

from __future__ import annotations

import json
import logging
import math
import time

from celery import Celery

from shared import ids
from shared.settings import Settings

log = logging.getLogger(__name__)

GENERATE_TASK = "sdfleet.generate"
WEBHOOK_TASK = "sdfleet.webhook"
QUEUE_PREFIX = "sdfleet.model."
WEBHOOK_QUEUE = "sdfleet.webhooks"  # consumed by the ops workers: never behind an image generation

# The Redis transport emulates priorities with one list per step, consumed lowest number first.
PRIORITIES = {"high": 0, "normal": 3, "low": 6}
_PRIORITY_SEP = ":"
_UNACKED_KEY = "unacked"  # kombu's Redis transport keeps delivered, unacknowledged messages here (ops workers)
PIDBOX_EXCHANGE = "celery.pidbox"  # Celery's remote control (its control_exchange, "celery"): a fanout channel
RATE_LIMIT_PREFIX = "sdfleet:ratelimit"  # the `limits` library's moving windows, one per API key
RECONCILE_LOCK_KEY = "sdfleet:lock:reconcile"  # one reconciler pass at a time in the whole fleet


# Memory classes: a job is routed by its predicted peak to the queue of the smallest class that holds it, and
# a worker consumes the queues of every class whose ceiling its budget covers. So a job only ever reaches a
# worker that fits it, whichever worker takes it, with nothing but Celery's queues doing the routing. The
# ladder climbs by 1.25-1.33x: a worker's usable budget is its largest class, at most a quarter below it.
_CLASS_MIB = (256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 10240, 12288,
              16384, 20480, 24576, 32768, 40960, 49152, 65536, 81920, 98304, 131072, 163840, 196608, 262144)
MEMORY_CLASSES = tuple(m << 20 for m in _CLASS_MIB)


def memory_class(predicted_bytes: int) -> int | None:
    """The smallest class ceiling (bytes) that holds a job predicted at this peak; None past the largest."""
    return next((c for c in MEMORY_CLASSES if c >= predicted_bytes), None)


def classes_within(budget_bytes: int) -> list[int]:
    """The classes a worker with this budget can take, largest first (its consume order: big jobs first,
    since only the big workers can run them)."""
    return [c for c in reversed(MEMORY_CLASSES) if c <= budget_bytes]


def top_class(budget_bytes: int) -> int:
    """The largest class a budget covers: what the worker can be routed, 0 if less than the smallest."""
    return next(iter(classes_within(budget_bytes)), 0)


def queue_name(model: str, ceiling: int) -> str:
    """One queue per model and memory class: a worker consumes only its model's classes that it fits."""
    return f"{QUEUE_PREFIX}{model}.mem-{ceiling >> 20}mib"


def priority_keys(queue: str) -> list[str]:
    """The Redis lists of one queue: one per priority step (kombu's transport emulates priorities so)."""
    return [queue if p == 0 else f"{queue}{_PRIORITY_SEP}{p}" for p in sorted(PRIORITIES.values())]


def unacked_keys(model: str) -> dict[str, str]:
    """Where a model's workers keep their delivered, unacknowledged messages: kombu's transport options, keys of
    the model's own (not kombu's fleet-wide `unacked`), so that a worker's Redis user needs no other model's
    messages, and restores (after the visibility timeout) only its own model's."""
    base = f"{QUEUE_PREFIX}{model}.{_UNACKED_KEY}"
    return {"unacked_key": base, "unacked_index_key": f"{base}_index", "unacked_mutex_key": f"{base}_mutex"}


def queue_keys(redis_client, model: str) -> list[str]:
    """The Redis lists holding a model's queued messages (every class and priority step). Redis drops an
    empty list, so the keys that exist are the ones with messages."""
    pattern = f"{QUEUE_PREFIX}{model}.mem-*mib*"
    return sorted(k.decode() if isinstance(k, bytes) else k for k in redis_client.scan_iter(match=pattern, count=500))


def class_depth(redis_client, model: str, ceiling: int) -> int:
    """Messages waiting in one memory class of a model (every priority step: Redis keeps a list per step)."""
    return sum(redis_client.llen(key) for key in priority_keys(queue_name(model, ceiling)))


def queue_depth(redis_client, model: str) -> int:
    return sum(redis_client.llen(k) for k in queue_keys(redis_client, model))


def _message_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked entries are [message, exchange, routing_key]
            message = message[0]
        return message["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def message_ids_in_broker(redis_client, models: list[str], delivered_within_s: float | None = None) -> set[str]:
    """Task IDs (our delivery IDs) of every message Redis holds for these models: queued or delivered (to a
    worker of the model, or to a worker of an earlier release, which used kombu's fleet-wide key). With
    `delivered_within_s`, a delivered message counts only if it was delivered that recently (kombu's
    unacked index holds the time of delivery, by the consumer's clock)."""
    ids = set()
    now = time.time()

    def delivered(key: str, index_key: str) -> None:
        payloads = redis_client.hgetall(key)
        if delivered_within_s is None:
            ids.update(_message_id(m) for m in payloads.values())
            return
        at = dict(redis_client.zrange(index_key, 0, -1, withscores=True))
        ids.update(_message_id(m) for tag, m in payloads.items() if now - at.get(tag, now) < delivered_within_s)

    for model in models:
        for key in queue_keys(redis_client, model):
            ids.update(_message_id(m) for m in redis_client.lrange(key, 0, -1))
        keys = unacked_keys(model)
        delivered(keys["unacked_key"], keys["unacked_index_key"])
    delivered(_UNACKED_KEY, f"{_UNACKED_KEY}_index")
    ids.discard(None)
    return ids


def new_delivery_id() -> str:
    return ids.uuid4()


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


def send_generate(celery: Celery, job_id: str, delivery_id: str, model: str, priority: str,
                  memory_class_bytes: int | None, producer=None) -> None:
    """The message is the job ID and this enqueue's delivery ID (also the Celery task ID), sent to the
    queue of the job's model and memory class (on `producer` when given: one connection for many, and inside
    its `batch()` one Redis round trip for many). It is the message `send_task` makes (tests compare them),
    built and sent by the two calls of Celery's own that `send_task` makes, without the rest of what
    `send_task` does per message (routing a task name, a result object), which cost more than both."""
    args = [job_id, delivery_id]
    message = celery.amqp.create_task_message(delivery_id, GENERATE_TASK, args, {}, reply_to=celery.thread_oid,
                                              ignore_result=None, argsrepr=repr(args), kwargsrepr="{}")
    with celery.producer_or_acquire(producer) as p:
        celery.amqp.send_task_message(p, GENERATE_TASK, message, priority=PRIORITIES[priority],
                                      queue=queue_name(model, memory_class_bytes or MEMORY_CLASSES[0]))


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
