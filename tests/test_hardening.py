"""Hardening (#9), in-process against real Redis and each database (SQLite and PostgreSQL): statuses inside
the documented contract, webhook URLs that would reach inside the fleet refused, auth that cannot fall open,
cancel and profile races, concurrent migrations, retention. Live-process cases are in test_faults and
test_worker_failures."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from shared import deliveries, fleet, jobstore, keys, webhooks
from shared.fleet_contract import WorkerState
from shared.db import engine_for, migrate, schema_revision, session_factory
from shared.errors import Conflict, ErrorCode
from shared.jobs import JobParameters, JobStatus, WebhookStatus
from shared.jobstore import TakeBackOutcome
from shared.memory import GB, Shape
from shared.models import Job, MemoryProfile, utcnow
from shared.queue import hard_time_limit
from ops.retention import enforce_retention
from shared.settings import Settings
from tests.conftest import POSTGRES_URL, ROOT, free_port, offline_resolver, postgres_database
from tests.test_api_validation import assert_error_shape

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


def make_api(database_url, redis_url, **overrides):
    """An API in-process with a live worker's heartbeat for its own model (nobody consumes its queue)."""
    model = f"hard-{uuid.uuid4().hex[:6]}"
    with session_factory(database_url).begin() as s:
        fleet.beat(s, WorkerState(name=f"h-{model}:1", host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=8 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())
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


# --- statuses inside the contract -------------------------------------------------------------------------

@pytest.mark.parametrize("job_id", ["%00", "x", "1%27%20OR%201=1", "a" * 300, "72045503-5ffa-4421-902f-05d8c70b2a6"])
def test_a_malformed_job_id_is_404_on_every_route(api, job_id):
    for method, path in [("get", "/v1/jobs/{}"), ("delete", "/v1/jobs/{}"), ("get", "/v1/jobs/{}/images/0.png"),
                         ("get", "/v1/jobs/{}/memory")]:
        assert_error_shape(getattr(api, method)(path.format(job_id)), 404, "not_found")


def test_wrong_method_is_405_with_allow_and_a_trailing_slash_is_404_not_a_redirect(api):
    r = api.put("/v1/jobs", json=BODY)
    assert_error_shape(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    r = api.post("/v1/jobs/", json=BODY, follow_redirects=False)
    assert_error_shape(r, 404, "not_found")


def test_a_body_over_the_cap_is_413_whether_it_says_its_length_or_not(api, db):
    before = count(db)
    big = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    r = api.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    error = assert_error_shape(r, 413, "payload_too_large")
    assert error["details"]["max_body_bytes"] == 64 * 1024

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b" " * 4096
        yield b'{"prompt": "a cat"}'

    r = api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(r, 413, "payload_too_large")
    assert count(db) == before


def test_blank_idempotency_key_is_422(api, db):
    before = count(db)
    for key in ("", "   ", "caf\u00e9"):
        r = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key.encode()})
        assert_error_shape(r, 422, "invalid_request")
    assert count(db) == before
    assert api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "order-17"}).status_code == 202


def test_the_openapi_schema_describes_every_status_and_the_webhook_rules(api):
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"200", "202", "401", "404", "409", "410"} <= set(paths["/v1/jobs/{job_id}"]["delete"]["responses"])
    assert {"200", "202", "401", "409", "413", "422", "429", "503"} <= set(paths["/v1/jobs"]["post"]["responses"])
    hook = spec["components"]["schemas"]["JobCreate"]["properties"]["webhook_url"]
    assert "public addresses" in hook["description"] and "credentials" in hook["description"]


# --- webhook URLs: no server-side request forgery -------------------------------------------------------------

@pytest.mark.parametrize("url,why", [
    ("http://localhost:6379/", "loopback"), ("http://127.0.0.1:8000/v1/jobs", "loopback"),
    ("http://2130706433/", "loopback"), ("http://0/", "unspecified"), ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"), ("http://10.0.0.1/", "private"), ("http://192.168.1.1/", "private"),
    ("http://172.16.0.1/", "private"), ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://224.0.0.1/", "multicast"), ("http://240.0.0.1/", "reserved"),
    ("http://user:pass@203.0.113.5/", "credentials"), ("http://203.0.113.5/\r\nX: 1", "control"),
    ("http://no-such-host.invalid/", "does not resolve"),
])
def test_webhooks_that_would_reach_inside_are_refused_at_submit(api, db, url, why):
    """Checked without a packet leaving the machine: these are literals, or names the test resolver refuses."""
    before = count(db)
    error = assert_error_shape(api.post("/v1/jobs", json={**BODY, "webhook_url": url}), 422, "invalid_request")
    assert error["details"][0]["field"] == "webhook_url" and why in error["message"], error
    assert count(db) == before


def test_an_operator_can_allow_an_internal_network(db, database_url, redis_url):
    with make_api(database_url, redis_url, webhook_allow_networks="127.0.0.0/8") as client:
        assert client.post("/v1/jobs", json={**BODY, "webhook_url": "http://127.0.0.1:9/hook"}).status_code == 202
        r = client.post("/v1/jobs", json={**BODY, "webhook_url": "http://10.0.0.1/hook"})
        assert_error_shape(r, 422, "invalid_request")


def test_a_name_that_resolves_inside_is_refused_at_send_time_too():
    """DNS can change between submit and send: the ops worker resolves again, and any inside address refuses."""
    def rebinding(answer):
        return lambda host, port, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]

    assert webhooks.resolve("https://hooks.example/x", (), rebinding("93.184.215.14")).address.exploded == "93.184.215.14"
    for inside in ("127.0.0.1", "10.9.8.7", "169.254.169.254"):
        with pytest.raises(webhooks.WebhookRefused, match="resolves to"):
            webhooks.resolve("https://hooks.example/x", (), rebinding(inside))


class _Receiver(http.server.BaseHTTPRequestHandler):
    seen: list = []
    trickle = False

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(self.headers["Host"])
        if type(self).trickle:  # one byte at a time, never done within the deadline
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(40):
                try:
                    self.wfile.write(b"X")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
            return
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_delivery_goes_to_the_checked_address_and_has_one_deadline():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        # the name is never looked up again: the connection goes to the address that was checked
        allowed = Settings(webhook_allow_networks="127.0.0.0/8").webhook_allowed
        dest = webhooks.resolve(f"http://hooks.example:{port}/done", allowed,
                                lambda host, p, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))])
        assert webhooks.post(dest, b"{}", {"Content-Type": "application/json"}, 5.0) == 204
        assert _Receiver.seen[-1] == f"hooks.example:{port}"
        _Receiver.trickle = True
        with pytest.raises(TimeoutError):
            webhooks.post(dest, b"{}", {}, 1.0)
    finally:
        _Receiver.trickle = False
        server.shutdown()


def test_a_webhook_hand_out_is_sent_once(db):
    with db.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS, webhook_url="http://203.0.113.5/hook"))
        attempt = jobstore.start_attempt(s, job.id, job.delivery_id, "h", "h:1", 2)
        jobstore.finish_failed(s, attempt, ErrorCode.generation_failed, "boom", None)
    with db.begin() as s:
        first = deliveries.webhook_handout(s, job.id)
    assert first.attempts_done == 0
    with db.begin() as s:  # the message, and a duplicate of it (Redis redelivered it)
        assert deliveries.claim_webhook(s, job.id, first.delivery_id, 0) is not None
    with db.begin() as s:
        assert deliveries.claim_webhook(s, job.id, first.delivery_id, 0) is None
    # two reconcilers find the hand-out stale at once: one re-sends
    later = utcnow() + timedelta(hours=1)
    with db.begin() as s:
        resent = deliveries.resend_webhook(s, job.id, later)
    with db.begin() as s:
        assert deliveries.resend_webhook(s, job.id, utcnow() - timedelta(hours=1)) is None  # not stale any more
    assert resent and resent.delivery_id != first.delivery_id and resent.attempts_done == 1
    with db.begin() as s:  # the old hand-out's retry is now stale
        assert deliveries.claim_webhook(s, job.id, first.delivery_id, 1) is None
        assert deliveries.claim_webhook(s, job.id, resent.delivery_id, 1) is not None
        assert deliveries.end_webhook(s, job.id, resent.delivery_id, WebhookStatus.delivered)
    with db() as s:
        assert s.get(Job, job.id).webhook_status == "delivered"


# --- auth that cannot fall open --------------------------------------------------------------------------

ROUTES = [("post", "/v1/jobs"), ("get", f"/v1/jobs/{uuid.uuid4()}"), ("get", "/v1/workers"), ("get", "/v1/models"),
          ("get", "/metrics")]


def _all_401(client, headers=None):
    for method, path in ROUTES:
        kwargs = {"json": BODY} if method == "post" else {}
        assert_error_shape(getattr(client, method)(path, headers=headers or {}, **kwargs), 401, "unauthorized")


def test_revoking_the_last_key_never_opens_the_api(fresh_url, redis_url):
    db = session_factory(fresh_url)
    with make_api(fresh_url, redis_url, auth="auto", api_host="127.0.0.1") as client:
        assert client.post("/v1/jobs", json=BODY).status_code == 202  # loopback and no key ever: open
        with db.begin() as s:
            key = keys.create_key(s, f"k-{uuid.uuid4().hex[:6]}")
        with db.begin() as s:
            assert keys.revoke(s, key.name)
        client.app.state.ctx._auth["checked"] = float("-inf")  # as after the 5 s every host re-reads keys
        _all_401(client)
        _all_401(client, {"Authorization": f"Bearer {key.token}"})  # the revoked key stays revoked
        assert client.get("/healthz").status_code == 200


def test_required_auth_with_no_key_refuses_everyone_and_unknown_bind_is_required(db, database_url, redis_url):
    with make_api(database_url, redis_url, auth="required", api_host="127.0.0.1") as client:
        _all_401(client)
    with make_api(database_url, redis_url, auth="auto", api_host="0.0.0.0") as client:
        _all_401(client)
    with make_api(database_url, redis_url, auth="auto", api_host=None) as client:  # built elsewhere: not open
        _all_401(client)


def test_an_unknown_setting_in_the_environment_is_refused_with_a_suggestion(monkeypatch):
    monkeypatch.setenv("SDFLEET_AUTHH", "required")
    with pytest.raises(ValueError, match="SDFLEET_AUTHH.*did you mean SDFLEET_AUTH"):
        Settings()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDFLEET_DATBASE_URL": "sqlite:///x.db"}
    env.pop("SDFLEET_AUTHH", None)
    r = subprocess.run([sys.executable, "-m", "sdfleet", "api", "--port", str(free_port())], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "SDFLEET_DATBASE_URL" in r.stderr and "SDFLEET_DATABASE_URL" in r.stderr


def test_the_cli_sends_sdfleet_api_key(tmp_path, redis_url):
    url = f"sqlite:///{tmp_path / 'keyed.db'}"
    migrate(engine_for(url))
    model = f"cli-{uuid.uuid4().hex[:6]}"
    with session_factory(url).begin() as s:
        fleet.beat(s, WorkerState(name="h:1", host="h", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=8 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 * GB, available_bytes=12 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())
        key = keys.create_key(s, "cli")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDFLEET_DATABASE_URL": url, "SDFLEET_REDIS_URL": redis_url,
           "SDFLEET_DEFAULT_MODEL": model, "SDFLEET_WORKER_STALE_S": "3600"}
    api = subprocess.Popen([sys.executable, "-m", "sdfleet", "api", "--port", str(port)], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli = [sys.executable, "-m", "sdfleet", "submit", "a cat", "--width", "64", "--height", "64",
               "--api", f"http://127.0.0.1:{port}"]
        deadline = time.monotonic() + 60
        while (r := subprocess.run(cli, env=env, cwd=ROOT, capture_output=True, text=True)).returncode != 2 \
                or "HTTP 401" not in r.stderr:
            assert time.monotonic() < deadline and api.poll() is None, r.stderr
            time.sleep(0.3)
        r = subprocess.run(cli, env={**env, "SDFLEET_API_KEY": key.token}, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert '"status": "queued"' in r.stdout
    finally:
        api.terminate()
        api.wait(20)


# --- races and truthful states -------------------------------------------------------------------------

def test_cancel_of_a_job_that_just_finished_is_409_not_202(db):
    with db.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
        attempt = jobstore.start_attempt(s, job.id, job.delivery_id, "h", "h:1", 2)
    canceller = db()
    assert jobstore.get_job(canceller, job.id).status == "running"  # the API has read it running...
    with db.begin() as s:  # ...the worker finishes it...
        assert jobstore.finish_succeeded(s, attempt, [], 0.1, jobstore.MemoryReading(1, 1, 0, 1, "vmhwm"))
    with pytest.raises(Conflict, match="succeeded"):  # ...and the cancel's write finds it finished
        jobstore.cancel(canceller, job.id, None)
    canceller.rollback()
    canceller.close()
    with db() as s:
        row = s.get(Job, job.id)
        assert row.status == "succeeded" and row.cancel_requested_at is None


def test_two_workers_recording_a_new_shape_at_once_both_count(db):
    model = f"race-{uuid.uuid4().hex[:6]}"
    barrier = threading.Barrier(2)
    errors = []

    def finish(peak):
        try:
            with db.begin() as s:
                barrier.wait(10)
                fleet.record_profile(s, model, "optimum", "bf16", "fast", Shape(512, 512, True), peak, GB, 1.5)
        except Exception as exc:  # noqa: BLE001  (collected and asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(p,)) for p in (3 * GB, 4 * GB)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    with db() as s:
        (row,) = s.scalars(select(MemoryProfile).where(MemoryProfile.model == model))
    assert row.samples == 2 and row.peak_bytes == 4 * GB and row.max_step_s == 1.5


def test_a_job_taken_back_past_its_timeout_ends_timeout_and_keeps_its_history(db):
    with db.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
        jobstore.start_attempt(s, job.id, job.delivery_id, "host-a", "host-a:1", 3)
    with db.begin() as s:  # lost once, in time: queued again, its attempt in the history
        row = s.get(Job, job.id)
        assert jobstore.take_back(s, row, "the worker was lost", 3, 600).outcome is TakeBackOutcome.queued
    with db.begin() as s:
        row = s.get(Job, job.id)
        assert row.status == "queued" and row.attempts == 1 and len(row.history) == 1
        jobstore.start_attempt(s, job.id, row.delivery_id, "host-b", "host-b:1", 3)
    with db.begin() as s:  # lost again after running past the timeout (a hard time limit kill)
        row = s.get(Job, job.id)
        row.started_at = utcnow() - timedelta(seconds=700)
    with db.begin() as s:
        taken = jobstore.take_back(s, s.get(Job, job.id), "the worker was lost", 3, 600)
        assert taken.outcome is TakeBackOutcome.ended
    with db() as s:
        record = jobstore.to_public(s.get(Job, job.id))
    assert record.status is JobStatus.failed and record.error.code == "timeout"
    assert [h.worker_host for h in record.history] == ["host-a"]


def test_the_hard_time_limit_leaves_room_for_the_slowest_step():
    assert hard_time_limit(3600, None) == 3900
    assert hard_time_limit(3600, 70.0) == 3900  # one f32 SDXL step with guidance
    assert hard_time_limit(3600, 250.0) == 3600 + 750


def test_processes_migrating_a_fresh_sqlite_file_at_once_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = f"from shared.db import engine_for, migrate; migrate(engine_for({url!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE) for _ in range(4)]
    results = [(p.wait(60), p.stderr.read().decode()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    assert schema_revision(engine_for(url)) is not None


# --- retention ---------------------------------------------------------------------------------------------

def test_retention_deletes_old_jobs_leaves_a_tombstone_and_keeps_the_rest(fresh_url, redis_url):
    db, database_url = session_factory(fresh_url), fresh_url
    def finished_job(days_ago: float, png_bytes: int) -> str:
        with db.begin() as s:
            job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
            attempt = jobstore.start_attempt(s, job.id, job.delivery_id, "h", "h:1", 2)
            jobstore.finish_succeeded(s, attempt, [jobstore.GeneratedImage(0, 1, 64, 64, b"\x89PNG" + b"x" * png_bytes)],
                                   0.1, jobstore.MemoryReading(1, 1, 0, 1, "vmhwm"))
        with db.begin() as s:
            s.get(Job, job.id).finished_at = utcnow() - timedelta(days=days_ago)
        return job.id

    old, young = finished_job(40, 1000), finished_job(1, 1000)
    with db.begin() as s:
        queued = jobstore.create_job(s, jobstore.NewJob(PARAMS)).id
    settings = Settings(database_url=database_url, redis_url=redis_url, retention_days=30)
    deleted = enforce_retention(db, settings)
    assert old in deleted and young not in deleted and queued not in deleted
    with make_api(database_url, redis_url) as client:
        error = assert_error_shape(client.get(f"/v1/jobs/{old}"), 410, "gone")
        assert "retention" in error["message"] and error["details"]["status"] == "succeeded"
        assert_error_shape(client.get(f"/v1/jobs/{old}/images/0.png"), 410, "gone")
        assert client.get(f"/v1/jobs/{young}").status_code == 200
        assert client.get(f"/v1/jobs/{queued}").status_code == 200
    # a byte cap: the oldest finished go first until the stored PNGs fit
    settings = Settings(database_url=database_url, redis_url=redis_url, retention_max_image_bytes=1)
    assert young in enforce_retention(db, settings)
    with db() as s:
        assert s.get(Job, queued) is not None


def test_one_reconciler_pass_per_interval_in_the_whole_fleet(db, database_url, redis_url):
    """Every ops worker runs the reconciler thread; a Redis key that expires after the interval lets one of
    them pass per interval (it replaces one Celery beat per ops worker, which sent duplicates)."""
    import redis as redis_lib

    from shared.queue import RECONCILE_LOCK_KEY, make_celery
    from ops.app import periodic_pass

    settings = Settings(database_url=database_url, redis_url=redis_url, reconcile_interval_s=1.5)
    broker = redis_lib.Redis.from_url(redis_url)
    broker.delete(RECONCILE_LOCK_KEY)
    celery = make_celery(settings)
    assert periodic_pass(broker, "ops-a", db, celery, settings)
    assert not periodic_pass(broker, "ops-b", db, celery, settings)  # the same interval: the other one waits
    time.sleep(1.6)
    assert periodic_pass(broker, "ops-b", db, celery, settings)
