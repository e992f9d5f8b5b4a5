"""A job's decoder, side by side on one worker: a real worker with a tiny VAE (TAESD's published architecture at
full size, as bench/taesd.py exports it) beside the model's own VAE, its jobs alternating `"decoder": "tiny"` and
`"decoder": "full"` at 512x512: the time per image (the median of each decoder's jobs after its first), the
decode phase's seconds (from the job's memory timeline: its decode mark to its last sample), the peak, and what
the worker predicted for each (its profiles are kept apart by decoder).

    .venv/bin/python bench/decoders.py [--arch sd-turbo,sdxl-turbo] [--modes fast,low] [--images 3] [--limit-gb 18]
    .venv/bin/python bench/decoders.py --table      # reprint each model's newest run (bench/results/decoders.jsonl)

Needs the IR folders of bench/fewstep.py --prepare (the TAESD is exported here if missing). The tiny VAE's
weights are random, so what it does to the image (fine detail) is not measured; its time and memory are.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fewstep import JOBS, NAMES, SIZE  # noqa: E402  (bench/ is a folder of scripts)
from memory import PROMPT  # noqa: E402
from predictions import GIB, bench_stack, keep_row, newest_run  # noqa: E402
from taesd import CACHE as TAESD_CACHE  # noqa: E402
from taesd import prepare as prepare_taesd  # noqa: E402

RESULTS = HERE / "results" / "decoders.jsonl"


def decode_seconds(timeline: dict) -> float | None:
    """The first image's decode: from its decode mark to the job's last sample."""
    samples = timeline["samples"]
    start = next((s["t"] for s in samples if s["phase"] == "decode"), None)
    return round(samples[-1]["t"] - start, 2) if start is not None else None


def run(arch: str, mode: str, images: int, limit_gb: float) -> list[dict]:
    job = JOBS[arch]
    tiny = str(TAESD_CACHE / "taesd-ov")
    out = {"tiny": [], "full": []}
    with bench_stack(arch, mode, limit_gb, "decoders", SDFLEET_TINY_VAE=tiny) as stack:
        (w,) = stack.client.workers()
        for i in range(images + 1):
            for decoder in ("tiny", "full"):
                record = stack.client.wait(stack.client.submit(
                    prompt=PROMPT, width=SIZE, height=SIZE, steps=job["steps"], guidance_scale=job["guidance"],
                    seed=i, decoder=decoder)["id"], timeout=3000, poll_s=0.5)
                if record["status"] != "succeeded":
                    raise SystemExit(f"{arch} {mode} {decoder}: {record['error']}; see {stack.work}")
                record["decode_s"] = decode_seconds(stack.client.memory(record["id"]))
                out[decoder].append(record)
    rows = []
    for decoder, done in out.items():
        later = done[1:]
        rows.append({"arch": arch, "mode": mode, "decoder": decoder, "precision": w["precision"],
                     "memory_mode": w["memory_mode"], "steps": job["steps"], "size": SIZE,
                     "first_s": done[0]["generation_s"],
                     "image_s": [r["generation_s"] for r in later],
                     "s_per_image": round(statistics.median(r["generation_s"] for r in later), 2),
                     "decode_s": round(statistics.median(r["decode_s"] for r in later), 2),
                     "peak_bytes": max(r["peak_rss_bytes"] for r in later),
                     "predicted_over_measured": [round(r["predicted_peak_bytes"] / r["peak_rss_bytes"], 2)
                                                 for r in done]})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | mode, precision | decoder | s/image (median) | vs full | decode phase | peak RSS | vs full | "
           "admission's prediction / measured |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        full = next(f for f in rows if (f["arch"], f["mode"], f["decoder"]) == (r["arch"], r["mode"], "full"))
        out.append(f"| {NAMES.get(r['arch'], r['arch'])} {r['size']}px, {r['steps']} step(s) | {r['mode']}, "
                   f"{r['precision']} | {r['decoder']} | {r['s_per_image']:.2f} s | "
                   f"{r['s_per_image'] / full['s_per_image']:.2f}x | {r['decode_s']:.2f} s | "
                   f"{r['peak_bytes'] / GIB:.2f} GiB | {r['peak_bytes'] / full['peak_bytes']:.2f}x | "
                   f"{', '.join(f'{x:.2f}' for x in r['predicted_over_measured'])} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd-turbo,sdxl-turbo")
    ap.add_argument("--modes", default="fast,low")
    ap.add_argument("--images", type=int, default=3, help="timed images of each decoder after its first")
    ap.add_argument("--limit-gb", type=float, default=18.0)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table(newest_run(RESULTS)))
        return 0
    prepare_taesd()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    rows = [keep_row(RESULTS, {**row, "run": stamp}) for arch in args.arch.split(",") for mode in args.modes.split(",")
            for row in run(arch, mode, args.images, args.limit_gb)]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
