"""Routing by memory (#10): each job goes to the queue of the smallest memory class that holds its predicted
peak and that some live worker covers; a worker consumes only the classes its budget covers; a job no live
worker can take any more fails insufficient_memory. In-process against real Redis, on both databases;
the real workers' side is in test_fleet (hand-on, joining, the owner's memory) and test_multihost."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from shared import fleet, jobstore
from shared.fleet_contract import WorkerState
from shared.db import engine_for, migrate, session_factory
from shared.jobs import JobParameters
from shared.memory import GB, MB
from shared.models import Job, Worker
from shared.queue import MEMORY_CLASSES, class_depth, classes_within, make_celery, memory_class, top_class
from ops.reconcile import reconcile
from shared.settings import Settings
from tests.conftest import offline_resolver


def test_the_class_ladder():
    assert memory_class(1) == MEMORY_CLASSES[0] == 256 * MB
    assert memory_class(1280 * MB) == 1280 * MB and memory_class(1280 * MB + 1) == 1536 * MB
    assert memory_class(MEMORY_CLASSES[-1] + 1) is None
    ratios = [b / a for a, b in zip(MEMORY_CLASSES, MEMORY_CLASSES[1:])]
    assert all(1.19 <= r <= 1.51 for r in ratios), ratios
    assert classes_within(8 * GB)[0] == top_class(8 * GB) == 8 * GB
    assert top_class(int(7.9 * GB)) == 6 * GB  # a worker's usable budget is its largest class
    assert classes_within(200 * MB) == [] and top_class(200 * MB) == 0
    assert classes_within(2 * GB) == sorted(classes_within(2 * GB), reverse=True)


@pytest.fixture
def fleet_db(database_url):
    migrate(engine_for(database_url))
    return session_factory(database_url)


def beat(sessions, model: str, name: str, budget: int, resident: int = GB, ago_s: float = 0) -> None:
    with sessions.begin() as s:
        fleet.beat(s, WorkerState(name=name, host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=budget, cgroup_limit_bytes=None,
                                  total_ram_bytes=64 * GB, available_bytes=48 * GB, resident_bytes=resident,
                                  current_job_id=None), fleet.db_now(s))
        if ago_s:
            s.get(Worker, name).last_seen = fleet.db_now(s) - timedelta(seconds=ago_s)


def test_a_job_goes_to_the_smallest_class_a_live_worker_covers(fleet_db, database_url, redis_url):
    model = f"route-{uuid.uuid4().hex[:6]}"
    beat(fleet_db, model, f"{model}-small:1", 2 * GB)
    beat(fleet_db, model, f"{model}-large:1", 8 * GB)
    settings = Settings(database_url=database_url, redis_url=redis_url, default_model=model, auth="off")
    r = redis.Redis.from_url(redis_url)
    with TestClient(create_app(settings, resolver=offline_resolver)) as client:
        # the prior on these workers: 1 GiB resident + 256 MiB + 160 KiB per latent pixel and UNet batch item
        small = client.post("/v1/jobs", json={"prompt": "a cat", "width": 128, "height": 128, "guidance_scale": 1.0})
        large = client.post("/v1/jobs", json={"prompt": "a cat", "width": 1024, "height": 1024})
        too_large = client.post("/v1/jobs", json={"prompt": "a cat", "width": 2048, "height": 2048})
    small, large = small.json(), large.json()
    assert small["memory_class_bytes"] == memory_class(small["predicted_peak_bytes"]) <= 2 * GB
    assert 2 * GB < large["memory_class_bytes"] == memory_class(large["predicted_peak_bytes"]) <= 8 * GB
    assert class_depth(r, model, small["memory_class_bytes"]) == 1
    assert class_depth(r, model, large["memory_class_bytes"]) == 1  # a queue the small worker never reads
    assert large["memory_class_bytes"] not in classes_within(2 * GB)
    assert too_large.status_code == 422 and too_large.json()["error"]["details"]["largest_class_bytes"] == 8 * GB


def test_a_queued_job_no_live_worker_can_take_fails_and_one_with_no_worker_at_all_waits(fleet_db, database_url,
                                                                                          redis_url):
    model = f"left-{uuid.uuid4().hex[:6]}"
    settings = Settings(database_url=database_url, redis_url=redis_url, reconcile_grace_s=0)
    beat(fleet_db, model, f"{model}-small:1", 2 * GB)
    beat(fleet_db, model, f"{model}-large:1", 8 * GB, ago_s=120)  # the large worker left
    params = JobParameters(prompt="a cat", negative_prompt=None, width=1024, height=1024, steps=1,
                                 guidance_scale=7.5, seed=1, num_images=1, model=model)
    orphan_model = f"gone-{uuid.uuid4().hex[:6]}"
    with fleet_db.begin() as s:
        stranded = jobstore.create_job(s, jobstore.NewJob(params, predicted_peak_bytes=5 * GB,
                                                    memory_class_bytes=memory_class(5 * GB))).id
        fits = jobstore.create_job(s, jobstore.NewJob(params, predicted_peak_bytes=GB, memory_class_bytes=GB)).id
        waiting = jobstore.create_job(s, jobstore.NewJob(params.model_copy(update={"model": orphan_model}),
                                                   predicted_peak_bytes=GB, memory_class_bytes=GB)).id
    report = reconcile(fleet_db, redis.Redis.from_url(redis_url), make_celery(settings), settings)
    assert report.failed_unplaceable == [stranded]
    with fleet_db() as s:
        job = jobstore.to_public(s.get(Job, stranded))
        assert job.status.value == "failed" and job.error.code == "insufficient_memory"
        assert "covers its memory class" in job.error.message
        assert s.get(Job, fits).status == "queued"  # re-sent to its class instead
        assert s.get(Job, waiting).status == "queued"  # no worker of its model is live: it waits for one
