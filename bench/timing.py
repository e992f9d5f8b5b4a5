"""Time predictions beside measurements: a real worker on the tiny model, a real API (SQLite, the bundled Redis),
jobs of several shapes (sizes, guidance on and off, steps, images) run one after the other in an order where
each is predicted at submit from the shapes before it only (its own shape not measured yet), then each shape
twice more, predicted from its own profile (after its first job, then after two). Then a queue: N jobs
submitted at once, each one's expected start (read right after the submissions) beside when it did start.

    .venv/bin/python bench/timing.py [--model DIR] [--repeats 5] [--queue 6]

The whole of it runs --repeats times, each on a fresh database (nothing measured at its start), and the tables
give each row's medians over the repeats: on a machine whose other programs take CPU time, one job's time
varies by much more than a prediction's error (the same job twice in a row, 2x apart, was seen here). Appends
every row to bench/results/timing.jsonl and prints markdown tables; --table reprints the newest run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from sdfleet.client import Client  # noqa: E402
from sdfleet.stack import free_port, spawn, start_bundled_redis, stop  # noqa: E402

RESULTS = HERE / "results" / "timing.jsonl"
CACHE_S = 1.0  # the API's fleet view (SDFLEET_API_CACHE_S): a profile a job measured reaches admission within it

# (width, height, guidance, steps, images), in the order they run: the first has nothing to be predicted from
SHAPES = [
    (256, 256, 7.5, 10, 1),
    (256, 256, 1.0, 10, 1),
    (512, 512, 7.5, 20, 1),
    (384, 384, 7.5, 15, 2),
    (512, 512, 1.0, 30, 1),
    (768, 512, 7.5, 20, 1),
    (640, 640, 7.5, 10, 2),
    (128, 128, 7.5, 40, 1),
    (512, 512, 1.0, 1, 3),
]
QUEUE_SHAPE = (384, 384, 7.5, 20, 1)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run(model: str, queue: int, run_id: str, rep: int) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="sdfleet-timing-"))
    redis_port, api_port = free_port(), free_port()
    db = f"sqlite:///{work / 'bench.db'}"
    env = {"SDFLEET_DATABASE_URL": db, "SDFLEET_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "SDFLEET_MODEL": model, "SDFLEET_MODEL_NAME": "tiny-sd", "SDFLEET_DEFAULT_MODEL": "tiny-sd",
           "SDFLEET_PAUSE_CPU_PERCENT": "100", "SDFLEET_CPU_PRIORITY": "normal",
           "SDFLEET_API_CACHE_S": str(CACHE_S), "HF_HUB_OFFLINE": "1"}
    env_all = {**{k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}, **env,
               "PYTHONPATH": str(ROOT)}
    redis = start_bundled_redis(redis_port)
    worker = subprocess.Popen([sys.executable, "-m", "sdfleet", "worker"], env=env_all, cwd=ROOT,
                              stdout=open(work / "worker.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    api = spawn(["api", "--port", str(api_port), "--quiet"], env_all, str(work / "api.log"))
    client = Client(f"http://127.0.0.1:{api_port}", timeout=60)
    rows = []
    try:
        deadline = time.monotonic() + 600
        while not (client.healthy() and any(w["alive"] and w["state"] == "ready" for w in client.workers())):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not come up; see {work}")
            time.sleep(0.5)
        (w,) = client.workers()
        base = {"run": run_id, "rep": rep, "cpu": cpu_name(), "precision": w["precision"], "mode": w["memory_mode"]}
        for round_ in ("scaled", "own", "own2"):
            for width, height, guidance, steps, images in SHAPES:
                time.sleep(CACHE_S + 0.2)  # the last job's profile is in the API's view
                job = client.submit(prompt="a lighthouse on a cliff in a storm, oil painting", width=width,
                                    height=height, guidance_scale=guidance, steps=steps, num_images=images, seed=1)
                done = client.wait(job["id"], timeout=600, poll_s=0.2)
                if done["status"] != "succeeded":
                    raise SystemExit(f"job {width}x{height}: {done['error']}; see {work}")
                predicted, measured = job["predicted_generation_s"], done["generation_s"]
                row = {**base, "part": round_, "width": width, "height": height, "guidance": guidance,
                       "steps": steps, "images": images, "predicted_s": predicted, "measured_s": measured,
                       "ratio": round(predicted / measured, 3) if predicted else None,
                       "load1": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        time.sleep(CACHE_S + 0.2)
        width, height, guidance, steps, images = QUEUE_SHAPE
        jobs = [client.submit(prompt=f"queued {i}", width=width, height=height, guidance_scale=guidance, steps=steps,
                              num_images=images, seed=i) for i in range(queue)]
        read = [(time.time(), client.job(j["id"])) for j in jobs]
        for index, ((at, record), job) in enumerate(zip(read, jobs)):
            done = client.wait(job["id"], timeout=600, poll_s=0.2)
            started = datetime.fromisoformat(done["started_at"].replace("Z", "+00:00")).timestamp()
            row = {**base, "part": "queue", "index": index, "width": width, "height": height, "guidance": guidance,
                   "steps": steps, "images": images, "position": record["queue_position"],
                   "status_at_read": record["status"],
                   "expected_start_s": record["expected_start_s"], "started_after_s": round(started - at, 3),
                   "waiting_reason": record["waiting_reason"], "predicted_s": record["predicted_generation_s"],
                   "measured_s": done["generation_s"], "load1": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stop([api])
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        stop([redis])
    RESULTS.parent.mkdir(exist_ok=True)
    with open(RESULTS, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(rows: list[dict]) -> str:
    first = rows[0]
    loads = [r["load1"] for r in rows if "load1" in r]
    reps = len({r.get("rep", 0) for r in rows})
    out = [f"{first['cpu']}; inference precision {first['precision']}, memory mode {first['mode']}; "
           f"run {first['run']}, "
           f"{reps} repeat(s), medians" + (f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} on "
                                           f"{os.cpu_count()} CPUs" if loads else ""),
           "", "| predicted from | job (size, guidance, steps, images) | predicted | measured | "
               "predicted / measured: median (each repeat) |",
           "|---|---|---|---|---|"]
    how = {"scaled": "earlier shapes", "own": "its own profile (1 job)", "own2": "its own profile (2 jobs)"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["part"] != "queue":
            key = (r["part"], r["width"], r["height"], r["guidance"], r["steps"], r["images"])
            groups.setdefault(key, []).append(r)
    for (part, width, height, guidance, steps, images), rs in groups.items():
        job = f"{width}x{height} g{guidance:g}, {steps} steps" + (f", x{images}" if images > 1 else "")
        predicted, measured = _median([r["predicted_s"] for r in rs]), _median([r["measured_s"] for r in rs])
        ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
        ratio = f"**{_median(ratios):.2f}** ({', '.join(f'{x:.2f}' for x in ratios)})" if ratios else "-"
        out.append(f"| {how[part] if predicted is not None else 'nothing (first job)'} | {job} | "
                   f"{'-' if predicted is None else f'{predicted:.2f} s'} | {measured:.2f} s | {ratio} |")
    # the machine's own repeatability: the same job, run again right after (its 2nd and 3rd runs)
    spread = []
    for key, rs in groups.items():
        if key[0] != "own":
            continue
        again = {r.get("rep", 0): r["measured_s"] for r in groups.get(("own2", *key[1:]), [])}
        spread += [max(r["measured_s"], again[r.get("rep", 0)]) / min(r["measured_s"], again[r.get("rep", 0)])
                   for r in rs if r.get("rep", 0) in again]
    if spread:
        out += ["", f"The same job run twice in a row (each shape's 2nd and 3rd jobs): the slower run took "
                    f"{_median(spread):.2f}x the faster in the median, up to {max(spread):.2f}x (what the machine's "
                    "other programs do to one job's time)."]
    queue = [r for r in rows if r["part"] == "queue"]
    if queue:
        q = queue[0]
        out += ["", f"Queue: {len(queue) // reps} jobs of {q['width']}x{q['height']} g{q['guidance']:g}, {q['steps']} "
                    "steps, submitted at once; each record read right after (medians over the repeats):", "",
                "| job | expected start | started after | waiting reason (first repeat) |", "|---|---|---|---|"]
        by_index: dict[int, list[dict]] = {}
        for r in queue:
            by_index.setdefault(r["index"], []).append(r)
        for index, rs in sorted(by_index.items()):
            expected = _median([r["expected_start_s"] for r in rs if r["status_at_read"] == "queued"])
            started = _median([r["started_after_s"] for r in rs])
            reason = rs[0]["waiting_reason"] or f"({rs[0]['status_at_read']} when read)"
            out.append(f"| {index + 1} | {'-' if expected is None else f'{expected:.2f} s'} | {started:.2f} s | "
                       f"{reason} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "sdfleet" / "models" / "tiny-sd"))
    ap.add_argument("--repeats", type=int, default=5, help="the whole bench, each on a fresh database")
    ap.add_argument("--queue", type=int, default=6, help="jobs submitted at once for the expected starts")
    ap.add_argument("--table", action="store_true", help="reprint the newest run of results/timing.jsonl")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        newest = max(r["run"] for r in rows)
        print(table([r for r in rows if r["run"] == newest]))
        return 0
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    rows = []
    for rep in range(args.repeats):
        rows += run(args.model, args.queue, run_id, rep)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
