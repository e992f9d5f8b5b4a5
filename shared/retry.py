"""The one retry policy for transient infrastructure errors (the database or Redis away for a moment):
exponential backoff with jitter, capped, within a total patience. Everything that waits out an outage goes
through here; what is retried is decided by the error's kind, never by the call site's guess."""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import redis
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

