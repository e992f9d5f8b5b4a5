"""Export benchmark: `sdfleet model export` (one component per process) vs one-process
`optimum-cli export openvino`, each under the memory watchdog, on the full-size random-weight pipelines.
Builds what is missing (bench/fullsize.py) and leaves the IR folders in the cache for bench/memory.py.

    .venv/bin/python bench/export_bench.py [--arch sd15,sdxl] [--limit-gb 21] [--skip-cli] [--compare]

Appends its rows to bench/results/export.jsonl and prints a markdown table. With --compare (and the CLI run),
both fp16 IRs' UNets are run once on the same fixed input, each in a fresh process at f32 (the one precision
that adds no rounding of its own), and the outputs' largest absolute difference is reported.
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


def unet_call(ir: Path, out: Path, latent: int) -> None:
    """Child: one call of `ir`'s UNet at f32 on a fixed seeded input (batch 1, latent x latent, 77 tokens);
    the output saved to `out` (.npy)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(ir / "unet" / "openvino_model.xml")
    rng = np.random.default_rng(0)
    feed = {}
    for port in model.inputs:
        name, dims = port.get_any_name(), port.get_partial_shape()
        shape = [d.get_length() if d.is_static else (1 if i == 0 else latent if len(dims) == 4 else 77)
                 for i, d in enumerate(dims)]
        if name == "timestep":
            feed[name] = np.full(shape, 500, dtype=port.get_element_type().to_dtype())
        elif name == "time_ids":
            feed[name] = np.tile(np.array([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8], np.float32),
                                 (shape[0], 1))
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled(feed)[compiled.outputs[0]]
    np.save(out, result)


def compare(arch: str, cli_ir: Path, ir: Path, limit_gb: float, latent: int) -> dict:
    """Run both IRs' UNets on the same input (unet_call, a process each, under the watchdog): the outputs'
    largest absolute difference, beside the output's own magnitude."""
    import numpy as np

    outs = []
    for tag, folder in (("cli", cli_ir), ("sdfleet", ir)):
        npy = CACHE / f"unet-call-{arch}-{tag}.npy"
        r = guarded([sys.executable, __file__, "unet-call", str(folder), str(npy), str(latent)], limit_gb,
                    CACHE / f"unet-call-{arch}-{tag}.log")
        if r["rc"] != 0 or r["killed"]:
            raise SystemExit(f"the UNet call on {folder} failed: {r}")
        outs.append(np.load(npy))
    a, b = outs
    return {"arch": arch, "compare": f"unet fp16 IR: {cli_ir.name} vs sdfleet", "precision": "f32",
            "latent": latent, "shape": list(a.shape), "max_abs_diff": float(np.abs(a - b).max()),
            "max_abs_output": float(np.abs(a).max()), "identical": bool(np.array_equal(a, b)),
            "at": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def reference_unet(src: Path, out: Path) -> None:
    """Child: the UNet alone, converted by optimum-intel's export code exactly as optimum-cli runs it (the
    same `export_models` call, 16-bit patch included, traced at the model's own sample size): modeltools.steps'
    conversion with its small trace turned off. The reference where optimum-cli itself cannot finish."""
    sys.path.insert(0, str(HERE.parent))
    from modeltools import steps

    steps.TRACE_LATENT_SIDE = 1 << 20
    steps.convert(src, out, ["unet"], False)
    print(json.dumps({"peak_mb": steps.maxrss_mb()}))


def main() -> int:
    if sys.argv[1:2] == ["unet-call"]:
        unet_call(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    if sys.argv[1:2] == ["reference-unet"]:
        reference_unet(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15,sdxl")
    ap.add_argument("--limit-gb", type=float, default=21.0)
    ap.add_argument("--skip-cli", action="store_true", help="only sdfleet model export")
    ap.add_argument("--compare", action="store_true",
                    help="run both fp16 IRs' UNets once on the same input and report the largest difference")
    ap.add_argument("--latent", type=int, default=0, help="--compare's latent side (default: the UNet's own)")
    ap.add_argument("--formats", default="fp16,int8",
                    help="weight formats for sdfleet (int8/int4/int8-hybrid compress the fp16 IR)")
    ap.add_argument("--calibration-samples", type=int, help="int8-hybrid's (default: sdfleet's, 200)")
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
        if args.compare:
            out = CACHE / f"{arch}-reference-unet"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(("optimum-intel, the UNet alone", "fp16", out,
                         [sys.executable, __file__, "reference-unet", str(src), str(out)]))
        for fmt in args.formats.split(","):
            out = CACHE / f"{arch}-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            # int8/int4/int8-hybrid start from the fp16 IR (what a user with an exported model does); fp16 from torch
            source = src if fmt == "fp16" else CACHE / f"{arch}-fp16"
            runs.append(("sdfleet model export", fmt, out,
                         [str(BIN / "sdfleet"), "model", "export", str(source), str(out), "--weight-format", fmt]
                         + (["--calibration-samples", str(args.calibration_samples)]
                            if fmt == "int8-hybrid" and args.calibration_samples else [])))
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
        if args.compare and "fp16" in args.formats.split(","):
            # optimum-cli's own UNet where it finished; else the UNet alone by the same optimum-intel code
            cli_ir = CACHE / f"{arch}-cli-fp16"
            if not (cli_ir / "unet" / "openvino_model.xml").is_file():
                cli_ir = CACHE / f"{arch}-reference-unet"
            ir = CACHE / f"{arch}-fp16"
            latent = args.latent or json.loads((src / "unet" / "config.json").read_text())["sample_size"]
            row = compare(arch, cli_ir, ir, args.limit_gb, latent)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        for ref in ("cli-fp16", "reference-unet"):  # only their figures are kept
            shutil.rmtree(CACHE / f"{arch}-{ref}", ignore_errors=True)
    print("\n| arch | how | weights | peak RSS | time | IR on disk |\n|---|---|---|---|---|---|")
    for r in rows:
        peak = f"killed past {r['peak_mb'] / 1024:.1f} GB" if r["killed"] else f"{r['peak_mb'] / 1024:.1f} GB"
        print(f"| {r['arch']} | {r['how']} | {r['weight_format']} | {peak} | {r['seconds']:.0f} s | "
              f"{r['disk_mb'] / 1024:.1f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
