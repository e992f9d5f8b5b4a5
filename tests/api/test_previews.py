"""GET /v1/jobs/{id}/preview as a client meets it, on SQLite and PostgreSQL, with API keys: the running job's
latest preview with its image and step in the headers and never cached, named in its record and in the list;
404 in the one error shape before the first, once the job has ended, for an unknown job and for another key's job
(as its record is); 410 for a job retention deleted. The worker writing previews: tests/worker/test_previews.py."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from ops.retention import delete_expired
from shared import jobstore, keys, previews
from shared.db import session_factory
from shared.jobs import JobParameters
from shared.models import Job, utcnow
from shared.settings import Settings
from tests.conftest import offline_resolver
from tests.helpers import assert_error_shape, fresh_url  # noqa: F401  (a database of the test's own, each backend)

PARAMS = JobParameters(prompt="a lighthouse", negative_prompt=None, width=256, height=128, steps=30,
                       guidance_scale=7.5, seed=3, num_images=2, model="m-preview")
READING = jobstore.MemoryReading(100, 60, 40, 90, "vmhwm")


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def keyed(fresh_url, redis_url):
    sessions = session_factory(fresh_url)
    with sessions.begin() as s:
        alice, bob = keys.create_key(s, "alice"), keys.create_key(s, "bob")
    app = create_app(Settings(database_url=fresh_url, redis_url=redis_url, auth="required"), resolver=offline_resolver)
    with TestClient(app) as client:
        yield client, sessions, {"Authorization": f"Bearer {alice.token}"}, {"Authorization": f"Bearer {bob.token}"}, \
            alice.id


def _running(sessions, owner: str) -> jobstore.Attempt:
    with sessions.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS, owner_key_id=owner))
        job_id, delivery = job.id, job.delivery_id
    with sessions.begin() as s:
        return jobstore.start_attempt(s, job_id, delivery, "host-a", "host-a:1", max_attempts=3)


def test_the_owner_reads_the_running_jobs_latest_preview_and_no_one_else_does(keyed):
    client, sessions, alice, bob, alice_id = keyed
    attempt = _running(sessions, alice_id)
    url = f"/v1/jobs/{attempt.job_id}/preview"
    # before the first: 404, and the record names none
    assert_error_shape(client.get(url, headers=alice), 404, "not_found")
    assert client.get(f"/v1/jobs/{attempt.job_id}", headers=alice).json()["preview"] is None

    data = _jpeg(32, 16)
    with sessions.begin() as s:
        assert previews.save(s, attempt.job_id, attempt.number, 1, 12, 30, data, "image/jpeg", 32, 16)
    r = client.get(url, headers=alice)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/jpeg" and r.headers["cache-control"] == "no-store"
    assert (r.headers["x-preview-image"], r.headers["x-preview-step"], r.headers["x-preview-steps"]) == ("1", "12", "30")
    assert Image.open(io.BytesIO(r.content)).size == (32, 16)
    record = client.get(f"/v1/jobs/{attempt.job_id}", headers=alice).json()
    assert {k: record["preview"][k] for k in ("url", "image", "step", "steps", "width", "height")} == {
        "url": url, "image": 1, "step": 12, "steps": 30, "width": 32, "height": 16}
    (listed,) = [j for j in client.get("/v1/jobs", headers=alice).json()["jobs"] if j["id"] == attempt.job_id]
    assert listed["preview"] == record["preview"]

    # another key's job is no job here, as its record is; so is an unknown one; an ID that is no UUID too
    assert_error_shape(client.get(url, headers=bob), 404, "not_found")
    assert_error_shape(client.get(f"/v1/jobs/{attempt.job_id}", headers=bob), 404, "not_found")
    assert_error_shape(client.get(f"/v1/jobs/{uuid.uuid4()}/preview", headers=alice), 404, "not_found")
    assert_error_shape(client.get("/v1/jobs/not-a-job/preview", headers=alice), 404, "not_found")
    assert_error_shape(client.get(url), 401, "unauthorized")

    # ended: its images are the result; the preview is gone
    with sessions.begin() as s:
        assert jobstore.finish_succeeded(s, attempt, [jobstore.GeneratedImage(i, 3 + i, 256, 128, b"png")
                                                      for i in range(2)], 2.0, READING)
    assert_error_shape(client.get(url, headers=alice), 404, "not_found")
    assert client.get(f"/v1/jobs/{attempt.job_id}", headers=alice).json()["preview"] is None

    # deleted by retention: 410, as its record
    with sessions.begin() as s:
        s.get(Job, attempt.job_id).finished_at = utcnow() - timedelta(days=3)
    with sessions.begin() as s:
        delete_expired(s, utcnow() - timedelta(days=1), None)
    assert_error_shape(client.get(url, headers=alice), 410, "gone")
