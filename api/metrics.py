"""Prometheus metrics, computed at scrape time from the database (the truth) and Redis (queue depth), so
every API host reports the same numbers and no process has to survive to keep a count. The job counts and
histograms come from the statistics the database keeps as jobs change state (shared/jobstats.py): a scrape
costs the same at ten jobs and at a million."""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shared import fleet, jobstats
from shared.jobs import JobStatus
from shared.queue import queue_depth


def _histogram(name: str, doc: str, buckets: tuple, by_model: dict) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=["model"])
    for model, (per_bucket, total) in sorted(by_model.items()):
        cumulative, running = [], 0
        for bound, n in zip([*map(str, buckets), "+Inf"], per_bucket):
            running += n
            cumulative.append((bound, running))
        h.add_metric([model], cumulative, total)
    return h


class _Collector:
    def __init__(self, sessions, broker, settings):
        self.sessions, self.broker, self.settings = sessions, broker, settings

    def collect(self):
        with self.sessions() as session:
            by_model_state = jobstats.counts(session)
            histograms = jobstats.histograms(session)
            workers = fleet.workers(session)
            now = fleet.db_now(session)
        by_state = defaultdict(int)
        for (_model, state), n in by_model_state.items():
            by_state[state] += n
        queued_models = {m for (m, state), n in by_model_state.items() if state == JobStatus.queued.value and n > 0}
        jobs = GaugeMetricFamily("sdfleet_jobs", "Jobs by state", labels=["state"])
        for state in JobStatus:
            jobs.add_metric([state.value], by_state.get(state.value, 0))
        yield jobs

        live = [w for w in workers if fleet.is_alive(w, self.settings.worker_stale_s, now)]
        depth = GaugeMetricFamily("sdfleet_queue_depth", "Messages waiting in Redis per model", labels=["model"])
        for model in sorted(queued_models | {w.model for w in live}):
            depth.add_metric([model], queue_depth(self.broker, model))
        yield depth

        yield _histogram("sdfleet_job_duration_seconds", "Generation time of succeeded jobs",
                         jobstats.DURATION_BUCKETS, histograms.get("duration", {}))
        yield _histogram("sdfleet_job_queue_wait_seconds", "Queue wait of succeeded jobs", jobstats.DURATION_BUCKETS,
                         histograms.get("wait", {}))
        yield _histogram("sdfleet_job_peak_rss_bytes", "Peak RSS of succeeded jobs", jobstats.RSS_BUCKETS,
                         histograms.get("peak", {}))

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
