"""The submit path under load: sdfleet's POST /v1/jobs against a naive FastAPI handler, side by side.

    .venv/bin/python bench/submit.py [--databases sqlite,postgresql] [--rounds 3] [--seconds 15]
        [--connections 32] [--threads 2] [--api-processes 1] [--pg-admin-url postgresql://postgres@127.0.0.1:5432/postgres]

For each database, rounds alternate the two servers on the same database and Redis, each loaded by wrk
(Debian's `wrk`; the load generator shares the machine's cores) for --seconds after a 2 s warm-up:
- **naive**: bench/naive_submit.py (pydantic validation + ORM insert + Celery send_task, sync handler);
- **sdfleet**: `sdfleet api`, with an API key (auth on), admission against a live worker's heartbeat,
  model defaults, the queue position in the answer. The worker's model is consumed by nobody, so the API,
  the database and Redis are what is measured.
Every answer must be a 202 (non-202 answers are counted and reported). The jobs table and Redis are emptied
between rounds. PostgreSQL: a database `sdfleet_bench_submit` is created on the server and dropped after.
Redis: a bundled redis-server on a free port (never yours). Medians over the rounds; sdfleet/naive per round,
then the median of the ratios. Rows are appended to bench/results/submit.jsonl; `--table` reprints them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import free_port  # noqa: E402
from sdfleet.stack import start_bundled_redis, stop  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "submit.jsonl"
MODEL = "bench-nobody"

# wrk: POST the job with the key; count the answers by status in each thread, report percentiles as JSON.
WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.body = '{"prompt": "a lighthouse on a cliff in a storm, oil painting", "model": "%(model)s"}'
wrk.headers["Content-Type"] = "application/json"
%(auth)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) accepted = 0; other = 0 end
function response(status, headers, body)
  if status == 202 then accepted = accepted + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, o = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("accepted"); o = o + t:get("other") end
  io.write(string.format('WRK {"requests": %%d, "duration_us": %%d, "accepted": %%d, "other": %%d, ' ..
    '"socket_errors": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\n',
    summary.requests, summary.duration, a, o,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def run_wrk(url: str, script: Path, seconds: float, connections: int, threads: int) -> dict:
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "10s",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("WRK "))
    r = json.loads(line[4:])
    secs = r["duration_us"] / 1e6
    return {"req_per_s": r["requests"] / secs, "accepted": r["accepted"], "other": r["other"],
            "socket_errors": r["socket_errors"], "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000, "requests": r["requests"]}


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/openapi.json", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not come up")
        time.sleep(0.2)


def prepare_database(url: str) -> str:
    """Migrate, beat a live worker for MODEL (nobody consumes its queue), and create a key: its token."""
    from shared import fleet, keys
    from shared.fleet_contract import WorkerState
    from shared.db import engine_for, migrate, session_factory
    from shared.memory import GB
    from shared.models import utcnow

    migrate(engine_for(url))
    with session_factory(url).begin() as s:
        fleet.beat(s, WorkerState(name="bench:1", host="bench", model=MODEL, backend="optimum", precision="f32",
                                  memory_mode="low", budget_bytes=16 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=24 * GB, available_bytes=20 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())
        return keys.create_key(s, f"bench-{time.time_ns()}").token


def empty(url: str, redis_url: str) -> int:
    """Delete the jobs (what a round left) and empty Redis; the number of jobs there were."""
    import redis
    from sqlalchemy import delete, func, select

    from shared.db import session_factory
    from shared.models import Job

    with session_factory(url).begin() as s:
        n = s.scalar(select(func.count()).select_from(Job))
        s.execute(delete(Job))
    redis.Redis.from_url(redis_url).flushdb()
    return n


def one_round(side: str, db_url: str, redis_url: str, token: str, args, workdir: Path) -> dict:
    port = free_port()
    env = {**os.environ, "SDFLEET_DATABASE_URL": db_url, "SDFLEET_REDIS_URL": redis_url,
           "SDFLEET_WORKER_STALE_S": "36000", "PYTHONPATH": str(ROOT)}
    if side == "naive":
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench.naive_submit:create_app", "--port", str(port),
               "--workers", str(args.api_processes), "--log-level", "warning", "--no-access-log"]
        auth = ""
    else:
        cmd = [sys.executable, "-m", "sdfleet", "api", "--port", str(port), "--workers", str(args.api_processes),
               "--quiet"]
        if args.sdfleet_root:  # another checkout's API (an earlier commit, say), on a database it migrated
            env["PYTHONPATH"] = str(args.sdfleet_root)
        auth = f'wrk.headers["Authorization"] = "Bearer {token}"'
    script = workdir / f"{side}.lua"
    script.write_text(WRK_SCRIPT % {"model": MODEL, "auth": auth})
    log = open(workdir / f"{side}.log", "ab")
    cwd = args.sdfleet_root if side == "sdfleet" and args.sdfleet_root else ROOT
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
        run_wrk(url + "/v1/jobs", script, 2, args.connections, args.threads)  # warm-up: connections, caches
        r = run_wrk(url + "/v1/jobs", script, args.seconds, args.connections, args.threads)
    finally:
        stop([proc])
        log.close()
    r["jobs_stored"] = empty(db_url, redis_url)
    return r


def postgres_database(admin_url: str, name: str, create: bool) -> str:
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if create:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


def summarize(rounds: list[dict]) -> dict:
    out = {"rounds": len(rounds)}
    for side in ("naive", "sdfleet"):
        rs = [r[side] for r in rounds]
        out[side] = {k: statistics.median(x[k] for x in rs) for k in ("req_per_s", "p50_ms", "p99_ms")}
        out[side]["non_202"] = sum(x["other"] + x["socket_errors"] for x in rs)
    out["ratio"] = statistics.median(r["sdfleet"]["req_per_s"] / r["naive"]["req_per_s"] for r in rounds)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| database | API processes | server | req/s (median) | p50 | p99 | non-202 | sdfleet / naive |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row["summary"]
        for side in ("naive", "sdfleet"):
            m = s[side]
            name = f"{side} ({row['sdfleet_commit']})" if side == "sdfleet" and row.get("sdfleet_commit") else side
            lines.append(f"| {row['database']} | {row['api_processes']} | {name} | {m['req_per_s']:.0f} | "
                         f"{m['p50_ms']:.1f} ms | {m['p99_ms']:.1f} ms | {m['non_202']} | "
                         + (f"{s['ratio']:.2f}x |" if side == "sdfleet" else "|"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--databases", default="sqlite,postgresql")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--api-processes", type=int, default=1)
    ap.add_argument("--pg-admin-url", default=os.environ.get("SDFLEET_BENCH_PG_ADMIN_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--sdfleet-root", type=Path, default=None,
                    help="run sdfleet's API from this checkout (e.g. a git worktree of an earlier commit); the "
                         "database is migrated by that checkout's code")
    ap.add_argument("--table", action="store_true", help="reprint the rows of bench/results/submit.jsonl")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip()]))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    RESULTS.parent.mkdir(exist_ok=True)
    redis_port = free_port()
    redis_proc = start_bundled_redis(redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="sdfleet-bench-submit-") as tmp:
            workdir = Path(tmp)
            for database in args.databases.split(","):
                if database == "sqlite":
                    db_url = f"sqlite:///{workdir}/bench.db"
                else:
                    db_url = postgres_database(args.pg_admin_url, "sdfleet_bench_submit", create=True)
                try:
                    if args.sdfleet_root:  # that checkout's migrations, key and heartbeat
                        token = subprocess.run(
                            [sys.executable, "-c", "import sys; from bench.submit import prepare_database; "
                             "print(prepare_database(sys.argv[1]))", db_url], cwd=args.sdfleet_root, check=True,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(args.sdfleet_root)}
                        ).stdout.strip().splitlines()[-1]
                    else:
                        token = prepare_database(db_url)
                    rounds = []
                    for i in range(args.rounds):
                        rnd = {}
                        for side in ("naive", "sdfleet") if i % 2 == 0 else ("sdfleet", "naive"):
                            rnd[side] = one_round(side, db_url, redis_url, token, args, workdir)
                            print(f"{database} round {i + 1} {side}: {json.dumps(rnd[side])}", flush=True)
                        rounds.append(rnd)
                finally:
                    if database == "postgresql":
                        from shared.db import engine_for
                        engine_for(db_url).dispose()
                        postgres_database(args.pg_admin_url, "sdfleet_bench_submit", create=False)
                row = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                       f"{os.cpu_count()} cores, Python {platform.python_version()}", "database": database,
                       "api_processes": args.api_processes, "connections": args.connections,
                       "threads": args.threads, "seconds": args.seconds, "rounds": rounds,
                       "summary": summarize(rounds)}
                if args.sdfleet_root:
                    row["sdfleet_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                           cwd=args.sdfleet_root, capture_output=True,
                                                           text=True).stdout.strip()
                rows.append(row)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        stop([redis_proc])
    print(table(rows))


if __name__ == "__main__":
    main()
