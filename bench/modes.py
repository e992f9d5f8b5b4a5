"""Every memory mode side by side, on a real worker: for each model, the fastsdcpu way (bench/fewstep.py's
in-process row) and a real worker (its own process, the bundled Redis, SQLite, an API) in each of fast, balanced,
low and auto, one after the other in one run: the worker's time to its first image (from its start: load,
warm-up, the first job), the time per image after the first (the median of the jobs' generation_s), the jobs'
peak RSS (each job's own, kernel VmHWM reset per job) and, for auto, the lever set each job ran in. With
--tight, auto runs once more with a budget between balanced's and fast's peaks (measured in the same run), where
fast does not fit.

    .venv/bin/python bench/modes.py [--arch lcm,sd-turbo,sdxl-turbo,sd15,sdxl] [--rows fastsdcpu,fast,balanced,low,auto]
                                    [--images 3] [--steps N] [--tight] [--limit-gb 21]
    .venv/bin/python bench/modes.py --table      # reprint each model's newest run (bench/results/modes.jsonl)

Each model's job: bench/fewstep.py's JOBS (SD 1.5 20 steps guidance 7.5, LCM 4 steps, the turbos 1 step; SDXL 20
steps guidance 5) at 512x512 (SDXL 1024x1024); --steps caps the steps.

Needs the IR folders of bench/fewstep.py --prepare. Each worker reads OpenVINO's compile cache as one does after
its first start (the fastsdcpu row compiles without a cache, as fastsdcpu does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fewstep import JOBS, NAMES, SIZE, SIZES, run_row, spec_for  # noqa: E402  (bench/ is a folder of scripts)
from memory import PROMPT  # noqa: E402
from predictions import GIB, bench_stack, keep_row, newest_run  # noqa: E402

from sdfleet.client import ApiError  # noqa: E402  (predictions put the repo on the path)

RESULTS = HERE / "results" / "modes.jsonl"
ROWS = ("fastsdcpu", "fast", "balanced", "low", "auto")


def job_of(arch: str, steps: int | None) -> dict:
    job = dict(JOBS[arch], size=SIZES.get(arch, SIZE))
    if steps:
        job["steps"] = min(job["steps"], steps)
    return job


def worker_row(arch: str, mode: str, images: int, limit_gb: float, budget: int | None = None,
               steps: int | None = None) -> dict:
    job = job_of(arch, steps)
    extra = {"SDFLEET_MEMORY_BUDGET": str(budget)} if budget else {}
    t0 = time.monotonic()
    with bench_stack(arch, mode, limit_gb, "modes", **extra) as stack:
        ready_s = time.monotonic() - t0
        (w,) = stack.client.workers()
        done = []
        for seed in range(images + 1):
            submitted = time.monotonic()
            record = stack.client.wait(stack.client.submit(prompt=PROMPT, width=job["size"], height=job["size"],
                                                           steps=job["steps"],
                                                           guidance_scale=job["guidance"], seed=seed)["id"],
                                       timeout=3000, poll_s=0.5)
            if record["status"] != "succeeded":
                raise SystemExit(f"{arch} {mode}: {record['error']} ({stack.guard.killed or 'not killed'}); "
                                 f"see {stack.work}")
            if seed == 0:
                first_s = ready_s + time.monotonic() - submitted
            done.append(record)
    later = done[1:]
    return {"arch": arch, "row": mode + (" (tight budget)" if budget else ""), "mode": mode, "budget_bytes": budget,
            "precision": w["precision"], "steps": job["steps"], "guidance": job["guidance"], "size": job["size"],
            "ready_s": round(ready_s, 1), "first_image_s": round(first_s, 1),
            "image_s": [round(r["generation_s"], 2) for r in later],
            "s_per_image": round(statistics.median(r["generation_s"] for r in later), 2),
            "peak_bytes": max(r["peak_rss_bytes"] for r in done),
            "later_peak_bytes": max(r["peak_rss_bytes"] for r in later),
            "lever_sets": [r.get("lever_set") for r in done],
            "kept": [kept_of(r.get("lever_reason") or "") for r in done],
            "predicted_over_measured": [round(r["predicted_peak_bytes"] / r["peak_rss_bytes"], 2) for r in done],
            # the worker's own prediction in the set it ran (admission's, above, is an auto worker's cheapest set's)
            "worker_predicted_over_measured": [round(r["lever_predicted_bytes"] / r["peak_rss_bytes"], 2)
                                               for r in done if r.get("lever_predicted_bytes")]}


def kept_of(reason: str) -> list[str]:
    """The components a job kept compiled though its lever set releases them, from its record's lever_reason."""
    said = reason.partition("kept compiled through the job: ")[2].partition(" (")[0]
    kept, _, buffers = said.partition("; their buffers too: ")
    return [f"{n}+buffers" if n in buffers.split(", ") else n for n in kept.split(", ")] if kept else []


def table(rows: list[dict]) -> str:
    header = ("| model | row | precision | peak RSS | vs fastsdcpu | first image | s/image after the first | "
              "vs fastsdcpu | lever sets (auto); kept compiled (after the first job) |")
    out = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["arch"] == r["arch"] and b["row"] == "fastsdcpu"), None)
        if r["row"] == "fastsdcpu":
            peak, per_image, first = r["peak_mb"] * 2**20, r.get("s_per_image"), r.get("first_image_s")
        else:
            peak, per_image, first = r["peak_bytes"], r["s_per_image"], r["first_image_s"]
        bpeak = base["peak_mb"] * 2**20 if base else None
        time_ratio = f"{per_image / base['s_per_image']:.2f}x" if base and base.get("s_per_image") else ""
        peak_ratio = f"{peak / bpeak:.2f}x" if bpeak else ""
        sets = ""
        if r.get("lever_sets") and r["mode"] == "auto":
            sets = ", ".join(f"{k} x{r['lever_sets'].count(k)}" for k in dict.fromkeys(r["lever_sets"]))
        kept = {", ".join(k) for k in r.get("kept", [])[1:]}
        if kept and kept != {""}:
            sets = "; ".join(x for x in (sets, "kept: " + " / ".join(sorted(k or "nothing" for k in kept))) if x)
        out.append(f"| {NAMES.get(r['arch'], r['arch'])} {r['size']}px, {r['steps']} steps, g{r['guidance']:g} | "
                   f"{r['row']} | {r.get('precision', '')} | {peak / GIB:.2f} GiB | {peak_ratio} | {first:.1f} s | "
                   f"{per_image:.1f} s | {time_ratio} | {sets} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="lcm,sd-turbo,sdxl-turbo,sd15")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--images", type=int, default=3, help="timed images after the first")
    ap.add_argument("--steps", type=int, default=None, help="at most this many steps (SDXL's 20 take long)")
    ap.add_argument("--tight", action="store_true", help="auto once more, its budget between balanced's and fast's")
    ap.add_argument("--limit-gb", type=float, default=21.0)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table(newest_run(RESULTS)))
        return 0
    run = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    rows = []

    def keep(row: dict) -> None:
        rows.append(keep_row(RESULTS, {**row, "run": run}))
    for arch in args.arch.split(","):
        mine = {}
        for row in args.rows.split(","):
            if row == "fastsdcpu":
                fa = argparse.Namespace(steps=args.steps, model_dir=None, size=job_of(arch, None)["size"],
                                        images=args.images, cache_dir=Path("/nonexistent"))
                r = run_row(spec_for(arch, "fastsdcpu", fa), args.limit_gb, tag="-modes")
                if not r.get("s_per_image"):
                    print(f"fastsdcpu {arch}: {r.get('error') or r.get('killed')}", flush=True)
            else:
                r = worker_row(arch, row, args.images, args.limit_gb, steps=args.steps)
            mine[row] = r
            keep(r)
        if args.tight and {"fast", "balanced"} <= set(mine):
            # between balanced's and fast's peaks: room for balanced (measured in the same run), not for fast
            budget = (mine["balanced"]["peak_bytes"] + mine["fast"]["peak_bytes"]) // 2
            try:
                keep(worker_row(arch, "auto", args.images, args.limit_gb, budget, steps=args.steps))
            except ApiError as exc:  # a fresh worker's prior may not fit a tight budget: refused, said so
                print(f"{arch} auto at {budget / GIB:.2f} GiB: {exc}", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
