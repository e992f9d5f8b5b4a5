"""The submit path under concurrency: jobs stored together (group commit) are each stored, queued and
answered as if alone; a raced Idempotency-Key makes one job; the message in Redis is Celery's own; the
fleet and keys are cached, but a refusal is decided on a fresh read."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis
from sqlalchemy import select

from shared import fleet, keys

from shared.fleet_contract import WorkerState
from shared.memory import GB
from shared.models import Job, utcnow
from shared.queue import GENERATE_TASK, make_celery, queue_name, send_generate
from shared.settings import Settings
# this module's own database on each backend (a key created here must not turn auth on elsewhere), the
# in-process API with a live worker's heartbeat
from tests.helpers import database_url, db, make_api  # noqa: F401

BODY = {"prompt": "a lighthouse on a cliff"}


def _post_all(client, n: int, headers=None) -> list:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda _: client.post("/v1/jobs", json=BODY, headers=headers or {}), range(n)))


def test_concurrent_submissions_are_each_stored_queued_and_placed(db, database_url, redis_url):  # noqa: F811
    with make_api(database_url, redis_url) as client:
        model = client.app.state.ctx.settings.default_model
        answers = _post_all(client, 48)
        assert [r.status_code for r in answers] == [202] * 48, [r.text for r in answers if r.status_code != 202]
        records = [r.json() for r in answers]
        ids = {r["id"] for r in records}
        assert len(ids) == 48
        assert all(r["status"] == "queued" and r["parameters"]["model"] == model for r in records)
        assert all(r.headers["Location"] == f"/v1/jobs/{r.json()['id']}" for r in answers)
        # a fresh queue of one model and priority: the positions are 1..48, each once
        assert sorted(r["queue_position"] for r in records) == list(range(1, 49))
        with db() as s:
            stored = {j.id: j for j in s.scalars(select(Job).where(Job.model == model))}
        assert set(stored) == ids
        # each job's message is in its memory class's queue, carrying the job's ID and delivery ID
        broker = redis.Redis.from_url(redis_url)
        raw = broker.lrange(f"{queue_name(model, records[0]['memory_class_bytes'])}:3", 0, -1)
        sent = {}
        for m in raw:
            message = json.loads(m)
            assert message["headers"]["task"] == GENERATE_TASK
            job_id, delivery = message["headers"]["argsrepr"].strip("[]").replace("'", "").split(", ")
            sent[job_id] = delivery
        assert sent == {i: stored[i].delivery_id for i in ids}
        # and a record read back is the record the submission answered
        again = client.get(f"/v1/jobs/{records[0]['id']}").json()
        assert {k: again[k] for k in ("id", "parameters", "created_at", "predicted_peak_bytes")} == \
            {k: records[0][k] for k in ("id", "parameters", "created_at", "predicted_peak_bytes")}


def test_a_raced_idempotency_key_makes_one_job(db, database_url, redis_url):  # noqa: F811
    with make_api(database_url, redis_url) as client:
        key = f"k-{uuid.uuid4().hex}"
        answers = _post_all(client, 12, {"Idempotency-Key": key})
        assert sorted(r.status_code for r in answers) == [200] * 11 + [202]
        assert len({r.json()["id"] for r in answers}) == 1
        with db() as s:
            assert len(s.scalars(select(Job.id).where(Job.idempotency_key == key)).all()) == 1


def test_the_message_is_the_one_celery_send_task_makes(redis_url):
    celery = make_celery(Settings(redis_url=redis_url))
    broker = redis.Redis.from_url(redis_url)
    model, delivery = f"msg-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    queue = queue_name(model, 2 * GB)
    try:
        send_generate(celery, "job-1", delivery, model, "high", 2 * GB)
        ours = json.loads(broker.lpop(queue))
        celery.send_task(GENERATE_TASK, args=["job-1", delivery], task_id=delivery, queue=queue, priority=0)
        theirs = json.loads(broker.lpop(queue))
    finally:
        broker.delete(queue)
    for message in (ours, theirs):
        message["properties"].pop("delivery_tag")  # a counter per channel
    assert ours == theirs


def test_a_new_worker_is_admitted_at_once_though_the_fleet_is_cached(db, database_url, redis_url):  # noqa: F811
    with make_api(database_url, redis_url, api_cache_s=60) as client:
        assert client.post("/v1/jobs", json=BODY).status_code == 202  # the view is read and cached now
        model = f"late-{uuid.uuid4().hex[:6]}"
        r = client.post("/v1/jobs", json={**BODY, "model": model})
        assert r.status_code == 503 and model in r.text
        with db.begin() as s:
            fleet.beat(s, WorkerState(name=f"{model}:1", host="h", model=model, backend="optimum", precision="f32",
                                      memory_mode="low", budget_bytes=8 * GB, cgroup_limit_bytes=None,
                                      total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                      current_job_id=None), utcnow())
        assert client.post("/v1/jobs", json={**BODY, "model": model}).status_code == 202


def test_a_revoked_key_is_refused_once_the_key_cache_expires(db, database_url, redis_url):  # noqa: F811
    with db.begin() as s:
        key = keys.create_key(s, f"k-{uuid.uuid4().hex[:6]}")
    with make_api(database_url, redis_url, auth="required", api_cache_s=0) as client:
        headers = {"Authorization": f"Bearer {key.token}"}
        assert client.post("/v1/jobs", json=BODY, headers=headers).status_code == 202
        with db.begin() as s:
            assert keys.revoke(s, key.name)
        assert client.post("/v1/jobs", json=BODY, headers=headers).status_code == 401
