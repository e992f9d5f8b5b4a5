"""What a live preview costs, against a denoising step.

Part 1, the pieces (no model: random latents of the real shapes, SD 1.5 at 512x512 and SDXL at 1024x1024):
the copy of the latents the denoising thread makes when a preview is due (what `Pipeline.preview()` does inside
on_step), the projection to RGB and the JPEG encode (the worker's monitor thread), the JPEG's size, and its write
into the database (SQLite; PostgreSQL with --postgres), alone and with the progress write it rides with.

Part 2, the whole (with --model DIR): the worker's own code on a real pipeline: its Monitor (worker/tasks.py,
against a SQLite database with a running job) and the preview part of its on_step, with previews off
(SDFLEET_PREVIEW_INTERVAL_S=0), at the default interval (2 s) and due at every step (the loop copies the latents
at every step; the monitor renders and writes the latest twice a second). One unmeasured image of the shape
first; then rounds of one image per setting, the order rotated from round to round; the first step of an image
(prompt encoding) is left out; medians. The copy and the monitor's work are also timed as they happen: on a
shared or busy host, those, against the step, are the figure; the A/B of step times carries the host's noise.

Usage: .venv/bin/python bench/previews.py [--postgres URL] [--model DIR --size 512 --steps 20 --rounds 3]
Run a full-size model under bench/watchdog.py (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {"SD 1.5 512x512": ((1, 4, 64, 64), "sd"), "SDXL 1024x1024": ((1, 4, 128, 128), "sdxl")}


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.machine())


def _ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def _running_job(url: str, steps: int = 25):
    from shared import jobstore
    from shared.db import engine_for, migrate, session_factory
    from shared.jobs import JobParameters

    migrate(engine_for(url))
    sessions = session_factory(url)
    with sessions.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(JobParameters(
            prompt="bench", negative_prompt=None, width=512, height=512, steps=steps, guidance_scale=7.5, seed=0,
            num_images=1, model="bench")))
        job_id, delivery = job.id, job.delivery_id
    with sessions.begin() as s:
        attempt = jobstore.start_attempt(s, job_id, delivery, "bench", "bench:1", max_attempts=2)
    return sessions, attempt


def pieces(postgres: str | None, reps: int) -> None:
    import torch

    from shared import jobstore, previews
    from worker.preview import MEDIA_TYPE, SD, SDXL, encode

    databases = {"SQLite": f"sqlite:///{tempfile.mkdtemp()}/bench.db"}
    schema = None
    if postgres:
        from sqlalchemy import create_engine, text

        schema = f"bench_preview_{uuid.uuid4().hex[:8]}"
        with create_engine(postgres).begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        databases["PostgreSQL"] = f"{postgres}?options=-csearch_path%3D{schema}"
    try:
        jobs = {name: _running_job(url) for name, url in databases.items()}
        print(f"CPU: {cpu_name()}; {os.cpu_count()} cores; torch {torch.__version__}; medians of {reps}\n")
        print("| latents | copy in on_step (ms) | project (ms) | JPEG encode (ms) | JPEG | "
              + " | ".join(f"{d}: preview + progress write (ms) | {d}: progress write alone (ms)" for d in databases)
              + " |")
        print("|---|---|---|---|---|" + "---|---|" * len(databases))
        for label, (shape, kind) in SHAPES.items():
            latents = torch.randn(*shape) * 0.8
            projection = SD if kind == "sd" else SDXL
            copy, project, jpeg = [], [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                kept = latents.detach().float().numpy().copy()
                t1 = time.perf_counter()
                picture = projection.render(kept)
                t2 = time.perf_counter()
                data = encode(picture)
                t3 = time.perf_counter()
                copy.append(t1 - t0)
                project.append(t2 - t1)
                jpeg.append(t3 - t2)
            cells = [f"{_ms(copy):.3f}", f"{_ms(project):.3f}", f"{_ms(jpeg):.3f}",
                     f"{len(data) / 1024:.1f} KiB, {picture.width}x{picture.height}"]
            for name, (sessions, attempt) in jobs.items():
                both, alone = [], []
                for i in range(max(10, reps // 10)):
                    t0 = time.perf_counter()
                    with sessions.begin() as s:
                        jobstore.sync_running(s, attempt, (0, i + 1, 25))
                        previews.save(s, attempt.job_id, attempt.number, 0, i + 1, 25, data, MEDIA_TYPE,
                                      picture.width, picture.height)
                    t1 = time.perf_counter()
                    with sessions.begin() as s:
                        jobstore.sync_running(s, attempt, (0, i + 1000, 25))
                    alone.append(time.perf_counter() - t1)
                    both.append(t1 - t0)
                cells += [f"{_ms(both):.2f}", f"{_ms(alone):.2f}"]
            print(f"| {label} | " + " | ".join(cells) + " |")
    finally:
        if schema:
            from sqlalchemy import create_engine, text

            with create_engine(postgres).begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


SETTINGS = {"off": 0.0, "every 2 s (default)": 2.0, "due every step": 1e-9}


def whole(model: str, size: int, steps: int, rounds: int) -> None:
    from shared.settings import Settings
    from worker.pipelines import ImageRequest, get_pipeline
    from worker.tasks import Monitor

    settings = Settings(model=model)
    t0 = time.perf_counter()
    pipeline = get_pipeline(settings)  # as a worker's pool child: load, warm up
    load_s = time.perf_counter() - t0
    sessions, attempt = _running_job(f"sqlite:///{tempfile.mkdtemp()}/bench.db", steps)
    prompt = "a lighthouse on a cliff in a storm, oil painting"
    pipeline.generate(ImageRequest(prompt, None, size, size, steps, 7.5, 0))  # the shape's first run: unmeasured
    step_times = {k: [] for k in SETTINGS}
    copies = {k: [] for k in SETTINGS}
    monitor_ms = {k: [] for k in SETTINGS}
    written = {k: 0 for k in SETTINGS}
    names = list(SETTINGS)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            interval = SETTINGS[name]
            monitor = Monitor(sessions, attempt, settings.progress_interval_s, interval)
            last = [0.0]
            times: list[float] = []

            def on_step(step, total):  # the worker's on_step, its preview part (worker/tasks.py)
                now = time.perf_counter()
                if step > 1:
                    times.append(now - last[0])
                monitor.position = (0, step, total)
                if monitor.preview_due():
                    c0 = time.perf_counter()
                    render = pipeline.preview()
                    copies[name].append(time.perf_counter() - c0)
                    monitor.offer_preview(0, step, total, render)
                last[0] = time.perf_counter()

            with monitor:
                last[0] = time.perf_counter()
                pipeline.generate(ImageRequest(prompt, None, size, size, steps, 7.5, r), on_step)
            step_times[name].append(statistics.median(times))
            monitor_ms[name] += [1000 * t for _, t in monitor.preview_writes]
            written[name] += len(monitor.preview_writes)
            print(json.dumps({"round": r, "setting": name, "step_s": round(statistics.median(times), 4),
                              "previews": len(monitor.preview_writes)}), flush=True)
    print(f"\nCPU: {cpu_name()}; {os.cpu_count()} cores; model {model}; {size}x{size}, {steps} steps, guidance 7.5; "
          f"precision {pipeline.precision}; load {load_s:.0f} s; {rounds} round(s)\n")
    print("| previews | step (median of rounds) | vs off | previews written | copy in on_step (ms, median) | "
          "monitor: render + encode + write (ms, median) |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(step_times["off"])
    for name in SETTINGS:
        step = statistics.median(step_times[name])
        copy = f"{_ms(copies[name]):.3f}" if copies[name] else "-"
        mon = f"{statistics.median(monitor_ms[name]):.2f}" if monitor_ms[name] else "-"
        unit = f"{step:.3f} s" if step >= 1 else f"{1000 * step:.1f} ms"
        print(f"| {name} | {unit} | {100 * (step / base - 1):+.1f}% | {written[name]} | {copy} | {mon} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--postgres", help="also time the writes on this PostgreSQL (a schema of its own, dropped)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--model", help="an IR folder: part 2 on it (else part 1 only)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-pieces", action="store_true")
    args = ap.parse_args()
    if not args.skip_pieces:
        pieces(args.postgres, args.reps)
    if args.model:
        whole(args.model, args.size, args.steps, args.rounds)


if __name__ == "__main__":
    main()
