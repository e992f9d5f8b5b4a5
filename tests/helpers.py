"""Helpers and fixtures several test files share: the error shape, waiting for a job, the fault tests' job
shapes, an in-process API on a database of the module's own, and one with keys."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import lazyload

from api.app import create_app
from shared import fleet, jobstore, keys
from shared.db import engine_for, migrate, session_factory
from shared.fleet_contract import WorkerState
from shared.jobs import JobParameters, ModelDefaults
from shared.memory import GB
from shared.models import Job, JobImage, utcnow
from shared.settings import Settings
from tests.conftest import POSTGRES_URL, offline_resolver, postgres_database, wait_for


def assert_error_shape(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


def wait_status(stack, job_id: str, status: str, timeout: float = 60) -> dict:
    return wait_for(stack, job_id, "status", status, timeout)


LONG = dict(width=512, height=512, steps=150, guidance_scale=1.0)


SHORT = dict(width=64, height=64, steps=1)


def jobs_of(stack, model: str) -> list[Job]:
    with stack.sessions() as s:
        return list(s.scalars(select(Job).where(Job.model == model).options(lazyload(Job.images))))


def image_counts(stack, model: str) -> dict[str, int]:
    with stack.sessions() as s:
        rows = s.execute(select(JobImage.job_id).join(Job).where(Job.model == model)).scalars().all()
    counts = {}
    for job_id in rows:
        counts[job_id] = counts.get(job_id, 0) + 1
    return counts


def wait_all_terminal(stack, model: str, timeout: float = 300) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        rows = jobs_of(stack, model)
        if all(j.status in ("succeeded", "failed", "cancelled") for j in rows):
            return rows
        assert time.monotonic() < deadline, [(j.id, j.status) for j in rows if j.status not in ("succeeded",)]
        time.sleep(0.3)


BODY = {"prompt": "a cat", "width": 64, "height": 64, "steps": 1}


PARAMS = JobParameters(prompt="a cat", negative_prompt=None, width=64, height=64, steps=1, guidance_scale=1.0,
                       seed=1, num_images=1, model="tiny")


def _fresh(kind: str, tmp_path_factory):
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('hard') / 'hard.db'}"
    elif not POSTGRES_URL:
        pytest.skip("SDFLEET_TEST_POSTGRES_URL is not set (CI sets it to the local server)")
    else:
        yield from postgres_database()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    """This module's own database on each backend: its keys, workers and retention runs touch no other test."""
    yield from _fresh(request.param, tmp_path_factory)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path_factory):
    """A database of the test's own (auth depends on whether a key was ever created; retention deletes)."""
    for url in _fresh(request.param, tmp_path_factory):
        migrate(engine_for(url))
        yield url


@pytest.fixture
def db(database_url):
    migrate(engine_for(database_url))
    return session_factory(database_url)


# What a worker whose pipeline takes images announces (an SD 1.5 on optimum-intel): image jobs are admitted
IMAGE_DEFAULTS = ModelDefaults(family="sd", pipeline="OVStableDiffusionPipeline", scheduler="PNDMScheduler", steps=20,
                               guidance_scale=7.5, width=512, height=512, recommended_steps=(15, 50),
                               guidance_doubles_batch=True, negative_prompt=True,
                               tasks=["txt2img", "img2img", "inpaint", "upscale"])


def make_api(database_url, redis_url, defaults: ModelDefaults | None = None, **overrides):
    """An API in-process with a live worker's heartbeat for its own model (nobody consumes its queue); the
    worker announces `defaults` (IMAGE_DEFAULTS: it takes image jobs)."""
    model = f"hard-{uuid.uuid4().hex[:6]}"
    with session_factory(database_url).begin() as s:
        fleet.beat(s, WorkerState(name=f"h-{model}:1", host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=8 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None, defaults=defaults), utcnow())
    settings = Settings(**{"database_url": database_url, "redis_url": redis_url, "default_model": model,
                           "auth": "off", **overrides})
    return TestClient(create_app(settings, resolver=offline_resolver))


@pytest.fixture
def api(db, database_url, redis_url):
    with make_api(database_url, redis_url) as client:
        yield client


def count(db) -> int:
    with db() as s:
        return jobstore.count_jobs(s)


@pytest.fixture
def secured(sqlite_url, redis_url):
    model = f"sec-{uuid.uuid4().hex[:6]}"  # a queue no worker consumes: jobs stay queued
    sessions = session_factory(sqlite_url)
    with sessions.begin() as s:
        fleet.beat(s, WorkerState(name="h:1", host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=8 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())
        alice = keys.create_key(s, "alice")
        bob = keys.create_key(s, "bob", rate_limit_per_min=3)
    app = create_app(Settings(database_url=sqlite_url, redis_url=redis_url, default_model=model))
    with TestClient(app) as client:
        yield client, sessions, alice, bob


def auth(key) -> dict:
    return {"Authorization": f"Bearer {key.token}"}
