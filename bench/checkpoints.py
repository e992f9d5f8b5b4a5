"""What a running job's checkpoint costs: its size, the snapshot's time (the denoising thread pays it), and a
write into the database (SQLite and PostgreSQL), for full-size latent shapes and schedulers with little and
much state. No model is needed: the snapshot holds the latents (random, of the real shape), the scheduler's
state after `--step` of `--steps` and the generator's state, exactly what the pipeline writes.

Usage: .venv/bin/python bench/checkpoints.py [--postgres postgresql://postgres@127.0.0.1:5432/test]
       [--rounds 30]
Prints a Markdown table: medians over the rounds. The PostgreSQL database is used through a schema of its own
created and dropped here.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import uuid

import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from sqlalchemy import create_engine, text

from shared import checkpoints, jobstore
from shared.db import migrate, session_factory
from shared.jobs import JobParameters, JobStatus
from worker.pipelines import take_snapshot

SHAPES = {"SD 1.5 512x512": (4, 64, 64), "SDXL 1024x1024": (4, 128, 128)}
SCHEDULERS = {"Euler": EulerDiscreteScheduler, "DPM++ 2M": DPMSolverMultistepScheduler}


def _scheduler(cls, steps: int, step: int, shape):
    """A scheduler as a pipeline leaves it after `step` steps (state built by stepping it on random data)."""
    s = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(steps)
    x = torch.randn(1, *shape)
    for t in s.timesteps[:step]:
        x = s.step(torch.randn_like(x), t, s.scale_model_input(x, t), return_dict=False)[0]
    return s, x


def _running_job(sessions) -> str:
    with sessions.begin() as session:
        job = jobstore.create_job(session, jobstore.NewJob(JobParameters(prompt="bench", model="bench", width=512, height=512, steps=25, guidance_scale=7.5,
                                                                         seed=0, num_images=1, negative_prompt=None)))
        job.status, job.attempts = JobStatus.running.value, 1
        return job.id


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--postgres", default=None)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--step", type=int, default=12)
    args = ap.parse_args()
    databases = {"SQLite": f"sqlite:///{tempfile.mkdtemp()}/bench.db"}
    schema = f"bench_ckpt_{uuid.uuid4().hex[:8]}"
    if args.postgres:
        admin = create_engine(args.postgres)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        databases["PostgreSQL"] = f"{args.postgres}?options=-csearch_path%3D{schema}"
    try:
        for url in databases.values():
            migrate(create_engine(url))
        gen = torch.Generator("cpu").manual_seed(0)
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.machine())
        print(f"CPU: {cpu}; torch {torch.__version__}; "
              f"{args.rounds} rounds, step {args.step} of {args.steps}\n")
        print("| latents | scheduler | checkpoint | snapshot (ms) | " + " | ".join(f"{d} write (ms)" for d in databases)
              + " |")
        print("|---|---|---|---|" + "---|" * len(databases))
        for shape_name, shape in SHAPES.items():
            for sched_name, cls in SCHEDULERS.items():
                sched, latents = _scheduler(cls, args.steps, args.step, shape)
                snaps = []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    state = take_snapshot(sched, gen, latents, args.step)
                    snaps.append(time.perf_counter() - t0)
                writes = {}
                for name, url in databases.items():
                    sessions = session_factory(url)
                    job_id = _running_job(sessions)
                    times = []
                    for _ in range(args.rounds):
                        t0 = time.perf_counter()
                        with sessions.begin() as session:
                            assert checkpoints.save_step(session, job_id, 1, "bench", "bench", 0, args.step,
                                                         args.steps, state)
                        times.append(time.perf_counter() - t0)
                    writes[name] = statistics.median(times)
                print(f"| {shape_name} | {sched_name} | {len(state) / 1024:.0f} KiB | "
                      f"{1000 * statistics.median(snaps):.1f} | "
                      + " | ".join(f"{1000 * w:.1f}" for w in writes.values()) + " |")
    finally:
        if args.postgres:
            with admin.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


if __name__ == "__main__":
    main()
