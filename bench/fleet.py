"""A fleet of N workers on one PostgreSQL and one Redis, on this machine, with hosts leaving (SIGTERM: a
polite stop; SIGKILL of the whole host: a power cut) and joining at random while thousands of jobs of mixed
shapes run. The workers are real (`sdfleet worker`: Celery, heartbeats, routing, checkpoints, the real task
code); their pipeline is the BENCH stand-in (bench/standin.py: a set time per step, a set amount of memory
per pixel), so that a hundred fit in 24 GiB. The API (`sdfleet api`) and one ops worker (reconciler) run
beside them.

Reported per N: jobs lost (submitted and never ended), duplicated (more images than asked, or an attempt that
ran beside another: "superseded"), routed to a host too small (its memory class above the budget of the worker
that ran it), PostgreSQL connections (median and peak), database writes/s (heartbeats: rows of `workers`
updated; all: transactions committed), Redis commands/s, the API's submit p50/p99 and GET /v1/workers
p50/p99 under load, the reconciler's pass time, the overhead per job (a worker's idle gap between finishing a
job and starting the next while jobs were queued), and the workers' memory (PSS of main + pool child).

Usage (PostgreSQL's admin URL: a database is created and dropped per run):
    .venv/bin/python bench/fleet.py --postgres postgresql://postgres@127.0.0.1:5432/test --workers 10 50 100
        [--pgbouncer] [--jobs-per-worker 20] [--step-s 0.25] [--churn-s 3] [--min-available-gb 1.5]
Prints one JSON line per N and a Markdown table at the end. Traffic stays on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil
import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdfleet.stack import free_port, spawn, start_bundled_redis, stop  # noqa: E402
from shared.db import migrate  # noqa: E402

GiB = 1 << 30
BUDGETS_GB = (4, 8, 16)  # the hosts: a third each
SHAPES = [  # (width, height, guidance, steps, images): mixed, most of them small
    (512, 512, 1.0, 4, 1), (512, 512, 7.5, 8, 1), (512, 512, 7.5, 4, 2), (768, 512, 7.5, 6, 1),
    (768, 768, 1.0, 4, 1), (1024, 1024, 1.0, 2, 1), (1024, 1024, 7.5, 4, 1), (512, 512, 1.0, 2, 4),
]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Fleet:
    def __init__(self, n: int, args, work: Path, db_url: str, worker_db_url: str, redis_url: str):
        self.n, self.args, self.work = n, args, work
        self.db_url, self.worker_db_url, self.redis_url = db_url, worker_db_url, redis_url
        self.model = "bench"
        self.workers: dict[int, subprocess.Popen] = {}
        self.started = 0
        self.events: list[tuple[float, str]] = []
        self.env = {**os.environ, "SDFLEET_DATABASE_URL": worker_db_url, "SDFLEET_REDIS_URL": redis_url,
                    "SDFLEET_MODEL": str(Path.home() / ".cache/sdfleet/models/tiny-sd"),
                    "SDFLEET_MODEL_NAME": self.model, "SDFLEET_BACKEND": "bench.standin:factory",
                    "SDFLEET_BENCH_STEP_S": str(args.step_s), "SDFLEET_PAUSE_CPU_PERCENT": "100",
                    "SDFLEET_PAUSE_AVAILABLE_BYTES": "0", "SDFLEET_BUDGET_FOLLOWS_AVAILABLE": "false",
                    "SDFLEET_CPU_PRIORITY": "normal", "PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "2",
                    "SDFLEET_AUTH": "off", "HF_HUB_OFFLINE": "1"}

    def start_worker(self) -> None:
        i = self.started
        self.started += 1
        env = {**self.env, "SDFLEET_MEMORY_BUDGET": str(BUDGETS_GB[i % len(BUDGETS_GB)] * GiB)}
        proc = subprocess.Popen([sys.executable, "-m", "sdfleet", "worker"], cwd=ROOT, env=env,
                                stdout=open(self.work / f"worker-{i}.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.workers[i] = proc

    def leave(self, rng: random.Random) -> str:
        live = [i for i, p in self.workers.items() if p.poll() is None]
        if not live:
            return "none"
        i = rng.choice(live)
        proc = self.workers.pop(i)
        if rng.random() < 0.5:
            proc.send_signal(signal.SIGTERM)  # a polite stop: the running job is handed back
            threading.Thread(target=proc.wait, daemon=True).start()
            return "sigterm"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole host gone at once
        proc.wait()
        return "sigkill"


def _pss(pid: int) -> int:
    total = 0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration, psutil.NoSuchProcess):
            pass
    return total


def run(n: int, args) -> dict:
    rng = random.Random(n)
    work = Path(tempfile.mkdtemp(prefix=f"fleet-{n}-"))
    db = f"sdfleet_fleet_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {db}"))
    base = args.postgres.rsplit("/", 1)[0]
    db_url = f"{base}/{db}"
    migrate(create_engine(db_url))
    procs: list[subprocess.Popen] = []
    redis_port = free_port()
    procs.append(start_bundled_redis(redis_port))
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    worker_db_url = db_url
    if args.pgbouncer:
        port = free_port()
        ini = work / "pgbouncer.ini"
        host = base.split("@", 1)[1]
        ini.write_text(f"[databases]\n{db} = host={host.split(':')[0]} port={host.split(':')[1]} dbname={db}\n"
                       f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n"
                       f"auth_file = {work / 'users.txt'}\npool_mode = transaction\nmax_client_conn = 5000\n"
                       f"default_pool_size = {args.pgbouncer_pool}\nunix_socket_dir =\n"
                       f"logfile = {work / 'pgbouncer.log'}\n")
        (work / "users.txt").write_text('"postgres" ""\n')
        as_user = []
        if os.geteuid() == 0:  # PgBouncer refuses to run as root: as postgres, reading and writing `work`
            as_user = ["-u", "postgres"]
            work.chmod(0o777)
        procs.append(subprocess.Popen([shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", *as_user, str(ini)],
                                      stdout=open(work / "pgbouncer.out", "ab"), stderr=subprocess.STDOUT))
        time.sleep(1)
        worker_db_url = f"postgresql://postgres@127.0.0.1:{port}/{db}"
    fleet = Fleet(n, args, work, db_url, worker_db_url, redis_url)
    api_port = free_port()
    procs.append(spawn(["api", "--port", str(api_port)], fleet.env,
                       str(work / "api.log")))
    procs.append(spawn(["ops"], {**fleet.env, "SDFLEET_DATABASE_URL": worker_db_url},
                       str(work / "ops.log")))
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60)
    samples = {"pg": [], "workers_s": [], "available": [], "pss": []}
    stop_monitor = threading.Event()
    stats = create_engine(args.postgres)
    broker = redis.Redis.from_url(redis_url)
    result: dict = {"workers": n, "pgbouncer": args.pgbouncer}
    try:
        t_start = time.monotonic()
        for _ in range(n):
            fleet.start_worker()
        deadline = time.monotonic() + args.start_timeout_s
        while True:
            try:
                alive = [w for w in api.get("/v1/workers").json() if w["alive"] and w["state"] == "ready"]
            except (httpx.HTTPError, ValueError):
                alive = []
            if len(alive) >= n:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(alive)} of {n} workers ready after {args.start_timeout_s} s ({work})")
            time.sleep(1)
        result["start_s"] = round(time.monotonic() - t_start, 1)

        def counters() -> dict:
            with stats.connect() as conn:
                row = conn.execute(text("SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM "
                                        "pg_stat_database WHERE datname = :d"), {"d": db}).one()
            with create_engine(db_url).connect() as conn:
                hb = conn.execute(text("SELECT n_tup_upd + n_tup_ins FROM pg_stat_user_tables "
                                       "WHERE relname = 'workers'")).scalar()
            return {"commits": row[0], "rows": row[1], "hb_rows": hb,
                    "redis": int(broker.info("stats")["total_commands_processed"]), "t": time.monotonic()}

        def monitor() -> None:
            while not stop_monitor.wait(1.0):
                try:
                    with stats.connect() as conn:
                        samples["pg"].append(conn.execute(text(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": db}).scalar())
                    t0 = time.perf_counter()
                    api.get("/v1/workers").raise_for_status()
                    samples["workers_s"].append(time.perf_counter() - t0)
                    available = psutil.virtual_memory().available
                    samples["available"].append(available)
                    if available < args.min_available_gb * GiB:
                        print(f"available memory {available / GiB:.1f} GiB: stopping the run", file=sys.stderr)
                        fleet.events.append((time.monotonic(), "memory-abort"))
                        os.kill(os.getpid(), signal.SIGINT)
                        return
                except Exception as exc:  # noqa: BLE001 - a bench monitor keeps going
                    fleet.events.append((time.monotonic(), f"monitor: {type(exc).__name__}"))

        threading.Thread(target=monitor, daemon=True).start()
        before = counters()
        # PSS of a few workers at rest (all loaded), before the load
        samples["pss"] = [_pss(p.pid) for p in list(fleet.workers.values())[:10] if p.poll() is None]

        # submit: all jobs, from 8 clients at once
        total = max(args.min_jobs, n * args.jobs_per_worker)
        submitted, submit_s, refused = [], [], []
        lock = threading.Lock()

        def client(k: int) -> None:
            c = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=60)
            for j in range(k, total, 8):
                w, h, g, steps, images = SHAPES[j % len(SHAPES)]
                body = {"prompt": f"job {j}", "model": fleet.model, "width": w, "height": h, "guidance_scale": g,
                        "steps": steps, "num_images": images, "seed": j}
                t0 = time.perf_counter()
                r = c.post("/v1/jobs", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    submit_s.append(dt)
                    (submitted if r.status_code == 202 else refused).append(
                        r.json()["id"] if r.status_code == 202 else (r.status_code, r.text[:200]))

        clients = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        t_load = time.monotonic()
        for t in clients:
            t.start()

        # churn: a host leaves every churn_s, and a new one joins a few seconds later
        churn_stop = threading.Event()
        churn = {"sigterm": 0, "sigkill": 0, "joined": 0}

        def churner() -> None:
            while not churn_stop.wait(args.churn_s):
                kind = fleet.leave(rng)
                churn[kind] = churn.get(kind, 0) + 1
                fleet.events.append((time.monotonic(), kind))
                if churn_stop.wait(rng.uniform(1, 4)):
                    break
                fleet.start_worker()
                churn["joined"] += 1

        churner_thread = threading.Thread(target=churner, daemon=True)
        churner_thread.start()
        for t in clients:
            t.join()
        result["submitted"], result["refused"] = len(submitted), len(refused)
        if refused:
            result["refused_examples"] = refused[:3]
        # churn while most of the jobs run, then let the fleet finish
        engine = create_engine(db_url)

        def open_jobs() -> int:
            with engine.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')")).scalar()

        while open_jobs() > total * 0.2 and time.monotonic() - t_load < args.max_run_s:
            time.sleep(2)
        churn_stop.set()
        churner_thread.join()
        while open_jobs() and time.monotonic() - t_load < args.max_run_s + 180:
            time.sleep(2)
        after = counters()
        elapsed = after["t"] - before["t"]
        result["run_s"] = round(time.monotonic() - t_load, 1)
        result["churn"] = churn

        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT j.id, j.status, j.error_code, j.num_images, j.attempts, j.leaves, j.worker_name, "
                "j.memory_class_bytes, j.started_at, j.finished_at, j.created_at, "
                "(SELECT count(*) FROM job_images i WHERE i.job_id = j.id) AS images, j.resumes "
                "FROM jobs j")).mappings().all()
            budgets = dict(conn.execute(text("SELECT name, max_budget_bytes FROM workers")).all())
        by_id = {r["id"]: r for r in rows}
        statuses: dict[str, int] = {}
        for r in rows:
            key = r["status"] if r["status"] != "failed" else f"failed:{r['error_code']}"
            statuses[key] = statuses.get(key, 0) + 1
        result["statuses"] = statuses
        result["lost"] = sum(1 for j in submitted if j not in by_id or by_id[j]["status"] in ("queued", "running"))
        result["duplicated_images"] = sum(1 for r in rows if r["images"] > r["num_images"])
        result["missing_images"] = sum(1 for r in rows if r["status"] == "succeeded" and r["images"] != r["num_images"])
        result["too_small"] = sum(1 for r in rows if r["status"] == "succeeded" and r["worker_name"] in budgets
                                  and (r["memory_class_bytes"] or 0) > (budgets[r["worker_name"]] or 0))
        result["resumed"] = sum(1 for r in rows for x in (r["resumes"] or []) if x.get("resumed"))
        superseded = 0
        for log in work.glob("worker-*.log"):
            superseded += log.read_text(errors="replace").count(" superseded")
        result["superseded_attempts"] = superseded
        # overhead per job: a worker's gap from one job's end to its next start, while jobs were waiting
        gaps = []
        per_worker: dict[str, list] = {}
        for r in rows:
            if r["started_at"] and r["finished_at"] and r["status"] == "succeeded":
                per_worker.setdefault(r["worker_name"], []).append(r)
        for jobs in per_worker.values():
            jobs.sort(key=lambda r: r["started_at"])
            for a, b in zip(jobs, jobs[1:]):
                if b["created_at"] < a["finished_at"]:
                    gaps.append((b["started_at"] - a["finished_at"]).total_seconds())
        result["idle_gap_s"] = {"p50": pct(gaps, 0.5), "p90": pct(gaps, 0.9), "n": len(gaps)}
        result["pg_connections"] = {"median": pct(samples["pg"], 0.5), "peak": max(samples["pg"], default=None)}
        result["db_commits_per_s"] = round((after["commits"] - before["commits"]) / elapsed, 1)
        result["db_rows_written_per_s"] = round((after["rows"] - before["rows"]) / elapsed, 1)
        result["heartbeat_rows_per_s"] = round((after["hb_rows"] - before["hb_rows"]) / elapsed, 1)
        result["redis_commands_per_s"] = round((after["redis"] - before["redis"]) / elapsed, 1)
        result["submit_ms"] = {"p50": round(1000 * pct(submit_s, 0.5), 1), "p99": round(1000 * pct(submit_s, 0.99), 1)}
        result["workers_get_ms"] = {"p50": round(1000 * (pct(samples["workers_s"], 0.5) or 0), 1),
                                    "p99": round(1000 * (pct(samples["workers_s"], 0.99) or 0), 1)}
        passes = []
        for line in (work / "ops.log").read_text(errors="replace").splitlines():
            if "reconciler pass in" in line:
                passes.append(float(line.rsplit("in ", 1)[1].split()[0]))
        result["reconcile_pass_ms"] = {"p50": pct(passes, 0.5), "max": max(passes, default=None), "n": len(passes)}
        result["worker_pss_mb"] = round(statistics.median(samples["pss"]) / (1 << 20)) if samples["pss"] else None
        result["min_available_gb"] = round(min(samples["available"]) / GiB, 1) if samples["available"] else None
        result["log_dir"] = str(work)
        return result
    finally:
        stop_monitor.set()
        for proc in fleet.workers.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop(procs)
        stats.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"))
            conn.execute(text(f"DROP DATABASE IF EXISTS {db}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--postgres", required=True, help="an admin URL: a database is created and dropped per run")
    ap.add_argument("--workers", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--jobs-per-worker", type=int, default=20)
    ap.add_argument("--min-jobs", type=int, default=300)
    ap.add_argument("--step-s", type=float, default=0.25, help="the stand-in's seconds per step at 512x512")
    ap.add_argument("--churn-s", type=float, default=3.0, help="a host leaves every this many seconds")
    ap.add_argument("--pgbouncer", action="store_true", help="workers and ops reach PostgreSQL through PgBouncer")
    ap.add_argument("--pgbouncer-pool", type=int, default=20)
    ap.add_argument("--start-timeout-s", type=float, default=600)
    ap.add_argument("--max-run-s", type=float, default=900)
    ap.add_argument("--min-available-gb", type=float, default=1.5)
    args = ap.parse_args()
    results = []
    for n in args.workers:
        r = run(n, args)
        print(json.dumps(r, default=str), flush=True)
        results.append(r)
    print("\n| workers | PgBouncer | jobs | lost | duplicated | too small | resumed | PG connections (median / peak) "
          "| heartbeat rows/s | DB commits/s | Redis cmds/s | submit p50 / p99 (ms) | /v1/workers p50 / p99 (ms) "
          "| reconciler pass p50 / max (ms) | idle gap p50 / p90 (s) | worker PSS (MB) |")
    print("|" + "---|" * 16)
    for r in results:
        print(f"| {r['workers']} | {'yes' if r['pgbouncer'] else 'no'} | {r['submitted']} | {r['lost']} | "
              f"{r['duplicated_images'] + r['superseded_attempts']} | {r['too_small']} | {r['resumed']} | "
              f"{r['pg_connections']['median']} / {r['pg_connections']['peak']} | {r['heartbeat_rows_per_s']} | "
              f"{r['db_commits_per_s']} | {r['redis_commands_per_s']} | {r['submit_ms']['p50']} / "
              f"{r['submit_ms']['p99']} | {r['workers_get_ms']['p50']} / {r['workers_get_ms']['p99']} | "
              f"{r['reconcile_pass_ms']['p50']} / {r['reconcile_pass_ms']['max']} | {r['idle_gap_s']['p50']} / "
              f"{r['idle_gap_s']['p90']} | {r['worker_pss_mb']} |")


if __name__ == "__main__":
    main()
