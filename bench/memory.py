"""Memory matrix: the same job, each row in a fresh process under the memory watchdog, the fastsdcpu way
(OVStableDiffusion[XL]Pipeline.from_pretrained(IR, ov_config={"CACHE_DIR": ""}), dynamic shapes, every
component resident, N images in one batch) beside sdfleet's worker code (worker.pipelines.get_pipeline: load,
warm-up, levers; N images as N passes) in each memory mode and with each lever.

    .venv/bin/python bench/memory.py [--arch sd15,sdxl] [--rows NAME,...] [--limit-gb 21] [--rounds N]

Needs the IR folders that bench/export_bench.py leaves in ~/.cache/sdfleet/bench. Appends every row to
bench/results/memory.jsonl and prints a markdown table. Columns: peak RSS of the process (the kernel's VmHWM,
load included), the anonymous / file-backed split at the sampled peak, time from process start to the first
image, seconds per denoising step (median, first step of each image excluded), and the ratio to the fastsdcpu
way's peak for the same job in the same run. sdfleet rows whose components are compiled per phase read the
compile cache: a row of that kind is run once unmeasured first to fill it, as a worker's first start does
(the "cold cache" row shows that first start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("SDFLEET_BENCH_DIR", Path.home() / ".cache" / "sdfleet" / "bench"))
RESULTS = HERE / "results" / "memory.jsonl"

sys.path.insert(0, str(HERE))
from watchdog import guarded  # noqa: E402  (bench/ is a folder of scripts, not a package)
PROMPT = "a lighthouse on a cliff in a storm, oil painting"
JOBS = {"sd15": dict(size=512, steps=3), "sdxl": dict(size=1024, steps=2)}

# name: (way, overrides). way "fastsdcpu" or "sdfleet"; overrides: weights, precision, guidance, images,
# mode, backend, static, cold, split (split_guidance: None = the mode's own; low splits, the others do not),
# levers (other Settings fields, e.g. one lever set against the mode)
ROWS = {
    "fastsdcpu": ("fastsdcpu", {}),
    "fastsdcpu g7.5": ("fastsdcpu", {"guidance": 7.5}),
    "fastsdcpu g7.5 x4": ("fastsdcpu", {"guidance": 7.5, "images": 4}),
    "fastsdcpu int8": ("fastsdcpu", {"weights": "int8"}),
    "fastsdcpu f32": ("fastsdcpu", {"precision": "f32"}),
    "fast": ("sdfleet", {"mode": "fast"}),
    "balanced": ("sdfleet", {"mode": "balanced"}),
    "low cold cache": ("sdfleet", {"mode": "low", "cold": True}),
    "low": ("sdfleet", {"mode": "low"}),
    "low g7.5": ("sdfleet", {"mode": "low", "guidance": 7.5}),
    "low g7.5 unsplit": ("sdfleet", {"mode": "low", "guidance": 7.5, "split": False}),
    "low g7.5 x4": ("sdfleet", {"mode": "low", "guidance": 7.5, "images": 4}),
    "low static": ("sdfleet", {"mode": "low", "static": True}),
    "low -drop_file_pages": ("sdfleet", {"mode": "low", "levers": {"drop_file_pages": False}}),
    "low -release_all": ("sdfleet", {"mode": "low", "levers": {"release_all": False}}),
    "low -vae_tiles": ("sdfleet", {"mode": "low", "levers": {"vae_tiles": False}}),
    "low -split_guidance": ("sdfleet", {"mode": "low", "levers": {"split_guidance": False}}),
    # TAESD's published architecture at full size, as bench/taesd.py exports it (run that first)
    "low tiny_vae": ("sdfleet", {"mode": "low", "levers": {"tiny_vae": str(CACHE / "taesd" / "taesd-ov")}}),
    "low int8": ("sdfleet", {"mode": "low", "weights": "int8"}),
    "low f32": ("sdfleet", {"mode": "low", "precision": "f32"}),
    "low f32 g7.5": ("sdfleet", {"mode": "low", "precision": "f32", "guidance": 7.5}),
    "low f32 g7.5 unsplit": ("sdfleet", {"mode": "low", "precision": "f32", "guidance": 7.5, "split": False}),
    "low int8 f32": ("sdfleet", {"mode": "low", "weights": "int8", "precision": "f32"}),
    "low int8 f32 g7.5": ("sdfleet", {"mode": "low", "weights": "int8", "precision": "f32", "guidance": 7.5}),
    "low int8 f32 g7.5 unsplit": ("sdfleet", {"mode": "low", "weights": "int8", "precision": "f32", "guidance": 7.5,
                                              "split": False}),
    # `sdfleet model export --weight-format int8-hybrid` (bench/export_bench.py --formats int8-hybrid): the UNet's
    # convolutions quantized fully, so that they stay 8-bit at f32 where an int8 IR's are decompressed
    "low int8-hybrid": ("sdfleet", {"mode": "low", "weights": "int8-hybrid"}),
    "low int8-hybrid f32": ("sdfleet", {"mode": "low", "weights": "int8-hybrid", "precision": "f32"}),
    "low int8-hybrid f32 g7.5": ("sdfleet", {"mode": "low", "weights": "int8-hybrid", "precision": "f32",
                                             "guidance": 7.5}),
    "genai balanced": ("sdfleet", {"mode": "balanced", "backend": "genai"}),
}
BASELINES = ("fastsdcpu", "fastsdcpu g7.5", "fastsdcpu g7.5 x4")
DEFAULT_ROWS = {
    "sd15": ["fastsdcpu g7.5", "fastsdcpu g7.5 x4", "fastsdcpu", "fast", "balanced", "low g7.5", "low g7.5 x4",
             "low", "low static", "low int8", "fastsdcpu int8", "low f32", "fastsdcpu f32", "genai balanced"],
    "sdxl": ["fastsdcpu", "fastsdcpu g7.5", "fast", "balanced", "low cold cache", "low", "low g7.5", "low int8",
             "fastsdcpu int8", "low f32", "fastsdcpu f32", "genai balanced"],
}


class Sampler:
    """RssAnon and RssFile every 20 ms; the split at the largest sampled total."""

    def __init__(self):
        self.best = (0, 0, 0)
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def read() -> dict:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

    def _run(self):
        while True:
            s = self.read()
            if s["VmRSS"] > self.best[0]:
                self.best = (s["VmRSS"], s["RssAnon"], s["RssFile"])
            time.sleep(0.02)


def child(spec: dict) -> dict:
    """One row, in this (fresh) process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sampler = Sampler()
    size, steps, n = spec["size"], spec["steps"], spec["images"]
    step_times: list[float] = []
    last = [0.0]

    def on_step(i, _total):
        now = time.perf_counter()
        if i > 1:  # the first step of an image includes compiling or importing the UNet in some modes
            step_times.append(now - last[0])
        last[0] = now

    first_image = None
    if spec["way"] == "fastsdcpu":
        import torch
        from optimum.intel import OVDiffusionPipeline

        config = {"CACHE_DIR": ""}
        if spec["precision"] != "auto":
            config["INFERENCE_PRECISION_HINT"] = spec["precision"]
        pipe = OVDiffusionPipeline.from_pretrained(spec["model"], ov_config=config)
        precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string() if pipe.unet.request \
            else spec["precision"]

        def cb(_p, i, _t, tensors):
            on_step(i + 1, steps)
            return tensors

        last[0] = time.perf_counter()
        images = pipe(prompt=PROMPT, width=size, height=size, num_inference_steps=steps,
                      guidance_scale=spec["guidance"], num_images_per_prompt=n,
                      generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=cb).images
        first_image = time.perf_counter() - T_START
        precision = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string()
        assert len(images) == n and images[0].size == (size, size)
    else:
        sys.path.insert(0, str(ROOT))
        from shared.settings import Settings
        from worker.pipelines import ImageRequest, get_pipeline

        settings = Settings(model=spec["model"], backend=spec["backend"], memory_mode=spec["mode"],
                            static_shape=spec["static"], inference_precision=spec["precision"],
                            cache_dir=spec["cache_dir"], split_guidance=spec.get("split"), **spec.get("levers", {}))
        pipeline = get_pipeline(settings)  # what a worker's pool child does: load, warm up, drop weight pages
        precision = pipeline.precision
        for i in range(n):
            last[0] = time.perf_counter()
            image = pipeline.generate(ImageRequest(PROMPT, None, size, size, steps, spec["guidance"], i), on_step)
            pipeline.drop_weight_pages()
            first_image = first_image or time.perf_counter() - T_START
            assert image.size == (size, size)
    status = Sampler.read()
    peak, anon, file_ = sampler.best
    return {"peak_mb": max(status["VmHWM"], peak) >> 20, "anon_mb": anon >> 20, "file_mb": file_ >> 20,
            "end_anon_mb": status["RssAnon"] >> 20, "end_file_mb": status["RssFile"] >> 20,
            "first_image_s": round(first_image, 1),
            "s_per_step": round(statistics.median(step_times), 2) if step_times else None,
            "precision": precision}


def spec_for(arch: str, name: str) -> dict:
    way, over = ROWS[name]
    spec = {"arch": arch, "row": name, "way": way, "weights": "fp16", "precision": "auto", "guidance": 1.0,
            "images": 1, "mode": None, "backend": "optimum", "static": False, "cold": False, "split": None,
            **JOBS[arch], **over}
    spec["model"] = str(CACHE / f"{arch}-{spec['weights']}")
    spec["cache_dir"] = str(CACHE / ("ov-cache-cold" if spec["cold"] else "ov-cache"))
    return spec


def run_row(spec: dict, limit_gb: float) -> dict:
    log = CACHE / "logs" / f"memory-{spec['arch']}-{spec['row'].replace(' ', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    verdict = guarded([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], limit_gb, log,
                      timeout_s=2400, cwd=ROOT)
    text = log.read_text().splitlines()
    result = next((json.loads(x[7:]) for x in reversed(text) if x.startswith("RESULT ")), None)
    row = {**spec, "killed": verdict["killed"], "rc": verdict["rc"], "at": time.strftime("%Y-%m-%d %H:%M")}
    if result:
        row.update(result)
    else:
        row.update(peak_mb=verdict["peak_process_mb"], error="\n".join(text[-5:]))
    return row


def combine(results: list[dict]) -> dict:
    """One row measured in several rounds: the median of each figure (the anon / file split of the round whose
    peak is the median), and every round's figures under "per_round" for ratios taken round by round."""
    ok = [r for r in results if not r.get("error") and not r.get("killed")]
    if len(results) == 1 or not ok:
        return results[-1]
    mid = sorted(ok, key=lambda r: r["peak_mb"])[(len(ok) - 1) // 2]
    row = dict(mid, rounds=len(results), failed_rounds=len(results) - len(ok))
    for key in ("peak_mb", "first_image_s", "s_per_step"):
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key] = round(statistics.median(values), 2) if values else None
    row["per_round"] = [{k: r.get(k) for k in ("peak_mb", "first_image_s", "s_per_step", "killed", "error")}
                        for r in results]
    return row


def _vs(r: dict, base: dict, key: str) -> str:
    """r's figure over the baseline's: the median of the per-round ratios when both ran in the same rounds."""
    pairs = list(zip(r.get("per_round") or [r], base.get("per_round") or [base]))
    if len(r.get("per_round") or [r]) != len(base.get("per_round") or [base]):
        pairs = [(r, base)]
    ratios = [a[key] / b[key] for a, b in pairs if a.get(key) and b.get(key)
              and not any(x.get("killed") or x.get("error") for x in (a, b))]
    return f"{statistics.median(ratios):.2f}x" if ratios else ""


def table(rows: list[dict]) -> str:
    out = ["| model | row | weights | precision | guidance | images | rounds | peak RSS | anon / file at peak | "
           "first image | s/step | vs fastsdcpu (peak / s/step / first image) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        # the fastsdcpu way's default (fp16 IR, the CPU's precision) for the same guidance and image count; of
        # several (--table over many runs), the nearest in the list: the same run's
        base = min((j for j, b in enumerate(rows) if b["row"] in BASELINES and b["arch"] == r["arch"]
                    and not b.get("killed") and not b.get("error") and b["guidance"] == r["guidance"]
                    and b["images"] == r["images"]), key=lambda j: abs(j - i), default=None)
        base = rows[base] if base is not None else None
        peak = r.get("peak_mb")
        if r.get("killed"):
            shown = f"killed past {peak / 1024:.1f} GiB"
        elif r.get("error"):
            shown = "failed"
        else:
            shown = f"{peak / 1024:.1f} GiB"
        split = f"{r['anon_mb'] / 1024:.1f} / {r['file_mb'] / 1024:.1f} GiB" if "anon_mb" in r else ""
        ratio = " / ".join(_vs(r, base, k) for k in ("peak_mb", "s_per_step", "first_image_s")) \
            if base and peak and not r.get("error") and not r.get("killed") else ""
        out.append(f"| {r['arch']} {JOBS[r['arch']]['size']}px | {r['row']} | {r['weights']} | "
                   f"{r.get('precision', r['precision'])} | {r['guidance']} | {r['images']} | {r.get('rounds', 1)} | "
                   f"{shown} | {split} | {r.get('first_image_s', '')} s | {r.get('s_per_step') or ''} | {ratio} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15,sdxl")
    ap.add_argument("--rows", help="comma-separated row names (default: the arch's matrix)")
    ap.add_argument("--limit-gb", type=float, default=21.0)
    ap.add_argument("--steps", type=int, help="denoising steps per image (default: the arch's, SD 1.5 3, SDXL 2)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every row this many times, the rows alternated; the table shows medians")
    ap.add_argument("--child")
    ap.add_argument("--table", action="store_true", help="print the table of the rows in results/memory.jsonl "
                    "(with --rounds N: of results/memory-rounds.jsonl)")
    args = ap.parse_args()
    if args.table:  # every row measured; with --rounds N (N > 1), the combined rows of the runs in rounds
        source = RESULTS.with_name("memory-rounds.jsonl") if args.rounds > 1 else RESULTS
        print(table([json.loads(line) for line in source.read_text().splitlines()]))
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    RESULTS.parent.mkdir(exist_ok=True)
    rows, primed = [], set()
    for arch in args.arch.split(","):
        measured: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):  # the rows alternate: round 1 of each row, then round 2, ...
            for name in (args.rows.split(",") if args.rows else DEFAULT_ROWS[arch]):
                spec = spec_for(arch, name)
                if args.steps:
                    spec["steps"] = args.steps
                if not Path(spec["model"]).is_dir():
                    print(f"skipping {arch} {name}: no {spec['model']} (run bench/export_bench.py)", flush=True)
                    continue
                if spec["cold"]:
                    shutil.rmtree(CACHE / "ov-cache-cold", ignore_errors=True)
                key = (spec["model"], spec["precision"], spec["backend"], spec["static"])
                if spec["way"] == "sdfleet" and not spec["cold"] and key not in primed:
                    run_row({**spec, "images": 1, "guidance": 1.0}, args.limit_gb)  # fills the compile cache
                    primed.add(key)
                row = run_row({**spec, "round": round_ + 1}, args.limit_gb)
                measured.setdefault(name, []).append(row)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: row.get(k) for k in ("arch", "row", "round", "peak_mb", "anon_mb", "file_mb",
                                                          "first_image_s", "s_per_step", "precision", "killed",
                                                          "error")}), flush=True)
        rows += [combine(results) for results in measured.values()]
    if args.rounds > 1:
        with open(RESULTS.with_name("memory-rounds.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
