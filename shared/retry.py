"""The one retry policy for transient infrastructure errors (the database or Redis away for a moment):
exponential backoff with jitter, capped, within a total patience. Everything that waits out an outage goes
through here; what is retried is decided by the error's kind, never by the call site's guess.

Also here, the schedule of a webhook's attempts (retried by Celery, each attempt a message of its own), and
its one constraint: a delivery waiting for its next attempt must never look lost to the reconciler."""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import redis
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import (
    RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """A connection that failed or dropped: worth retrying. Bad SQL or bad data never is."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError))


def _log(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("%s: %s (%s); retrying in %.1f s", getattr(state.fn, "__qualname__", "call"),
                type(exc).__name__, str(exc).splitlines()[0][:200] if exc else "", state.upcoming_sleep)


def policy(patience_s: float = 60.0, max_wait_s: float = 5.0) -> Retrying:
    return Retrying(
        retry=retry_if_exception(is_transient), stop=stop_after_delay(patience_s),
        wait=wait_exponential_jitter(multiplier=0.2, max=max_wait_s, jitter=0.2), before_sleep=_log, reraise=True,
    )


def retrying(fn: Callable[[], T], patience_s: float = 60.0, max_wait_s: float = 5.0) -> T:
    """Call `fn`, retrying transient errors for up to `patience_s`; then the last error is raised."""
    return policy(patience_s, max_wait_s)(fn)


# Attempt n+1 of a webhook goes 2^(n-1) s after attempt n failed (1, 2, 4, ... s: Celery's exponential backoff),
# at most WEBHOOK_BACKOFF_MAX_S apart. A pending delivery untouched for WEBHOOK_RESEND_AFTER_S has lost its
# hand-out (Redis restarted, an ops worker died) and is handed out again by the reconciler.
WEBHOOK_BACKOFF_MAX_S = 240
WEBHOOK_RESEND_AFTER_S = 600


def webhook_backoff_s(attempts_done: int) -> int:
    """Seconds between attempt `attempts_done` (failed) and the next one."""
    return get_exponential_backoff_interval(factor=1, retries=attempts_done - 1, maximum=WEBHOOK_BACKOFF_MAX_S,
                                            full_jitter=False)


def check_webhook_schedule(timeout_s: float, max_attempts: int) -> None:
    """At start: the longest gap between two attempts of one delivery (the backoff plus an attempt's whole
    deadline) must stay under the reconciler's resend interval, or a live delivery would be handed out
    twice and its receiver called by two ops workers."""
    longest = max((webhook_backoff_s(n) for n in range(1, max_attempts)), default=0) + timeout_s
    if longest >= WEBHOOK_RESEND_AFTER_S:
        raise ValueError(f"SDFLEET_WEBHOOK_TIMEOUT_S={timeout_s:g} with a backoff of up to {WEBHOOK_BACKOFF_MAX_S} s "
                         f"leaves {longest:g} s between two attempts of a webhook, not less than the "
                         f"{WEBHOOK_RESEND_AFTER_S} s after which the reconciler hands a delivery out again")
