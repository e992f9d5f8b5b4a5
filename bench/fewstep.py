"""Few-step models at full size: seconds per image at 512x512 for SD 1.5 (20 steps, guidance 7.5), LCM
(4 steps, guidance 8.5: an embedding, no classifier-free batch), SD-Turbo and SDXL-Turbo (1 step, guidance 0),
each the fastsdcpu way (OVDiffusionPipeline.from_pretrained(IR, ov_config={"CACHE_DIR": ""}), the class read
from model_index.json, dynamic shapes, every component resident) beside sdfleet's worker code
(worker.pipelines.get_pipeline + generate + drop_weight_pages, as a worker's pool child runs them) in balanced and low
memory mode, with the process's peak RSS.

    .venv/bin/python bench/fewstep.py --prepare     # once: build + `sdfleet model export` what is missing
    .venv/bin/python bench/fewstep.py               # --arch sd15,lcm,sd-turbo,sdxl-turbo --rows fastsdcpu,balanced,low
    .venv/bin/python bench/fewstep.py --table       # reprint the table of bench/results/fewstep.jsonl
    .venv/bin/python bench/fewstep.py --export-table   # the exports' times and peaks (sdfleet_export.json)
    .venv/bin/python bench/fewstep.py --dry --arch sd15 --model-dir sd15=DIR   # a cheap check (64x64, 2 steps)

Each row runs in a fresh process under bench/watchdog.py (killed past --limit-gb): load, a first image (timed
from process start, imports included), then --images more images, each timed; s/image is their median,
s/step the median interval between denoising steps of those images (the first step of each image excluded,
as in bench/memory.py). sdfleet rows read OpenVINO's compile cache as a worker does after its first start:
each (model, mode) is run once unmeasured first (one 1-step image) to fill it. The IR folders are
~/.cache/sdfleet/bench/<arch>-fp16 (diffusers folders from bench/fullsize.py, exported by `sdfleet model export`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

T_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("SDFLEET_BENCH_DIR", Path.home() / ".cache" / "sdfleet" / "bench"))
RESULTS = HERE / "results" / "fewstep.jsonl"

sys.path.insert(0, str(HERE))
from memory import PROMPT, Sampler  # noqa: E402  (bench/ is a folder of scripts, not a package)
from watchdog import guarded  # noqa: E402

ARCHES = ("sd15", "lcm", "sd-turbo", "sdxl-turbo")
NAMES = {"sd15": "SD 1.5", "lcm": "LCM (SD 1.5)", "sd-turbo": "SD-Turbo (SD 2.1)", "sdxl-turbo": "SDXL-Turbo",
         "sdxl": "SDXL"}
# (SDXL: bench/modes.py's rows, at its own size)
JOBS = {"sd15": dict(steps=20, guidance=7.5), "lcm": dict(steps=4, guidance=8.5),
        "sd-turbo": dict(steps=1, guidance=0.0), "sdxl-turbo": dict(steps=1, guidance=0.0),
        "sdxl": dict(steps=20, guidance=5.0)}
SIZE = 512
SIZES = {"sdxl": 1024}  # an arch's own size where it is not SIZE
ROWS = ("fastsdcpu", "balanced", "low")  # "fastsdcpu" is the baseline of its arch; the others are memory modes


def _versions() -> dict:
    from importlib.metadata import version

    return {lib: version(lib) for lib in ("openvino", "optimum-intel", "diffusers")}


def child(spec: dict) -> dict:
    """One row, in this (fresh) process: load, a first image, then spec["images"] timed images."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sampler = Sampler()
    size, steps, guidance = spec["size"], spec["steps"], spec["guidance"]
    intervals: list[float] = []
    last = [0.0]
    counting = [False]

    def on_step(i, _total):
        now = time.perf_counter()
        if i > 1 and counting[0]:  # the first step of an image includes compiling or importing the UNet in low
            intervals.append(now - last[0])
        last[0] = now

    if spec["way"] == "fastsdcpu":
        import torch
        from optimum.intel import OVDiffusionPipeline

        pipe = OVDiffusionPipeline.from_pretrained(spec["model"], ov_config={"CACHE_DIR": ""})
        pipeline_class = type(pipe).__name__

        def cb(_p, i, _t, tensors):
            on_step(i + 1, steps)
            return tensors

        def make(seed: int):
            return pipe(prompt=PROMPT, width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                        num_images_per_prompt=1, generator=torch.Generator("cpu").manual_seed(seed),
                        callback_on_step_end=cb).images[0]

        def precision():
            return pipe.unet.request.get_property("INFERENCE_PRECISION_HINT").to_string()
    else:
        sys.path.insert(0, str(ROOT))
        from shared.settings import Settings
        from worker.pipelines import ImageRequest, get_pipeline

        settings = Settings(model=spec["model"], memory_mode=spec["mode"], cache_dir=spec["cache_dir"])
        pipeline = get_pipeline(settings)  # what a worker's pool child does: load, warm up, drop weight pages
        pipeline_class = type(getattr(pipeline, "_pipe", pipeline)).__name__

        def make(seed: int):
            image = pipeline.generate(ImageRequest(PROMPT, None, size, size, steps, guidance, seed), on_step)
            pipeline.release_buffers()  # what the worker does after each job
            pipeline.drop_weight_pages()
            return image

        def precision():
            return pipeline.precision

    load_s = time.perf_counter() - T_START
    last[0] = time.perf_counter()
    image = make(0)
    first_image = time.perf_counter() - T_START
    assert image.size == (size, size), image.size
    image_times = []
    counting[0] = True
    for seed in range(1, spec["images"] + 1):
        t0 = last[0] = time.perf_counter()
        image = make(seed)
        image_times.append(time.perf_counter() - t0)
        assert image.size == (size, size), image.size
    status = Sampler.read()
    peak, anon, file_ = sampler.best
    return {"peak_mb": max(status["VmHWM"], peak) >> 20, "anon_mb": anon >> 20, "file_mb": file_ >> 20,
            "end_anon_mb": status["RssAnon"] >> 20, "end_file_mb": status["RssFile"] >> 20,
            "load_s": round(load_s, 1), "first_image_s": round(first_image, 1),
            "image_s": [round(t, 2) for t in image_times],
            "s_per_image": round(statistics.median(image_times), 2) if image_times else None,
            "s_per_step": round(statistics.median(intervals), 3) if intervals else None,
            "precision": precision(), "pipeline_class": pipeline_class, **_versions()}


def spec_for(arch: str, row: str, args) -> dict:
    job = dict(JOBS[arch])
    if args.steps:
        job["steps"] = min(job["steps"], args.steps)
    models = dict(m.split("=", 1) for m in args.model_dir or [])
    return {"arch": arch, "row": row, "way": "fastsdcpu" if row == "fastsdcpu" else "sdfleet",
            "mode": None if row == "fastsdcpu" else row, "size": args.size, "images": args.images, **job,
            "model": models.get(arch, str(CACHE / f"{arch}-fp16")), "cache_dir": str(args.cache_dir)}


def run_row(spec: dict, limit_gb: float, tag: str = "", timeout_s: float = 7200) -> dict:
    log = CACHE / "logs" / f"fewstep-{spec['arch']}-{spec['row']}{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    verdict = guarded([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], limit_gb, log,
                      timeout_s=timeout_s, cwd=ROOT)
    text = log.read_text(errors="replace").splitlines()
    result = next((json.loads(x[7:]) for x in reversed(text) if x.startswith("RESULT ")), None)
    row = {**spec, "killed": verdict["killed"], "rc": verdict["rc"], "elapsed_s": verdict["elapsed_s"],
           "at": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if result:
        row.update(result)
    else:
        row.update(peak_mb=verdict["peak_process_mb"], error="\n".join(text[-8:]))
    return row


def _gib(mb) -> str:
    return f"{mb / 1024:.2f} GiB"


def table(rows: list[dict]) -> str:
    latest = {}  # a row retried in the same run: its last attempt
    for r in rows:
        latest[(r.get("run"), r["arch"], r["row"])] = r
    rows = list(latest.values())
    out = ["| model | row | steps | guidance | precision | peak RSS | anon / file at peak | first image | "
           "timed images | s/image (median) | s/step | peak vs fastsdcpu | s/image vs fastsdcpu |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # the fastsdcpu way on the same arch in the same run (the same invocation)
        base = next((b for b in rows if b["row"] == "fastsdcpu" and b["arch"] == r["arch"]
                     and b.get("run") == r.get("run") and b.get("s_per_image")), None)
        ok = bool(r.get("s_per_image")) and not r.get("error")
        if r.get("killed"):
            peak = f"killed past {_gib(r['peak_mb'])}"
        elif not ok:
            peak = "failed"
        else:
            peak = _gib(r["peak_mb"])
        split = f"{r['anon_mb'] / 1024:.2f} / {r['file_mb'] / 1024:.2f} GiB" if ok else ""
        peak_ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base and ok else ""
        time_ratio = f"{r['s_per_image'] / base['s_per_image']:.2f}x" if base and ok else ""
        first = f"{r['first_image_s']:.1f} s" if ok else ""
        per_image = f"{r['s_per_image']:.1f} s" if ok else ""
        per_step = f"{r['s_per_step']:.2f} s" if ok and r.get("s_per_step") else ""
        out.append(f"| {NAMES.get(r['arch'], r['arch'])} {r['size']}px | {r['row']} | {r['steps']} | {r['guidance']} | "
                   f"{r.get('precision', '') if ok else ''} | {peak} | {split} | "
                   f"{first} | {len(r.get('image_s') or [])} | {per_image} | {per_step} | {peak_ratio} | "
                   f"{time_ratio} |")
    return "\n".join(out)


def export_table(arches) -> str:
    """What `sdfleet model export` measured for each IR (its sdfleet_export.json)."""
    out = ["| model | export time | export peak RSS (largest step) | steps (s / peak MB) | IR on disk |",
           "|---|---|---|---|---|"]
    for arch in arches:
        ir = CACHE / f"{arch}-fp16"
        try:
            stamp = json.loads((ir / "sdfleet_export.json").read_text())
        except (OSError, ValueError):
            continue
        disk = sum(p.stat().st_size for p in ir.rglob("*") if p.is_file())
        steps = "; ".join(f"{k.removeprefix('convert ')} {v['seconds']:.0f} s / {v['peak_mb']}"
                          for k, v in stamp["steps"].items())
        out.append(f"| {NAMES.get(arch, arch)} | {stamp['seconds']:.0f} s | {stamp['peak_mb'] / 1024:.1f} GiB | "
                   f"{steps} | {disk / 2**30:.1f} GiB |")
    return "\n".join(out)


def prepare(arches, limit_gb: float) -> int:
    """Build (bench/fullsize.py) and export (`sdfleet model export`, fp16) each arch that is missing, one at a
    time, each under the watchdog. Returns the number of arches that failed."""
    failed = 0
    sdfleet = Path(sys.executable).parent / "sdfleet"
    for arch in arches:
        src, ir = CACHE / f"{arch}-torch", CACHE / f"{arch}-fp16"
        if not (src / "model_index.json").is_file():
            shutil.rmtree(src, ignore_errors=True)
            r = guarded([sys.executable, str(HERE / "fullsize.py"), "build", arch, str(src)], limit_gb,
                        CACHE / f"build-{arch}.log")
            print(json.dumps({"build": arch, **r}), flush=True)
            if r["rc"] != 0 or r["killed"]:
                failed += 1
                continue
        if not (ir / "unet" / "openvino_model.xml").is_file():
            shutil.rmtree(ir, ignore_errors=True)
            r = guarded([str(sdfleet), "model", "export", str(src), str(ir)], limit_gb,
                        CACHE / f"export-{arch}-fp16.log", timeout_s=3600)
            print(json.dumps({"export": arch, **r}), flush=True)
            if r["rc"] != 0 or r["killed"]:
                failed += 1
    print(export_table(arches))
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=",".join(ARCHES))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--limit-gb", type=float, default=21.0)
    ap.add_argument("--timeout", type=float, default=7200, help="seconds a row may take before it is killed")
    ap.add_argument("--images", type=int, default=3, help="timed images after the first (s/image: their median)")
    ap.add_argument("--size", type=int, default=SIZE)
    ap.add_argument("--steps", type=int, help="at most this many steps (checks only)")
    ap.add_argument("--model-dir", action="append", metavar="ARCH=DIR", help="another IR folder for an arch")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--cache-dir", type=Path, default=CACHE / "ov-cache-fewstep",
                    help="sdfleet rows' cache_dir (compiled blobs in its ov-cache/); emptied at the start of a run")
    ap.add_argument("--dry", action="store_true",
                    help="a cheap check: 64x64, at most 2 steps, 1 timed image, results to /tmp/fewstep-dry.jsonl")
    ap.add_argument("--retries", type=int, default=2, help="retries of a failed sdfleet row, at the end of the run")
    ap.add_argument("--retry-wait", type=float, default=1200, help="seconds from a row's failure to its retry")
    ap.add_argument("--status", type=Path, help="append failures and progress to this markdown file")
    ap.add_argument("--prepare", action="store_true", help="build and export the missing IR folders, then stop")
    ap.add_argument("--export-table", action="store_true", help="print the exports' table (sdfleet_export.json)")
    ap.add_argument("--table", action="store_true", help="print the table of the rows in --results")
    ap.add_argument("--child")
    args = ap.parse_args()
    arches = args.arch.split(",")
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.table:
        print(table([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]))
        return 0
    if args.export_table:
        print(export_table(arches))
        return 0
    if args.prepare:
        return 1 if prepare(arches, args.limit_gb) else 0
    if args.dry:
        args.size, args.steps, args.images = 64, args.steps or 2, 1
        args.results = Path("/tmp/fewstep-dry.jsonl")
        args.cache_dir = CACHE / "ov-cache-fewstep-dry"

    def note(text: str) -> None:
        print(text, flush=True)
        if args.status:
            with open(args.status, "a") as f:
                f.write(f"- {time.strftime('%H:%M', time.gmtime())} UTC fewstep: {text}\n")

    args.results.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.cache_dir, ignore_errors=True)  # every run fills its own compile cache (primed below)
    run = f"{time.strftime('%Y-%m-%dT%H:%M', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    rows, primed, retry = [], set(), []

    def measure(spec: dict, tag: str = "") -> dict:
        if spec["way"] == "sdfleet" and (spec["model"], spec["mode"]) not in primed:
            t0 = time.time()
            # one unmeasured first image of one step: fills the compile cache, as a worker's first start does
            # (dynamic shapes: the compiled blobs do not depend on the job's steps)
            prime = run_row({**spec, "images": 0, "steps": 1}, args.limit_gb, "-prime" + tag, args.timeout)
            note(f"primed {spec['arch']} {spec['row']} in {time.time() - t0:.0f} s"
                 + (f" (FAILED: {prime.get('error', '')[-300:]})" if prime.get("error") else ""))
            if prime.get("error"):
                row = {**prime, "images": spec["images"], "steps": spec["steps"], "run": run,
                       "error": "priming: " + prime["error"]}
            else:
                primed.add((spec["model"], spec["mode"]))
        if (spec["model"], spec["mode"]) in primed or spec["way"] == "fastsdcpu":
            row = {**run_row(spec, args.limit_gb, tag, args.timeout), "run": run}
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        summary = {k: row.get(k) for k in ("arch", "row", "peak_mb", "first_image_s", "s_per_image", "s_per_step",
                                           "precision", "killed")}
        note(f"FAILED {json.dumps(summary)}: {row['error'][-600:]}" if row.get("error") else json.dumps(summary))
        return row

    for arch in arches:
        for name in args.rows.split(","):
            spec = spec_for(arch, name, args)
            if not Path(spec["model"], "model_index.json").is_file():
                note(f"skipping {arch} {name}: no {spec['model']} (run bench/fewstep.py --prepare)")
                continue
            row = measure(spec)
            rows.append(row)
            if row.get("error") and not row.get("killed") and spec["way"] == "sdfleet":
                retry.append((time.time(), spec, 0, len(rows) - 1))
    retry = [r for r in retry if args.retries > 0]
    while retry:
        failed_at, spec, n, index = retry.pop(0)
        time.sleep(max(0.0, failed_at + args.retry_wait - time.time()))
        note(f"retry {n + 1} of {spec['arch']} {spec['row']}")
        primed.discard((spec["model"], spec["mode"]))
        row = measure(spec, f"-retry{n + 1}")
        if row.get("error") and n + 1 < args.retries:
            retry.append((time.time(), spec, n + 1, index))
        if not row.get("error"):
            rows[index] = row
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
