"""Prometheus metrics, computed at scrape time from the database (the truth) and Redis (queue depth), so
every API host reports the same numbers and no process has to survive to keep a count."""

from __future__ import annotations

import bisect
from collections import defaultdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select

from shared import fleet
from shared.jobs import JobStatus
from shared.models import Job
from shared.queue import queue_depth

DURATION_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RSS_BUCKETS = tuple(g * 2**30 for g in (0.5, 1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64))


def _histogram(name: str, doc: str, buckets: tuple, values_by_model: dict) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=["model"])
    for model, values in sorted(values_by_model.items()):
        values = sorted(values)
        cumulative = [(str(b), bisect.bisect_right(values, b)) for b in buckets] + [("+Inf", len(values))]
        h.add_metric([model], cumulative, sum(values))
    return h


class _Collector:
    def __init__(self, sessions, broker, settings):
        self.sessions, self.broker, self.settings = sessions, broker, settings

    def collect(self):
        with self.sessions() as session:
            by_state = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            queued_models = set(session.scalars(select(Job.model).where(Job.status == JobStatus.queued.value)
                                                .distinct()))
            finished = session.execute(select(Job.model, Job.generation_s, Job.created_at, Job.started_at,
                                              Job.peak_rss_bytes).where(Job.status == JobStatus.succeeded.value)).all()
            workers = fleet.workers(session)
            now = fleet.db_now(session)
        jobs = GaugeMetricFamily("sdfleet_jobs", "Jobs by state", labels=["state"])
        for state in JobStatus:
            jobs.add_metric([state.value], by_state.get(state.value, 0))
        yield jobs

        live = [w for w in workers if fleet.is_alive(w, self.settings.worker_stale_s, now)]
        depth = GaugeMetricFamily("sdfleet_queue_depth", "Messages waiting in Redis per model", labels=["model"])
        for model in sorted(queued_models | {w.model for w in live}):
            depth.add_metric([model], queue_depth(self.broker, model))
        yield depth

        durations, waits, peaks = defaultdict(list), defaultdict(list), defaultdict(list)
        for model, generation_s, created, started, peak in finished:
            if generation_s is not None:
                durations[model].append(generation_s)
            if started is not None:
                waits[model].append((started - created).total_seconds())
            if peak is not None:
                peaks[model].append(peak)
        yield _histogram("sdfleet_job_duration_seconds", "Generation time of succeeded jobs", DURATION_BUCKETS,
                         durations)
        yield _histogram("sdfleet_job_queue_wait_seconds", "Queue wait of succeeded jobs", DURATION_BUCKETS, waits)
        yield _histogram("sdfleet_job_peak_rss_bytes", "Peak RSS of succeeded jobs", RSS_BUCKETS, peaks)

        count = GaugeMetricFamily("sdfleet_workers", "Workers by model and liveness", labels=["model", "alive"])
        tally = defaultdict(int)
        for w in workers:
            tally[(w.model, str(fleet.is_alive(w, self.settings.worker_stale_s, now)).lower())] += 1
        for labels, n in sorted(tally.items()):
            count.add_metric(list(labels), n)
        yield count
        budget = GaugeMetricFamily("sdfleet_worker_budget_bytes", "Memory budget of live workers",
                                   labels=["worker", "model"])
        resident = GaugeMetricFamily("sdfleet_worker_resident_bytes", "RSS of live workers with the pipeline "
                                     "loaded", labels=["worker", "model"])
        for w in live:
            budget.add_metric([w.name, w.model], w.budget_bytes)
            resident.add_metric([w.name, w.model], w.resident_bytes)
        yield budget
        yield resident


def render_metrics(sessions, broker, settings) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(sessions, broker, settings))
    return generate_latest(registry), CONTENT_TYPE_LATEST
