"""The Celery worker: the shared app with the generate task registered, the pipeline loaded once per pool
child (worker_process_init) and its heartbeat started, and the command that starts it with concurrency 1
on its model's queues, one per memory class its budget covers."""

from __future__ import annotations

import logging
import os
import signal

import psutil
from celery.signals import worker_process_init, worker_shutting_down
from celery.worker import state as celery_state

from shared import fleet
from shared.db import WORKER_POOL, engine_for, migrate, session_factory, use_pool, wait_for_database
from shared.memory import fmt_size, read_host_budget
from shared.queue import (
    GENERATE_TASK, MEMORY_CLASSES, classes_within, hard_time_limit, make_celery, queue_name, unacked_keys,
)
from shared.retry import retrying
from shared.settings import get_settings
from modeltools import hub
from worker.process import Beacon, WorkerProcess, take_back_orphans
from worker.owner import Consumers, lower_cpu_priority
from worker.pipelines import get_pipeline
from worker.tasks import run_job

log = logging.getLogger(__name__)

settings = get_settings()
use_pool(WORKER_POOL)  # ~1 connection per host: a fleet of hosts shares one PostgreSQL's max_connections
app = make_celery(settings)
_worker: WorkerProcess | None = None


@app.task(name=GENERATE_TASK)
def generate(job_id: str, delivery_id: str | None = None) -> str:
    # webhooks go to the ops workers: this worker goes on to its next job at once
    _leave_on_sigterm()
    return run_job(job_id, delivery_id, _worker, app).value


_pool_sigterm = None  # billiard's handler in the pool child (it exits the child), kept for an idle child


def _on_sigterm(signum, frame) -> None:
    """SIGTERM in the pool child (systemd stops the whole unit, or the main process passed it on): a job that
    is running checkpoints at its next step and is handed back, then the child goes as billiard would have."""
    if _worker is not None and _worker.busy:
        _worker.stop("the worker is stopping (SIGTERM)")
    elif callable(_pool_sigterm):
        _pool_sigterm(signum, frame)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _leave_on_sigterm() -> None:
    # Installed from the first task (the child's main thread): billiard sets its own after worker_process_init.
    global _pool_sigterm
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _pool_sigterm = current
        signal.signal(signal.SIGTERM, _on_sigterm)


@worker_shutting_down.connect
def _pass_sigterm_on(sig=None, how=None, **_kwargs) -> None:
    """The main process got SIGTERM (`docker stop` signals it alone) and shuts down warm, waiting for the
    running task: the pool child is told too, so the task hands its job back within one step instead of
    running to the end."""
    if how != "Warm" or not celery_state.active_requests:
        return
    for child in psutil.Process().children():
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass


@worker_process_init.connect
def _load_pipeline(**_kwargs) -> None:
    # Only the pool child holds the weights; a replaced child (after a SIGKILL) loads them again.
    global _worker
    # connections opened by the parent (its migration) must not be shared across the fork
    engine_for(settings.database_url).dispose(close=False)
    try:
        retrying(lambda: take_back_orphans(settings), patience_s=30)
    except Exception:
        log.exception("could not take back the job of a dead pool child; the reconciler will")
    beacon = Beacon(settings).start()  # before the priority drops: the heartbeat keeps the normal one
    log.info("CPU priority of the inference: %s", lower_cpu_priority(settings.cpu_priority))
    pipeline = get_pipeline(settings)
    budget, _ = read_host_budget(settings.memory_reserve, settings.memory_budget)
    _worker = WorkerProcess(settings, pipeline, Consumers(app, settings.served_model_name, budget, os.getppid()))
    beacon.serve(_worker)


def preflight() -> str:
    """Refuse to start with a clear message rather than loop on a broken child."""
    name = settings.served_model_name
    if settings.backend in ("optimum", "genai"):
        # a hub ID is resolved (from the cache, or downloaded) once here: the pool children inherit the answer
        try:
            log.info("model %s", hub.describe(settings.model))
        except hub.SourceError as exc:
            raise SystemExit(f"SDFLEET_MODEL={exc}") from None
    if settings.tiny_vae:
        from worker.tiny_vae import model_latent_channels, tiny_vae_folder

        if settings.backend != "optimum":
            raise SystemExit(f"SDFLEET_TINY_VAE={settings.tiny_vae}: only the optimum backend decodes with a tiny "
                             f"VAE (SDFLEET_BACKEND={settings.backend})")
        try:
            tiny_vae_folder(settings.tiny_vae, model_latent_channels(hub.resolve(settings.model)))
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    engine = engine_for(settings.database_url)
    wait_for_database(engine)
    migrate(engine)
    if settings.backend == "optimum":
        # Import the model stack once, before the pool forks: a pool child replaced after a SIGKILL then
        # only loads the model (about a second for the tiny one) instead of re-importing it (about 8 s).
        from optimum.intel import OVDiffusionPipeline  # noqa: F401  (optimum.intel imports lazily)
    return name


def main(extra_args: list[str] | None = None) -> None:
    name = preflight()
    # delivered messages wait for their ack in the model's own keys: its Redis user needs no other model's
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **unacked_keys(name)}
    with session_factory(settings.database_url)() as session:
        generate.time_limit = hard_time_limit(settings.job_timeout_s, fleet.slowest_step_s(session, name))
    engine_for(settings.database_url).dispose()  # the main process needs no connection while Celery runs
    log.info("job timeout %s s, hard limit %s s", settings.job_timeout_s, generate.time_limit)
    budget, _ = read_host_budget(settings.memory_reserve, settings.memory_budget)
    classes = classes_within(budget)
    if not classes:
        raise SystemExit(f"a budget of {fmt_size(budget)} is below the smallest memory class "
                         f"({fmt_size(MEMORY_CLASSES[0])}); set SDFLEET_MEMORY_BUDGET or SDFLEET_MEMORY_RESERVE")
    queues = [queue_name(name, c) for c in classes]
    log.info("serving %s from %s: memory classes up to %s (budget %s), queues %s ... %s", name, settings.model,
             fmt_size(classes[0]), fmt_size(budget), queues[0], queues[-1])
    app.worker_main([
        "worker", "--queues", ",".join(queues), "--concurrency", "1", "--prefetch-multiplier", "1",
        "--pool", "prefork", "--hostname", f"sdfleet@%h.{os.getpid()}", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", *(extra_args or []),
    ])
