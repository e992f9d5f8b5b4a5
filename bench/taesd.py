"""Tiny autoencoder (TAESD) against the full VAE: decode time and decode-phase memory at 512 and 1024.

    .venv/bin/python bench/taesd.py          # --sizes 512,1024 --repeats 3 --limit-gb 12
    .venv/bin/python bench/taesd.py --table  # reprint the table of bench/results/taesd.jsonl

Decoders, random weights at full size (time and memory do not depend on the values):
- full: SD 1.5's VAE decoder (AutoencoderKL, block_out_channels 128/256/512/512; SDXL's VAE has the same
  architecture), converted as optimum-intel converts it (`vae.decode` traced, fp16 weights);
- full, tiled: the same decoder through the worker's `tiled_decode` (the vae_tiles lever of low mode:
  512-pixel tiles, so 1024 only);
- tiny: TAESD's published configuration (AutoencoderTiny defaults; TAESDXL has the same architecture), made
  by `sdfleet model export-tiny-vae` (modeltools/tiny_vae.py), what SDFLEET_TINY_VAE serves.

Each row runs in a fresh process under bench/watchdog.py: read + compile (no cache), one first decode (the
CPU plugin repacks the weights at the first inference), then --repeats timed decodes of random latents.
Reported: the compile + first decode time; the median decode time; the peak of compile + first decode
above the RSS before reading the model (VmHWM, reset with clear_refs at the start): what the decode phase
costs a low-mode worker, which compiles each phase's component for it and releases it after; what stays
held while the decoder is compiled (RSS after the first decode, a balanced or fast worker's cost); and what
a later decode adds to it (VmHWM reset before each, max over the repeats: OpenVINO reuses its buffers).
The inference precision is read back from the compiled model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("SDFLEET_BENCH_DIR", Path.home() / ".cache" / "sdfleet" / "bench")) / "taesd"
RESULTS = HERE / "results" / "taesd.jsonl"
MB = 1 << 20

sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from watchdog import guarded  # noqa: E402  (bench/ is a folder of scripts, not a package)

ROWS = ("full", "full, tiled", "tiny")


def _status() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def prepare() -> dict:
    """The two decoders' IR folders in CACHE (built once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    full, tiny = CACHE / "vae-full" / "vae_decoder" / "openvino_model.xml", CACHE / "taesd-ov"
    if not full.is_file():
        import openvino as ov
        import torch
        from fullsize import _vae

        from modeltools.export import convert_vae_decoder

        torch.manual_seed(0)
        model = convert_vae_decoder(_vae(512, scaling_factor=0.18215).eval(), 4)
        full.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, full, compress_to_fp16=True)
    if not tiny.is_dir():
        import torch
        from diffusers import AutoencoderTiny

        from modeltools.export import export_tiny_vae

        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(CACHE / "taesd-src")  # TAESD's published configuration
        export_tiny_vae(CACHE / "taesd-src", tiny)
    return {"full": str(full), "tiny": str(tiny / "vae_decoder" / "openvino_model.xml")}


def child(spec: dict) -> dict:
    """One row, in this (fresh) process."""
    import numpy as np
    import openvino as ov
    import torch

    from worker.meter import reset_high_water_mark
    from worker.pipelines import tiled_decode

    size, repeats = spec["size"], spec["repeats"]
    reset_high_water_mark()
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    core = ov.Core()
    compiled = core.compile_model(core.read_model(spec["xml"]), "CPU")
    request = compiled.create_infer_request()

    def decode(latent_sample):
        out = request.infer({"latent_sample": latent_sample.numpy()})
        return {"sample": torch.from_numpy(next(iter(out.values())).copy())}

    run = (lambda x: tiled_decode(decode, x)) if spec["tiled"] else decode
    rng = np.random.default_rng(0)
    latents = [torch.from_numpy(rng.standard_normal((1, 4, size // 8, size // 8), dtype=np.float32))
               for _ in range(repeats + 1)]
    image = run(latents[0])["sample"]
    first = time.perf_counter() - t0
    assert tuple(image.shape) == (1, 3, size, size), image.shape
    status = _status()
    first_peak, resident = status["VmHWM"] - before, status["VmRSS"] - before
    times, peaks = [], []
    for x in latents[1:]:
        rss = _status()["VmRSS"]
        reset_high_water_mark()
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
        peaks.append(_status()["VmHWM"] - rss)
    return {"first_s": round(first, 2), "decode_s": round(statistics.median(times), 3),
            "first_peak_mb": first_peak // MB, "resident_mb": resident // MB, "repeat_peak_mb": max(peaks) // MB,
            "precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}


def table(rows: list[dict]) -> str:
    out = ["| decoder | size | compile + first decode | decode (median) | vs full | peak of compile + first decode "
           "| vs full | held while compiled | a later decode adds | precision |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    full = {r["size"]: r for r in rows if r["row"] == "full"}
    for r in rows:
        base = full.get(r["size"])
        t = f"{r['decode_s'] / base['decode_s']:.3f}x" if base else "-"
        m = f"{r['first_peak_mb'] / base['first_peak_mb']:.3f}x" if base else "-"
        out.append(f"| {r['row']} | {r['size']} | {r['first_s']:.2f} s | {r['decode_s']:.3f} s | {t} "
                   f"| {r['first_peak_mb'] / 1024:.2f} GiB | {m} | {r['resident_mb'] / 1024:.2f} GiB "
                   f"| {r['repeat_peak_mb']} MiB | {r['precision']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-gb", type=float, default=12)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.table:
        print(table([json.loads(line) for line in RESULTS.read_text().splitlines()]))
        return 0
    xml = prepare()
    rows = []
    CACHE.mkdir(parents=True, exist_ok=True)
    for size in (int(s) for s in args.sizes.split(",")):
        for row in ROWS:
            if row == "full, tiled" and size <= 512:
                continue  # one tile: the whole decode
            spec = {"xml": xml["tiny" if row == "tiny" else "full"], "size": size, "repeats": args.repeats,
                    "tiled": row == "full, tiled"}
            log = CACHE / f"{row.replace(', ', '-')}-{size}.log"
            verdict = guarded([sys.executable, __file__, "--child", json.dumps(spec)], args.limit_gb, log, 1800)
            result = next((json.loads(line[7:]) for line in log.read_text().splitlines()
                           if line.startswith("RESULT ")), None)
            if result is None:
                print(f"{row} {size}: failed ({verdict}); see {log}", file=sys.stderr)
                continue
            rows.append({"row": row, "size": size, **result, "peak_process_mb": verdict["peak_process_mb"]})
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
