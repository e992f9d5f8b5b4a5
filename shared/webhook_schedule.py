"""The schedule of a webhook's attempts (retried by Celery, each attempt a message of its own), and its one
constraint: a delivery waiting for its next attempt must never look lost to the reconciler. Plain arithmetic,
no imports: every process's settings check it at start."""

from __future__ import annotations


# Attempt n+1 of a webhook goes 2^(n-1) s after attempt n failed (1, 2, 4, ... s: Celery's exponential backoff
# without jitter), at most WEBHOOK_BACKOFF_MAX_S apart. A pending delivery untouched for WEBHOOK_RESEND_AFTER_S has lost its
# hand-out (Redis restarted, an ops worker died) and is handed out again by the reconciler.
WEBHOOK_BACKOFF_MAX_S = 240
WEBHOOK_RESEND_AFTER_S = 600


def webhook_backoff_s(attempts_done: int) -> int:
    """Seconds between attempt `attempts_done` (failed) and the next one."""
    return min(WEBHOOK_BACKOFF_MAX_S, 2 ** (attempts_done - 1))


def check_webhook_schedule(timeout_s: float, max_attempts: int) -> None:
    """At start: the longest gap between two attempts of one delivery (the backoff plus an attempt's whole
    deadline) must stay under the reconciler's resend interval, or a live delivery would be handed out
    twice and its receiver called by two ops workers."""
    longest = max((webhook_backoff_s(n) for n in range(1, max_attempts)), default=0) + timeout_s
    if longest >= WEBHOOK_RESEND_AFTER_S:
        raise ValueError(f"SDFLEET_WEBHOOK_TIMEOUT_S={timeout_s:g} with a backoff of up to {WEBHOOK_BACKOFF_MAX_S} s "
                         f"leaves {longest:g} s between two attempts of a webhook, not less than the "
                         f"{WEBHOOK_RESEND_AFTER_S} s after which the reconciler hands a delivery out again")
