"""Predictions beside measurements: a real worker (its own process, its tree killed past the memory limit)
serving a full-size architecture in one memory mode, a real API (SQLite, the bundled Redis), one job measured
at a first shape, then jobs of other sizes, guidance and image counts, each submitted with only that first
shape's profile in the database: admission's prediction at submit beside the peak the worker measured.
The first job's own prediction is the prior's (nothing measured yet).

    .venv/bin/python bench/predictions.py [--arch sd15,sdxl] [--modes low,balanced] [--limit-gb 21]
    .venv/bin/python bench/predictions.py --updown [--arch sd15,sdxl] [--modes fast,balanced,low,auto]
    .venv/bin/python bench/predictions.py --table [--updown]   # the newest run of each model and mode

With --updown the worker keeps every profile, as a real worker does, and the shapes go from small to large
and back to small (UPDOWN): each prediction is admission's from everything measured before it, against a
resident set that the larger jobs may have grown; each row has the job's peak per phase too.

Needs the fp16 IR folders that bench/export_bench.py leaves in ~/.cache/sdfleet/bench. Appends every row to
bench/results/predictions.jsonl and prints a markdown table; --table reprints it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from sdfleet.client import Client  # noqa: E402
from sdfleet.stack import spawn, start_bundled_redis, stop  # noqa: E402

CACHE = Path(os.environ.get("SDFLEET_BENCH_DIR", Path.home() / ".cache" / "sdfleet" / "bench"))
RESULTS = HERE / "results" / "predictions.jsonl"
GIB = 1 << 30
STEPS = 2  # memory does not depend on the number of steps

# (width, height, guidance, images): the first is measured, the others predicted from it alone
SHAPES = {
    "sd15": [(768, 512, 7.5, 1), (512, 512, 7.5, 1), (1024, 1024, 7.5, 1), (512, 512, 1.0, 1), (768, 768, 1.0, 1),
             (640, 640, 7.5, 2), (1024, 768, 7.5, 1)],
    "sdxl": [(1024, 1024, 1.0, 1), (768, 768, 1.0, 1), (1024, 1024, 7.5, 1), (1280, 768, 1.0, 1),
             (896, 896, 7.5, 1), (512, 512, 7.5, 1), (1024, 1024, 1.0, 2)],
}


# small -> large -> small, every profile kept: what a real worker sees
UPDOWN = {
    "sd15": [(512, 512, 7.5, 1), (768, 512, 7.5, 1), (1024, 1024, 7.5, 1), (640, 640, 1.0, 1), (512, 512, 7.5, 1),
             (768, 768, 7.5, 1), (512, 512, 1.0, 1)],
    "sdxl": [(768, 768, 1.0, 1), (1024, 1024, 1.0, 1), (1024, 1024, 5.0, 1), (768, 768, 5.0, 1), (896, 896, 1.0, 1),
             (768, 768, 1.0, 1)],
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guard(threading.Thread):
    """Kills the worker's process group once its tree's RSS passes the limit (before the OOM killer does)."""

    def __init__(self, proc: subprocess.Popen, limit_bytes: int):
        super().__init__(daemon=True)
        self.proc, self.limit, self.killed = proc, limit_bytes, None

    def run(self):
        while self.proc.poll() is None:
            try:
                root = psutil.Process(self.proc.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.NoSuchProcess:
                return
            if total > self.limit:
                self.killed = f"rss {total / GIB:.1f} GiB"
                os.killpg(self.proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)


@dataclass
class BenchStack:
    client: Client
    guard: Guard
    work: Path  # its folder: the database, the worker's and the API's logs
    db: str


@contextlib.contextmanager
def bench_stack(arch: str, mode: str, limit_gb: float, prefix: str, timeout_s: int = 3000, **settings):
    """A real worker serving the full-size `arch` in memory mode `mode` (its own process group, killed past
    `limit_gb`), a real API on SQLite and the bundled Redis, each on a free port; up once the worker is ready,
    all stopped at the end. `settings`: more SDFLEET_* variables."""
    ir = CACHE / f"{arch}-fp16"
    if not (ir / "model_index.json").is_file():
        raise SystemExit(f"{ir} is missing: run bench/export_bench.py --arch {arch} --formats fp16 --skip-cli")
    work = Path(tempfile.mkdtemp(prefix=f"sdfleet-{prefix}-{arch}-{mode}-"))
    redis_port, api_port = free_port(), free_port()
    db = f"sqlite:///{work / 'bench.db'}"
    env = {"SDFLEET_DATABASE_URL": db, "SDFLEET_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
           "SDFLEET_MODEL": str(ir), "SDFLEET_MODEL_NAME": arch, "SDFLEET_DEFAULT_MODEL": arch,
           "SDFLEET_MEMORY_MODE": mode, "SDFLEET_PAUSE_CPU_PERCENT": "100", "SDFLEET_JOB_TIMEOUT_S": str(timeout_s),
           "HF_HUB_OFFLINE": "1", **settings}
    env_all = {**{k: v for k, v in os.environ.items() if not k.startswith("SDFLEET_")}, **env,
               "PYTHONPATH": str(ROOT)}
    redis = start_bundled_redis(redis_port)
    worker = subprocess.Popen([sys.executable, "-m", "sdfleet", "worker"], env=env_all, cwd=ROOT,
                              stdout=open(work / "worker.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    guard = Guard(worker, int(limit_gb * GIB))
    guard.start()
    api = spawn(["api", "--port", str(api_port), "--quiet"], env_all, str(work / "api.log"))
    client = Client(f"http://127.0.0.1:{api_port}", timeout=120)
    try:
        deadline = time.monotonic() + 1800
        while not (client.healthy() and any(w["alive"] and w["state"] == "ready" for w in client.workers())):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not come up ({guard.killed or worker.poll()}); see {work}")
            time.sleep(1)
        yield BenchStack(client, guard, work, db)
    finally:
        stop([api])
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        stop([redis])


def newest_run(path: Path) -> list[dict]:
    """The rows of a results file (JSON lines) from each model's newest run: what --table reprints."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    newest = {}
    for r in rows:
        newest[r["arch"]] = max(newest.get(r["arch"], ""), r["run"])
    return [r for r in rows if r["run"] == newest[r["arch"]]]


def keep_row(path: Path, row: dict) -> dict:
    """Append a row to a results file (JSON lines) as it is measured, and print it."""
    path.parent.mkdir(exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def phase_peaks(memory: dict) -> dict:
    """The job's highest RSS in each phase of its timeline (encode, denoise, decode, ...)."""
    out: dict[str, int] = {}
    for s in memory["samples"]:
        out[s["phase"]] = max(out.get(s["phase"], 0), s["rss"])
    return out


def run(arch: str, mode: str, limit_gb: float, updown: bool = False) -> list[dict]:
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    rows = []
    with bench_stack(arch, mode, limit_gb, "pred") as stack:
        client, guard, work, db = stack.client, stack.guard, stack.work, stack.db
        (w,) = client.workers()
        first = None
        for width, height, guidance, images in (UPDOWN if updown else SHAPES)[arch]:
            if first is not None and not updown:  # only the first shape's profile: predictions from one measured shape
                from sqlalchemy import create_engine, text

                engine = create_engine(db)
                with engine.begin() as conn:
                    conn.execute(text("DELETE FROM memory_profiles WHERE NOT (width = :w AND height = :h AND "
                                      "guidance = :g)"), {"w": first[0], "h": first[1], "g": first[2] > 1})
                engine.dispose()
            (w,) = client.workers()  # what admission predicts from: the worker's resident set now
            job = client.submit(prompt="a lighthouse on a cliff in a storm, oil painting", width=width,
                                height=height, guidance_scale=guidance, num_images=images, steps=STEPS, seed=1)
            done = client.wait(job["id"], timeout=3000, poll_s=1)
            if done["status"] != "succeeded":
                raise SystemExit(f"job {width}x{height} g{guidance} x{images}: {done['error']} "
                                 f"({guard.killed or 'not killed'}); see {work}")
            row = {"run": run_id, "arch": arch, "mode": mode, "precision": w["precision"], "width": width, "height": height,
                   "guidance": guidance, "images": images, "source": done["prediction_source"],
                   "predicted_bytes": done["predicted_peak_bytes"], "measured_bytes": done["peak_rss_bytes"],
                   "ratio": round(done["predicted_peak_bytes"] / done["peak_rss_bytes"], 3),
                   "resident_bytes": w["resident_bytes"], "rss_before_bytes": done["rss_before_bytes"],
                   # the one shape predicted from (with --updown: every shape measured before)
                   "measured_shape": "x".join(map(str, first[:2])) + f" g{first[2]}" if first and not updown else None,
                   "order": "updown" if updown else "one", "lever_set": done.get("lever_set"),
                   "lever_predicted_bytes": done.get("lever_predicted_bytes"),
                   "phase_peaks": phase_peaks(client.memory(job["id"])),
                   "at": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
            rows.append(row)
            RESULTS.parent.mkdir(exist_ok=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            first = first or (width, height, guidance)
    return rows


def table(rows: list[dict]) -> str:
    updown = any(r.get("order") == "updown" for r in rows)
    extra = " job started at | ran in | the worker's prediction there / measured |" if updown else ""
    out = ["| model | mode, precision | job (size, guidance, images) | source | predicted | measured | predicted / measured |"
           + extra, "|---|---|---|---|---|---|---|" + ("---|---|---|" if updown else "")]
    for r in rows:
        mine = r.get("lever_predicted_bytes")
        theirs = f"{mine / r['measured_bytes']:.2f}" if mine else ""
        more = f" {r['rss_before_bytes'] / GIB:.2f} GiB | {r.get('lever_set') or ''} | {theirs} |" if updown else ""
        out.append(f"| {r['arch']} | {r['mode']}, {r['precision']} | {r['width']}x{r['height']} g{r['guidance']:g}"
                   f"{' x' + str(r['images']) if r['images'] > 1 else ''} | {r['source']} | "
                   f"{r['predicted_bytes'] / GIB:.2f} GiB | {r['measured_bytes'] / GIB:.2f} GiB | {r['ratio']:.2f} |"
                   + more)
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15,sdxl")
    ap.add_argument("--modes", default="low,balanced")
    ap.add_argument("--limit-gb", type=float, default=21.0)
    ap.add_argument("--updown", action="store_true", help="keep every profile; shapes small -> large -> small")
    ap.add_argument("--table", action="store_true", help="print the table of results/predictions.jsonl")
    args = ap.parse_args()
    if args.table:  # the newest run of each model and mode
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if (r.get("order") == "updown") == args.updown]
        newest = {}
        for r in rows:
            newest[(r["arch"], r["mode"])] = max(newest.get((r["arch"], r["mode"]), ""), r.get("run", ""))
        print(table([r for r in rows if r.get("run", "") == newest[(r["arch"], r["mode"])]]))
        return 0
    rows = []
    for arch in args.arch.split(","):
        for mode in args.modes.split(","):
            rows += run(arch, mode, args.limit_gb, args.updown)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
