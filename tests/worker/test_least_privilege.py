"""A real worker with the least privilege a host that belongs to someone else gets: authenticated to Redis as its
model's ACL user (`sdfleet redis-acl`), on a redis-server of the test's own whose default user has a password,
and, with SDFLEET_TEST_POSTGRES_URL set, connected to PostgreSQL as a login role in the worker's group role
(`sdfleet db worker-role`); without it, to SQLite (the Redis side alone is then under test). The API and the
ops worker keep the server's credentials (Redis's default user, the database's owner).

The worker starts, runs a job end to end (two images, a webhook through the ops worker), follows remote-control
changes of its queues, runs again a job whose pool child was killed, and, stopped, hands its running job back
with its checkpoint; and Redis refused it nothing (ACL LOG) but redis-py's CLIENT SETINFO, which redis-py sends
on every connection and ignores when refused. The refusals themselves: tests/shared/test_privilege.py."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from sdfleet.client import Client
from sdfleet.stack import start_bundled_redis, stop
from shared.db import engine_for, migrate, session_factory
from shared.memory import GB
from shared.models import Job, JobCheckpoint, Worker
from shared.privilege import worker_acl, worker_role_sql
from shared.queue import classes_within, make_celery, message_ids_in_broker, queue_name, unacked_keys
from shared.settings import Settings
from tests.conftest import (
    POSTGRES_URL, ROOT, free_port, kill_tree, pool_child, postgres_database, stack_env, start_api, start_worker,
    wait_worker_ready,
)
from worker.owner import Consumers

BUDGET = 4 * GB  # fixed, and never paused: the worker changes its queues only when the test says so
WORKER_USER = "sdfleet-worker-host21"


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list

    def do_POST(self):
        self.received.append((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _databases(tmp_path: Path):
    """(the owner's URL, the worker's URL, the worker's login role or None)."""
    if not POSTGRES_URL:
        url = f"sqlite:///{tmp_path / 'sdfleet.db'}"
        migrate(engine_for(url))
        yield url, url, None
        return
    tag = uuid.uuid4().hex[:10]
    group, login = f"sdfleet_worker_{tag}", f"sdfleet_host21_{tag}"
    try:
        with contextlib.contextmanager(postgres_database)() as owner:
            migrate(engine_for(owner))
            with psycopg.connect(make_url(owner).set(drivername="postgresql").render_as_string(False),
                                 autocommit=True) as conn:
                conn.execute(worker_role_sql(group))
                conn.execute(f"CREATE ROLE {login} LOGIN IN ROLE {group}")
            yield owner, make_url(owner).set(username=login).render_as_string(False), login
    finally:
        admin = create_engine(make_url(POSTGRES_URL).set(drivername="postgresql+psycopg"),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            for role in (login, group):
                conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


@contextlib.contextmanager
def _processes():
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        kill_tree(procs)  # before the database is dropped


def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def test_a_worker_under_its_acl_user_and_database_role_runs_jobs(tiny_model, tmp_path):
    model = f"tiny-priv-{uuid.uuid4().hex[:6]}"
    port = free_port()
    redis_proc = start_bundled_redis(port)
    hook_server = None
    try:
        redis.Redis(port=port).config_set("requirepass", "server-secret")
        admin = redis.Redis(port=port, password="server-secret")
        admin.execute_command(*worker_acl(model, WORKER_USER, "host21-secret").split())
        server_redis = f"redis://:server-secret@127.0.0.1:{port}/0"
        worker_redis = f"redis://{WORKER_USER}:host21-secret@127.0.0.1:{port}/0"
        handler = type("Hook", (_Hook,), {"received": []})
        hook_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=hook_server.serve_forever, daemon=True).start()
        with _databases(tmp_path) as (owner_db, worker_db, login), _processes() as procs:
            env = stack_env(owner_db, server_redis, SDFLEET_MODEL=str(tiny_model), SDFLEET_MODEL_NAME=model,
                            SDFLEET_DEFAULT_MODEL=model, SDFLEET_MEMORY_BUDGET=str(BUDGET),
                            SDFLEET_BUDGET_FOLLOWS_AVAILABLE="false", SDFLEET_PAUSE_AVAILABLE_BYTES="0")
            procs.append(subprocess.Popen([sys.executable, "-m", "sdfleet", "ops"], cwd=ROOT, env=env,
                                          stdout=open(tmp_path / "ops.log", "ab"), stderr=subprocess.STDOUT))
            api, url = start_api(env, tmp_path / "api.log")
            procs.append(api)
            worker_log = tmp_path / "worker.log"
            worker = start_worker({**env, "SDFLEET_REDIS_URL": worker_redis, "SDFLEET_DATABASE_URL": worker_db},
                                  worker_log)
            procs.append(worker)
            wait_worker_ready(worker, worker_log, owner_db, model)
            client = Client(url, timeout=30)
            owner = session_factory(owner_db)

            # a job end to end: two images, its webhook handed to the ops worker and delivered
            hook = f"http://127.0.0.1:{hook_server.server_port}/hook"
            job = client.submit(prompt="a lighthouse", width=64, height=64, steps=2, num_images=2, webhook_url=hook)
            done = client.wait(job["id"], timeout=120)
            assert done["status"] == "succeeded", done
            assert all(client.image(job["id"], i).startswith(b"\x89PNG") for i in range(2))
            headers, body = _until(lambda: handler.received and handler.received[0], 60, "the webhook")
            assert headers["X-Sdfleet-Job"] == job["id"] and json.loads(body)["status"] == "succeeded"
            if login:  # the claim and the heartbeat carry the worker's login role
                with owner() as s:
                    assert s.get(Job, job["id"]).status_by == login
                    assert {w.db_role for w in s.query(Worker).filter(Worker.model == model)} == {login}

            # remote control, sent as the worker's Redis user (what its pool child sends when its owner takes
            # the host back, or gives it back): its queues are cancelled, a job waits, they come back, it runs
            ops_side = make_celery(Settings(redis_url=server_redis, database_url=owner_db))
            consumers = Consumers(make_celery(Settings(redis_url=worker_redis, database_url=owner_db)), model,
                                  BUDGET, worker.pid)
            expected = {queue_name(model, c) for c in classes_within(BUDGET)}

            def consumed() -> set[str] | None:
                answer = ops_side.control.inspect(destination=[consumers.node], timeout=2).active_queues() or {}
                return {q["name"] for q in answer[consumers.node]} if consumers.node in answer else None

            assert _until(consumed, 30, "the worker answers inspect") == expected
            # the container's health check (docker-compose.yml), run with the worker's own environment
            ping = subprocess.run([sys.executable, "-m", "celery", "-A", "ops.app:app", "inspect", "ping", "-d",
                                   consumers.node, "--timeout", "10"], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120, env={**env, "SDFLEET_REDIS_URL": worker_redis,
                                                    "SDFLEET_DATABASE_URL": worker_db})
            assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
            consumers.follow(BUDGET, paused=True)
            _until(lambda: consumed() == set(), 30, "its queues cancelled")
            waiting = client.submit(prompt="waits for its queue", width=64, height=64, steps=1)
            time.sleep(3)
            assert client.job(waiting["id"])["status"] == "queued"
            consumers.follow(BUDGET, paused=False)
            _until(lambda: consumed() == expected, 30, "its queues back")
            assert client.wait(waiting["id"], timeout=120)["status"] == "succeeded"

            # its pool child killed mid-job: Celery puts the message back (through the model's unacked keys), the
            # new child takes the job back (as the same login role) and runs it again
            killed = client.submit(prompt="killed once", width=256, height=256, steps=120)
            _until(lambda: (client.job(killed["id"]).get("progress") or {}).get("step", 0) >= 2, 120, "running")
            os.kill(pool_child(worker), signal.SIGKILL)
            again = client.wait(killed["id"], timeout=180)
            assert again["status"] == "succeeded" and again["attempts"] == 2, again
            assert again["history"][0]["error"]["code"] == "worker_lost"

            # stopped mid-job: the job goes back to its queue with its checkpoint, not counted as an attempt
            long = client.submit(prompt="a long one", width=512, height=512, steps=150)
            _until(lambda: (client.job(long["id"]).get("progress") or {}).get("step", 0) >= 2, 120, "running")
            # its preview, written under the worker's role with its progress
            _until(lambda: client.job(long["id"]).get("preview"), 60, "a preview")
            assert client.preview(long["id"]).startswith(b"\xff\xd8")  # a JPEG
            with owner() as s:
                running = s.get(Job, long["id"]).delivery_id
            # delivered, not acknowledged yet (late ack): kept in the model's own keys, where the reconciler looks
            assert admin.hlen(unacked_keys(model)["unacked_key"]) == 1 and not admin.exists("unacked")
            assert running in message_ids_in_broker(admin, [model])
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(120) == 0
            back = client.job(long["id"])
            assert back["status"] == "queued" and back["history"][-1]["error"]["code"] == "worker_left", back
            with owner() as s:
                delivery = s.get(Job, long["id"]).delivery_id
                assert s.get(JobCheckpoint, long["id"]).step >= 2
            assert delivery in message_ids_in_broker(admin, [model])  # its message, sent by the worker, waits

            # Redis refused the worker nothing it needed
            refused = {(e["reason"], e["object"]) for e in admin.acl_log(128) if e["username"] == WORKER_USER}
            assert refused <= {("command", "client")}, refused
            log = worker_log.read_text(errors="replace")
            for sign in ("NOPERM", "NoPermissionError", "permission denied", "InsufficientPrivilege",
                         "row-level security"):
                assert sign not in log, log[-3000:]
            engine_for.cache_clear()
    finally:
        if hook_server:
            hook_server.shutdown()
        stop([redis_proc])
