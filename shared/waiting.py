"""Polling until something is so, or a deadline passes: one loop for the command line's blocking code and its
async twin for the API's routes, so that every wait in sdfleet ends the same way (the check runs once more
at the deadline, then the wait gives up with a WaitTimeout naming what it waited for and how long)."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """The deadline passed before the check came true."""

    def __init__(self, what: str, timeout_s: float):
        self.what = what
        self.timeout_s = timeout_s
        super().__init__(f"gave up waiting for {what} after {timeout_s:g} s")


class _Deadline:
    def __init__(self, timeout_s: float):
        self.at = time.monotonic() + timeout_s

    def passed(self) -> bool:
        return time.monotonic() > self.at

    def nap(self, poll_s: float) -> float:
        """The next pause: poll_s, cut short so that the last check falls on the deadline, not past it."""
        return max(0.0, min(poll_s, self.at - time.monotonic()))


def wait_until(check: Callable[[], T | None | bool], timeout_s: float, poll_s: float, what: str) -> T:
    """Call `check` every poll_s seconds until it returns something truthy, and return that. The check may
    raise to end the wait early (a process it watches has exited); WaitTimeout after timeout_s."""
    deadline = _Deadline(timeout_s)
    while not (result := check()):
        if deadline.passed():
            raise WaitTimeout(what, timeout_s)
        time.sleep(deadline.nap(poll_s))
    return result


async def wait_until_async(check: Callable[[], Awaitable[T | None | bool]], timeout_s: float, poll_s: float,
                           what: str) -> T:
    """wait_until for the event loop: the check is awaited, and the pauses yield to other requests."""
    deadline = _Deadline(timeout_s)
    while not (result := await check()):
        if deadline.passed():
            raise WaitTimeout(what, timeout_s)
        await asyncio.sleep(deadline.nap(poll_s))
    return result
