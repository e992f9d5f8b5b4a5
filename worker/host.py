"""This worker process's place in the fleet: its memory budget, its heartbeat into the database, and the
job it is running (whose latest memory reading the heartbeat keeps on the job's row, so that a worker
killed mid-job leaves its last reading behind)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import psutil

from shared import fleet, store
from shared.db import session_factory
from shared.memory import fmt_gb, read_host_budget
from shared.models import utcnow
from shared.settings import Settings
from worker.meter import JobMeter, rss_bytes
from worker.pipelines import Pipeline

log = logging.getLogger(__name__)

HOST = socket.gethostname()


def worker_name() -> str:
    """One name for the Celery worker (host and the main process's pid), kept when its pool child is replaced."""
    return f"{HOST}:{os.getppid()}"


def take_back_orphans(settings: Settings) -> None:
    """Run by a pool child as it starts, before loading its model: if it replaces one that died (SIGKILL, the
    OOM killer), the job that one was running goes back to queued at once, its attempt in the history (or
    ends timeout / worker_lost), instead of showing `running` on a dead process until its message comes round
    again. Celery has already put the message back (late ack, reject on worker lost): its delivery ID is kept."""
    with session_factory(settings.database_url).begin() as session:
        for job in store.running_on(session, worker_name()):
            lost = f"the worker process running attempt {job.attempts} on {job.worker_host} died"
            outcome = store.take_back(session, job, lost, settings.max_attempts, settings.job_timeout_s,
                                      keep_delivery=True)
            log.warning("job %s: %s; %s", job.id, lost,
                        "ended" if outcome == "" else "queued again" if outcome else "it had moved on")


@dataclass
class Running:
    attempt: store.Attempt
    meter: JobMeter


class Host:
    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline
        self.model = settings.served_model_name
        # a custom pipeline that does not say how it runs is taken as keeping everything resident
        self.memory_mode = getattr(pipeline, "memory_mode", "fast")
        self.name = worker_name()
        self.budget, self.cgroup_limit = read_host_budget(settings.memory_reserve, settings.memory_budget)
        self.started_at = utcnow()
        # A pipeline that releases components between jobs loads them again in every job: its base for
        # predictions is what it held at the peak of its warm-up, not the little it holds between jobs.
        levers = getattr(pipeline, "levers", None)
        self.floor = getattr(pipeline, "warm_peak", 0) if levers and (levers.release_all or levers.release_encoders) \
            else 0
        self.resident = self._resident()
        self.running: Running | None = None
        self._sessions = session_factory(settings.database_url)
        log.info("worker %s: budget %s (cgroup limit %s), resident %s, precision %s, memory mode %s", self.name,
                 fmt_gb(self.budget), fmt_gb(self.cgroup_limit) if self.cgroup_limit else "none",
                 fmt_gb(self.resident), pipeline.precision, self.memory_mode)

    def _resident(self) -> int:
        return max(rss_bytes(), self.floor)

    def start_heartbeat(self) -> None:
        self.beat()
        threading.Thread(target=self._loop, name="sdfleet-heartbeat", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.settings.heartbeat_s)
            try:
                self.beat()
            except Exception:  # the database may be away for a while; the next beat tries again
                log.exception("heartbeat failed")

    def try_beat(self) -> None:
        try:
            self.beat()
        except Exception:  # the database may be away for a moment; the heartbeat thread tries again
            log.warning("heartbeat not written", exc_info=True)

    def beat(self) -> None:
        running = self.running
        if running is None:
            self.resident = self._resident()
        ram = psutil.virtual_memory()
        hb = fleet.Heartbeat(
            name=self.name, host=HOST, model=self.model, backend=self.pipeline.backend,
            precision=self.pipeline.precision, memory_mode=self.memory_mode, budget_bytes=self.budget,
            cgroup_limit_bytes=self.cgroup_limit,
            total_ram_bytes=ram.total, available_bytes=ram.available,
            resident_bytes=self.resident, current_job_id=running.attempt.job_id if running else None,
        )
        with self._sessions.begin() as session:
            fleet.beat(session, hb, self.started_at)
            if running is not None:
                store.note_peak(session, running.attempt, running.meter.peak_so_far)
