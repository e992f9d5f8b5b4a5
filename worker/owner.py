"""Yielding to the host's owner, as a volunteer-computing client does: how much memory the worker may use now
(what is available, not a number fixed at start), whether the owner is busy (their programs' CPU share, low
available memory), the lowest CPU priority for the inference, and which memory classes the worker consumes
(Celery's remote control: a paused worker consumes none, a squeezed one only those that still fit)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque

import psutil

from shared.memory import fmt_size
from shared.queue import classes_within, queue_name
from shared.settings import Settings

log = logging.getLogger(__name__)


def lower_cpu_priority(level: str) -> str:
    """Run this thread, and the threads it starts from now on (OpenVINO's inference pool among them), below
    everything the owner runs. Returns what was applied."""
    if level == "normal":
        return "normal"
    os.nice(19 - os.nice(0))
    if level == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle (SCHED_IDLE, nice 19)"
        except OSError as exc:
            log.info("SCHED_IDLE refused (%s): nice 19 only", exc)
    return "low (nice 19)"


class OwnerWatch:
    """Samples the host at each heartbeat: the owner's CPU share over a window (all CPU time but this
    worker's processes'), and available memory. `budget()` and `pause_reason()` read the last samples."""

    def __init__(self, settings: Settings, worker_pid: int):
        self.settings = settings
        self._worker = psutil.Process(worker_pid)  # the Celery main process; its pool child is a child of it
        self._cpus = psutil.cpu_count() or 1
        self._window: deque[tuple[float, float, float]] = deque()
        self._family_at: float | None = None
        self._family_list: list[psutil.Process] = []
        self.available = psutil.virtual_memory().available
        self.others_percent = 0.0
        self.sample()

    def _family(self) -> list[psutil.Process]:
        """The worker's processes: listing children reads every process's /proc/PID/stat (~1 ms per hundred
        processes), so the list is kept for 10 s; this process (the pool child) is always in it."""
        now = time.monotonic()
        if self._family_at is None or now - self._family_at > 10:
            family = [self._worker, psutil.Process(), *self._worker.children(recursive=True)]
            self._family_list = list({p.pid: p for p in family}.values())
            self._family_at = now
        return self._family_list

    def _own_cpu_s(self) -> float:
        total = 0.0
        for proc in self._family():
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def sample(self) -> None:
        now = time.monotonic()
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        self._window.append((now, busy, self._own_cpu_s()))
        while len(self._window) > 2 and now - self._window[1][0] >= self.settings.pause_window_s:
            self._window.popleft()
        t0, busy0, own0 = self._window[0]
        if now - t0 > 0:
            others = max(0.0, (busy - busy0) - (self._window[-1][2] - own0))
            self.others_percent = 100.0 * others / ((now - t0) * self._cpus)
        self.available = psutil.virtual_memory().available

    def budget(self, configured: int, own_rss: int) -> int:
        """What the worker may use now: the configured budget, or less while the owner's programs hold memory."""
        if not self.settings.budget_follows_available:
            return configured
        return max(0, min(configured, self.available + own_rss - self.settings.memory_reserve))

    def pause_reason(self, own_job_bytes: int = 0) -> str | None:
        """Why the worker should take no job now, or None. `own_job_bytes` (what the running job holds above
        the loaded pipeline) is the worker's own doing, not the owner's: it does not count."""
        s = self.settings
        available = self.available + own_job_bytes
        if s.pause_available_bytes and available < s.pause_available_bytes:
            return (f"the host's available memory is {fmt_size(available)}, below "
                    f"{fmt_size(s.pause_available_bytes)} (SDFLEET_PAUSE_AVAILABLE_BYTES)")
        if s.pause_cpu_percent < 100 and self.others_percent > s.pause_cpu_percent:
            return (f"other programs use {self.others_percent:.0f}% of the CPUs, above {s.pause_cpu_percent:g}% "
                    f"(SDFLEET_PAUSE_CPU_PERCENT, over {s.pause_window_s:g} s)")
        return None


class Consumers:
    """Which of its model's memory-class queues the worker consumes, changed through Celery's remote control
    (the pool child cannot touch the consumer, which lives in the main process)."""

    def __init__(self, celery, model: str, configured_budget: int, worker_pid: int):
        self.celery, self.model = celery, model
        self.node = f"sdfleet@{socket.gethostname()}.{worker_pid}"  # worker.app names it so
        self.current = set(classes_within(configured_budget))  # what the worker started with

    def follow(self, budget: int, paused: bool) -> None:
        wanted = set() if paused else set(classes_within(budget))
        for ceiling in sorted(self.current - wanted, reverse=True):
            self.celery.control.cancel_consumer(queue_name(self.model, ceiling), destination=[self.node])
        # largest first: Redis's BRPOP reads the worker's queues in the order they were added
        for ceiling in sorted(wanted - self.current, reverse=True):
            self.celery.control.add_consumer(queue_name(self.model, ceiling), destination=[self.node])
        if wanted != self.current:
            log.info("memory classes consumed: %s", ", ".join(fmt_size(c) for c in sorted(wanted, reverse=True))
                     or "none (paused)")
        self.current = wanted
