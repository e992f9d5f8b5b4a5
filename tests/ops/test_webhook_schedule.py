"""A webhook's retry schedule: what a receiver that keeps failing sees, and the one relation the settings check
at start (a delivery waiting for its next attempt never looks lost to the reconciler)."""

from __future__ import annotations

import pytest

from shared.webhook_schedule import (
    WEBHOOK_BACKOFF_MAX_S, WEBHOOK_RESEND_AFTER_S, check_webhook_schedule, webhook_backoff_s,
)
from shared.settings import Settings


def test_attempts_back_off_exponentially_up_to_a_cap():
    assert [webhook_backoff_s(n) for n in range(1, 6)] == [1, 2, 4, 8, 16]  # the default 6 attempts
    assert [webhook_backoff_s(n) for n in (9, 19)] == [WEBHOOK_BACKOFF_MAX_S] * 2  # 2^18 s no more
    from celery.utils.time import get_exponential_backoff_interval as celerys  # the same schedule as Celery's

    assert all(webhook_backoff_s(n) == celerys(1, n - 1, WEBHOOK_BACKOFF_MAX_S, False) for n in range(1, 21))


def test_every_setting_allowed_keeps_a_waiting_delivery_from_looking_lost():
    # the largest timeout and attempt count the settings accept still leave a gap under the resend interval
    settings = Settings(webhook_timeout_s=300, webhook_max_attempts=20)
    longest = max(webhook_backoff_s(n) for n in range(1, settings.webhook_max_attempts)) + settings.webhook_timeout_s
    assert longest < WEBHOOK_RESEND_AFTER_S


def test_a_schedule_that_would_send_a_delivery_twice_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="reconciler hands a delivery out again"):
        check_webhook_schedule(timeout_s=WEBHOOK_RESEND_AFTER_S - WEBHOOK_BACKOFF_MAX_S, max_attempts=20)
    check_webhook_schedule(timeout_s=WEBHOOK_RESEND_AFTER_S - 17, max_attempts=5)  # gaps of up to 16 s: fine
