"""Image-to-image, inpainting and upscaling beside text-to-image on full-size architectures (random weights):
a real worker (its own process, its tree killed past the memory limit) in one memory mode, a real API (SQLite,
the bundled Redis), and per size the same prompt as text-to-image, then image-to-image (strength 0.75) and
inpainting of the text-to-image job's own output, then an upscale (2x) of a half-size image: each job's peak
RSS, its generation (= its first image: one image a job), seconds per UNet pass of its denoising steps (from
the memory profile its shape taught), and what admission predicted at submit against the measured peak. The
worker starts with an empty database: the first text-to-image job is predicted by the prior, each mode's
first image job from text-to-image's profiles and the encode prior, the later ones from their own.

    .venv/bin/python bench/image_modes.py [--arch sd15,sdxl] [--modes low,balanced] [--limit-gb 21]

Needs the fp16 IR folders that bench/export_bench.py (or bench/fewstep.py --prepare) leaves in
~/.cache/sdfleet/bench. Appends every row to bench/results/image_modes.jsonl and prints a markdown table;
--table reprints it.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from predictions import GIB, bench_stack  # noqa: E402  (bench/ is a folder of scripts)
from sdfleet.client import Client  # noqa: E402

RESULTS = HERE / "results" / "image_modes.jsonl"
PROMPT = "a lighthouse on a cliff in a storm, oil painting"
STEPS = {"sd15": 8, "sdxl": 4}  # text-to-image steps; image jobs take 4/3 of them at strength 0.75: as many run
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0}
SIZES = (512, 1024)


def _mask(size: int) -> str:
    import io

    from PIL import Image

    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _step_s(client: Client, model: str, mode: str, width: int, height: int, guidance_scale: float, encodes: bool):
    for m in client.models():
        if m["name"] != model:
            continue
        guidance = m["defaults"]["guidance_doubles_batch"] and guidance_scale > 1
        for p in m.get("profiles", []):
            if (p.get("memory_mode") == mode and p["width"] == width and p["height"] == height
                    and p["guidance"] == guidance and p.get("encodes", False) == encodes):
                return p.get("step_s")
    return None


def run(arch: str, mode: str, limit_gb: float, sizes: tuple[int, ...], steps: int | None = None) -> list[dict]:
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    rows = []
    with bench_stack(arch, mode, limit_gb, "img", timeout_s=6000, SDFLEET_MAX_IMAGE_PIXELS=str(2048 ** 2)) as stack:
        client, guard, work = stack.client, stack.guard, stack.work

        def job(kind: str, size: int, **body) -> dict:
            (w,) = client.workers()
            r = client.http.post("/v1/jobs", json={"prompt": PROMPT, "seed": 1, "guidance_scale": GUIDANCE[arch],
                                                   **body})
            if r.status_code != 202:
                raise SystemExit(f"{kind} {size}: {r.status_code} {r.text[:300]}")
            done = client.wait(r.json()["id"], timeout=6000, poll_s=1)
            if done["status"] != "succeeded":
                raise SystemExit(f"{kind} {size}: {done['error']} ({guard.killed or 'not killed'}); see {work}")
            p = done["parameters"]
            shape = (p["tile"], p["tile"]) if kind == "upscale" else (p["width"], p["height"])
            step = _step_s(client, arch, w["memory_mode"], *shape, p["guidance_scale"], kind != "txt2img")
            row = {"run": run_id, "arch": arch, "mode": mode, "precision": w["precision"], "kind": kind,
                   "size": f"{p['width']}x{p['height']}", "tile": p["tile"], "steps": p["steps"],
                   "strength": p["strength"], "generation_s": done["generation_s"], "step_s": step,
                   "source": done["prediction_source"], "predicted_bytes": done["predicted_peak_bytes"],
                   "measured_bytes": done["peak_rss_bytes"],
                   "ratio": round(done["predicted_peak_bytes"] / done["peak_rss_bytes"], 3),
                   "resident_bytes": w["resident_bytes"], "at": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
            rows.append(row)
            RESULTS.parent.mkdir(exist_ok=True)
            with open(RESULTS, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            return done

        steps = steps or STEPS[arch]
        image_steps = math.ceil(steps / 0.75)  # int(image_steps x 0.75) = steps: as many denoising steps
        for size in sizes:
            t2i = job("txt2img", size, width=size, height=size, steps=steps)
            ref = {"job_id": t2i["id"], "index": 0}
            job("img2img", size, image=ref, strength=0.75, steps=image_steps)
            job("inpaint", size, image=ref, mask=_mask(size), strength=0.75, steps=image_steps)
        half = job("txt2img", sizes[-1] // 2, width=sizes[-1] // 2, height=sizes[-1] // 2, steps=steps)
        job("upscale", sizes[-1], image={"job_id": half["id"], "index": 0}, upscale=2, steps=image_steps,
            strength=0.75)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | mode, precision | job | size (tile) | steps run | peak | first image | s / UNet pass | "
           "predicted (source) | predicted / measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        run_steps = r["steps"] if r["kind"] == "txt2img" else int(r["steps"] * r["strength"])
        out.append(f"| {r['arch']} | {r['mode']}, {r['precision']} | {r['kind']} | {r['size']}"
                   f"{' (' + str(r['tile']) + ')' if r['tile'] else ''} | {run_steps} | "
                   f"{r['measured_bytes'] / GIB:.2f} GiB | {r['generation_s']:.1f} s | "
                   f"{'%.2f s' % r['step_s'] if r['step_s'] else '-'} | {r['predicted_bytes'] / GIB:.2f} GiB "
                   f"({r['source']}) | {r['ratio']:.2f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15,sdxl")
    ap.add_argument("--modes", default="low,balanced")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--limit-gb", type=float, default=21.0)
    ap.add_argument("--steps", type=int, help="text-to-image steps (default: SD 1.5 8, SDXL 4); memory does not "
                    "depend on them, time per step is per UNet pass")
    ap.add_argument("--table", action="store_true", help="print the table of results/image_modes.jsonl")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]))
        return 0
    rows = []
    for arch in args.arch.split(","):
        for mode in args.modes.split(","):
            rows += run(arch, mode, args.limit_gb, tuple(int(s) for s in args.sizes.split(",")), args.steps)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
