"""What the service costs on top of the pipeline, side by side in one run.

1. The same N jobs on the tiny model: a bare loop over the pipeline in one fresh process, loaded as the
   worker loads it (the same settings from the same environment: compile cache, memory mode, levers;
   get_pipeline, then generate + drop_weight_pages per job), then through API + Redis + worker + SQLite (real
   processes). Throughput ratio and per-job overhead, split into the worker's generation (the pipeline,
   the PNG, the start-of-job heartbeat), what the worker does around it, and the gap between two jobs.
2. The API's submission throughput with concurrent clients (jobs/s, p50/p99 latency), with 1 and 2 API
   processes; the jobs are admitted against a live worker's heartbeat and queued for a model nobody serves,
   so only the API, SQLite and Redis are measured.

Usage: .venv/bin/python bench/overhead.py [--jobs 40] [--size 256] [--steps 8] [--rounds 3] [--seconds 10]
       [--clients 32]
Prints a JSON report and a Markdown table (medians over the rounds). Redis: a bundled redis-server on a free
port (never yours); SQLite in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdfleet.client import Client  # noqa: E402
from sdfleet.stack import spawn, start_bundled_redis, stop  # noqa: E402
from shared.settings import default_cache_dir  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_loop(jobs: int, size: int, steps: int) -> dict:
    """The pipeline alone, loaded as the worker loads it: the same settings from the same environment (model,
    compile cache, memory mode and levers), get_pipeline's load + warm-up, then the same jobs back to back,
    each followed by drop_weight_pages() as in the worker (run in a fresh process)."""
    from shared.settings import Settings
    from worker.pipelines import ImageRequest, get_pipeline

    pipe = get_pipeline(Settings())
    times = []
    t0 = time.perf_counter()
    for i in range(jobs):
        t = time.perf_counter()
        pipe.generate(ImageRequest(f"a lighthouse {i}", None, size, size, steps, 7.5, i))
        pipe.drop_weight_pages()
        times.append(time.perf_counter() - t)
    return {"seconds": time.perf_counter() - t0, "precision": pipe.precision, "mode": pipe.memory_mode,
            "job_ms": statistics.median(times) * 1000}


def run_bare(env: dict, jobs: int, size: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--bare", str(jobs), str(size), str(steps)],
                         capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_side_by_side(model: str, jobs: int, size: int, steps: int, env: dict, workdir: Path, rounds: int) -> dict:
    """Alternate the bare loop (a fresh process each round) and the stack (kept up), `rounds` times."""
    from sqlalchemy import func, select

    from shared.db import session_factory
    from shared.models import Job

    port = free_port()
    procs = [spawn(["worker"], env, str(workdir / "worker.log")),
             spawn(["api", "--port", str(port), "--quiet"], env, str(workdir / "api.log"))]
    sessions = session_factory(env["SDFLEET_DATABASE_URL"])
    out = {"bare_s": [], "stack_s": [], "worker_s": [], "in_worker_ms": [], "gap_ms": [], "precision": None,
           "bare_job_ms": [], "stack_generation_ms": []}
    try:
        client = Client(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while not (client.healthy() and any(w["alive"] for w in client.workers())):
            assert time.monotonic() < deadline, "stack did not come up"
            time.sleep(0.2)
        client.wait(client.submit(prompt="warm up", width=64, height=64, steps=1)["id"])
        for _ in range(rounds):
            bare = run_bare(env, jobs, size, steps)
            out["bare_s"].append(bare["seconds"])
            out["bare_job_ms"].append(bare["job_ms"])
            out["precision"], out["mode"] = bare["precision"], bare["mode"]
            ids = [client.submit(prompt=f"a lighthouse {i}", width=size, height=size, steps=steps,
                                 guidance_scale=7.5, seed=i)["id"] for i in range(jobs)]
            # jobs run in order: wait for the last one, polling slowly (a client polling each job at 20 Hz
            # would put the API and the database on the worker's two cores), then check them all
            client.wait(ids[-1], timeout=600, poll_s=0.5)
            assert all(client.job(job_id)["status"] == "succeeded" for job_id in ids)
            with sessions() as s:
                first, started, last = s.execute(select(func.min(Job.created_at), func.min(Job.started_at),
                                                        func.max(Job.finished_at)).where(Job.id.in_(ids))).one()
                rows = s.execute(select(Job.started_at, Job.finished_at, Job.generation_s)
                                 .where(Job.id.in_(ids)).order_by(Job.started_at)).all()
            out["stack_s"].append((last - first).total_seconds())
            out["worker_s"].append((last - started).total_seconds())
            out["in_worker_ms"] += [((f - s_).total_seconds() - g) * 1000 for s_, f, g in rows]
            out["stack_generation_ms"] += [g * 1000 for _, _, g in rows]
            out["gap_ms"] += [(b[0] - a[1]).total_seconds() * 1000 for a, b in zip(rows, rows[1:])]
        return out
    finally:
        stop(procs)


async def _submit_load(url: str, model: str, seconds: float, clients: int) -> dict:
    import httpx

    latencies, errors = [], 0
    stop_at = time.perf_counter() + seconds
    body = {"prompt": "a lighthouse", "width": 512, "height": 512, "model": model}

    async def one_client():
        nonlocal errors
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                r = await http.post("/v1/jobs", json=body)
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != 202

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"jobs_per_s": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000, "requests": len(latencies), "errors": errors}


def run_submissions(env: dict, workdir: Path, seconds: float, clients: int, api_processes: int) -> dict:
    from shared import fleet
    from shared.fleet_contract import WorkerState
    from shared.db import engine_for, migrate, session_factory
    from shared.memory import GB
    from shared.models import utcnow

    url = env["SDFLEET_DATABASE_URL"]
    migrate(engine_for(url))
    model = "bench-nobody"
    with session_factory(url).begin() as s:  # a live worker's heartbeat for admission; nobody consumes
        fleet.beat(s, WorkerState(name="bench:1", host="bench", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=16 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=24 * GB, available_bytes=20 * GB, resident_bytes=GB,
                                  current_job_id=None), utcnow())
    port = free_port()
    api = spawn(["api", "--port", str(port), "--workers", str(api_processes), "--quiet"],
                {**env, "SDFLEET_WORKER_STALE_S": "3600"}, str(workdir / f"api-{api_processes}.log"))
    try:
        client = Client(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not client.healthy():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        return asyncio.run(_submit_load(f"http://127.0.0.1:{port}", model, seconds, clients))
    finally:
        stop([api])


def main() -> None:
    if sys.argv[1:2] == ["--bare"]:
        _, jobs, size, steps = sys.argv[1:]
        print(json.dumps(bare_loop(int(jobs), int(size), int(steps))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="bare loop and stack alternated; medians reported")
    ap.add_argument("--priority", choices=("idle", "low", "normal"), default="idle",
                    help="the worker's SDFLEET_CPU_PRIORITY (the default, idle, yields the CPU to anything else)")
    ap.add_argument("--no-submit", action="store_true", help="skip the submissions part (bench/submit.py measures "
                    "the submit path with wrk)")
    args = ap.parse_args()

    model = default_cache_dir() / "models" / "tiny-sd"
    subprocess.run([sys.executable, "-m", "sdfleet", "model", "make-tiny", str(model)], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT)
    redis_port = free_port()
    redis_proc = start_bundled_redis(redis_port)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "jobs": args.jobs, "size": args.size, "steps": args.steps,
              "cpu_priority": args.priority}
    try:
        with tempfile.TemporaryDirectory(prefix="sdfleet-bench-") as tmp:
            tmp = Path(os.environ.get("SDFLEET_BENCH_KEEP") or tmp)
            tmp.mkdir(parents=True, exist_ok=True)
            env = {"SDFLEET_DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
                   "SDFLEET_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "SDFLEET_MODEL": str(model),
                   "SDFLEET_MODEL_NAME": "tiny-sd", "SDFLEET_DEFAULT_MODEL": "tiny-sd", "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": str(ROOT),
                   # the bench's own bare loop, API and client are not a desktop owner's programs: the worker
                   # must not pause for them (SDFLEET_PAUSE_CPU_PERCENT); its CPU priority is --priority
                   "SDFLEET_PAUSE_CPU_PERCENT": "100", "SDFLEET_CPU_PRIORITY": args.priority}
            r = run_side_by_side(str(model), args.jobs, args.size, args.steps, env, tmp, args.rounds)
            med = statistics.median
            report["precision"], report["mode"] = r["precision"], r["mode"]
            report["rounds"] = {k: r[k] for k in ("bare_s", "stack_s", "worker_s")}
            report["bare_jobs_per_s"] = args.jobs / med(r["bare_s"])
            report["stack_jobs_per_s"] = args.jobs / med(r["stack_s"])
            report["throughput_ratio"] = med(b / s_ for b, s_ in zip(r["bare_s"], r["stack_s"]))
            report["overhead_ms_per_job"] = med((s_ - b) / args.jobs * 1000 for b, s_ in zip(r["bare_s"], r["stack_s"]))
            # the worker alone, once jobs are queued (the API and the client no longer share the 2 cores)
            report["worker_jobs_per_s"] = args.jobs / med(r["worker_s"])
            report["worker_throughput_ratio"] = med(b / w for b, w in zip(r["bare_s"], r["worker_s"]))
            report["worker_overhead_ms_median"] = med(r["in_worker_ms"])
            report["between_jobs_ms_median"] = med(r["gap_ms"])
            report["bare_job_ms_median"] = med(r["bare_job_ms"])
            report["stack_generation_ms_median"] = med(r["stack_generation_ms"])
            env["SDFLEET_DATABASE_URL"] = f"sqlite:///{tmp / 'submit.db'}"
            report["submit"] = {} if args.no_submit else \
                {n: run_submissions(env, tmp, args.seconds, args.clients, n) for n in (1, 2)}
    finally:
        stop([redis_proc])
    print(json.dumps(report, indent=2))
    print(f"\n| what | value |\n|---|---|\n"
          f"| bare loop ({args.jobs} jobs, {args.size}x{args.size}, {args.steps} steps, guidance 7.5, "
          f"{report['precision']}, {report['mode']} mode, median of {args.rounds}) "
          f"| {report['bare_jobs_per_s']:.2f} jobs/s |\n"
          f"| API + Redis + worker + SQLite, same jobs, first submit to last done | "
          f"{report['stack_jobs_per_s']:.2f} jobs/s (ratio {report['throughput_ratio']:.3f}) |\n"
          f"| the same, first start to last done (the worker alone) | "
          f"{report['worker_jobs_per_s']:.2f} jobs/s (ratio {report['worker_throughput_ratio']:.3f}) |\n"
          f"| overhead per job (wall) | {report['overhead_ms_per_job']:.0f} ms |\n"
          f"| in a worker, per job beside its generation (releasing memory, heartbeat, profile, result; median) | "
          f"{report['worker_overhead_ms_median']:.1f} ms |\n"
          f"| between two jobs in a worker (ack, fetch, dispatch, pre-check, claim; median) | "
          f"{report['between_jobs_ms_median']:.1f} ms |\n"
          f"| one job: bare loop (generate + drop_weight_pages) / the worker's generation (+ PNG, start beat; median) | "
          f"{report['bare_job_ms_median']:.1f} / {report['stack_generation_ms_median']:.1f} ms |")
    for n, r in report["submit"].items():
        print(f"| submissions, {args.clients} clients, {n} API process(es) | {r['jobs_per_s']:.0f} jobs/s, "
              f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['errors']} errors |")


if __name__ == "__main__":
    main()
