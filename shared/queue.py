"""The Celery app both sides share, with the task and queue names: the API enqueues by name (send_task)
without importing the worker, and the worker registers the task on this same app. Redis key names live here."""

from __future__ import annotations

from celery import Celery

from shared.settings import Settings

GENERATE_TASK = "sdfleet.generate"
QUEUE_PREFIX = "sdfleet.model."


def queue_name(model: str) -> str:
    """One queue per model: a worker consumes only the queue of the model it has loaded."""
    return QUEUE_PREFIX + model


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
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout},
        task_soft_time_limit=settings.job_timeout_s,
        task_time_limit=settings.job_timeout_s + 60,
        # The pool child loads the pipeline in worker_process_init; Celery's default wait is 4 s.
        worker_proc_alive_timeout=settings.model_load_timeout_s,
        broker_connection_retry_on_startup=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
