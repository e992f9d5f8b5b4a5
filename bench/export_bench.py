"""Export benchmark: `sdfleet model export` (one component per process) vs one-process
`optimum-cli export openvino`, each under the memory watchdog, on the full-size random-weight pipelines.
Builds what is missing (bench/fullsize.py) and leaves the IR folders in the cache for bench/memory.py.

    .venv/bin/python bench/export_bench.py [--arch sd15,sdxl] [--limit-gb 21] [--skip-cli]

Appends its rows to bench/results/export.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("SDFLEET_BENCH_DIR", Path.home() / ".cache" / "sdfleet" / "bench"))
RESULTS = HERE / "results" / "export.jsonl"

sys.path.insert(0, str(HERE))
from watchdog import guarded  # noqa: E402  (bench/ is a folder of scripts, not a package)


def ensure_source(arch: str, limit_gb: float) -> Path:
    src = CACHE / f"{arch}-torch"
    if not (src / "model_index.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        r = guarded([sys.executable, str(HERE / "fullsize.py"), "build", arch, str(src)], limit_gb,
                    CACHE / f"build-{arch}.log")
        if r["rc"] != 0 or r["killed"]:
            raise SystemExit(f"building {arch} failed: {r}")
    return src


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15,sdxl")
    ap.add_argument("--limit-gb", type=float, default=21.0)
    ap.add_argument("--skip-cli", action="store_true", help="only sdfleet model export")
    ap.add_argument("--formats", default="fp16,int8",
                    help="weight formats for sdfleet (int8/int4 compress the fp16 IR)")
    args = ap.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(exist_ok=True)
    rows = []
    for arch in args.arch.split(","):
        src = ensure_source(arch, args.limit_gb)
        runs = []
        if not args.skip_cli:
            out = CACHE / f"{arch}-cli-fp16"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(("optimum-cli, one process", "fp16", out,
                         [str(BIN / "optimum-cli"), "export", "openvino", "--model", str(src),
                          "--task", "text-to-image", "--weight-format", "fp16", str(out)]))
        for fmt in args.formats.split(","):
            out = CACHE / f"{arch}-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            # int8/int4 start from the fp16 IR (what a user with an exported model does); fp16 from torch
            source = src if fmt == "fp16" else CACHE / f"{arch}-fp16"
            runs.append(("sdfleet model export", fmt, out,
                         [str(BIN / "sdfleet"), "model", "export", str(source), str(out), "--weight-format", fmt]))
        for how, fmt, out, cmd in runs:
            t0 = time.time()
            r = guarded(cmd, args.limit_gb, CACHE / f"export-{arch}-{fmt}-{how.split()[0].strip(',')}.log")
            disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
            row = {"arch": arch, "how": how, "weight_format": fmt, "peak_mb": r["peak_process_mb"],
                   "killed": r["killed"], "rc": r["rc"], "seconds": r["elapsed_s"], "disk_mb": disk >> 20,
                   "limit_gb": args.limit_gb, "at": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0))}
            rows.append(row)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            if how.startswith("optimum-cli"):
                shutil.rmtree(out, ignore_errors=True)  # only its figures are kept
    print("\n| arch | how | weights | peak RSS | time | IR on disk |\n|---|---|---|---|---|---|")
    for r in rows:
        peak = f"killed past {r['peak_mb'] / 1024:.1f} GB" if r["killed"] else f"{r['peak_mb'] / 1024:.1f} GB"
        print(f"| {r['arch']} | {r['how']} | {r['weight_format']} | {peak} | {r['seconds']:.0f} s | "
              f"{r['disk_mb'] / 1024:.1f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
