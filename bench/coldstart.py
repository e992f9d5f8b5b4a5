"""Time to the first image on a cold worker: a real worker (its own process, an API, SQLite, the bundled Redis)
started three ways in a row, each submitting one short job at the model's own size and guidance:
- **empty cache**: a compile cache (SDFLEET_CACHE_DIR) that holds nothing: every component compiles from the IR;
- **warm cache**: the same cache again, as every later start of a worker finds it;
- **hub ID**: the model named by a hub ID (`bench/<arch>`), found in a local Hugging Face cache (HF_HOME, laid
  out as huggingface_hub lays out a download, the IR's files hard-linked; HF_HUB_OFFLINE=1), warm cache.
Reported: the worker's start to its first heartbeat `ready` (the API's start beside it), what its log says of
that (loading the pipeline; the warm-up, one per lever set), the first job's generation, and the first image
from the worker's start (ready + the job's wait and generation).

    .venv/bin/python bench/coldstart.py [--arch sd15,sdxl,sdxl-turbo] [--modes balanced,auto] [--steps 2]
    .venv/bin/python bench/coldstart.py --table      # reprint each model's newest run (bench/results/coldstart.jsonl)

Needs the IR folders of bench/fewstep.py --prepare.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fewstep import NAMES  # noqa: E402  (bench/ is a folder of scripts)
from memory import PROMPT  # noqa: E402
from predictions import CACHE, bench_stack, keep_row, newest_run  # noqa: E402

RESULTS = HERE / "results" / "coldstart.jsonl"
NAMES = {**NAMES, "sdxl": "SDXL"}
LOADED = re.compile(r"loaded .* in ([\d.]+) s")
WARMED = re.compile(r"warm-up in ([\d.]+) s")


def hub_home(arch: str, home: Path) -> str:
    """The arch's IR in a Hugging Face cache under `home`, as `bench/<arch>` at one commit: blobs hard-linked
    to the IR's files (named by path and size: nothing here is downloaded or checked against a hash)."""
    repo_id, commit = f"bench/{arch}", "5d" * 20
    ir = CACHE / f"{arch}-fp16"
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    for path in sorted(p for p in ir.rglob("*") if p.is_file()):
        rel = path.relative_to(ir)
        blob = repo / "blobs" / f"{str(rel).replace('/', '--')}-{path.stat().st_size}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            os.link(path, blob)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo_id


def start(arch: str, mode: str, row: str, steps: int, limit_gb: float, **settings) -> dict:
    t0 = time.monotonic()
    with bench_stack(arch, mode, limit_gb, "coldstart", **settings) as stack:
        ready_s = time.monotonic() - t0
        (w,) = stack.client.workers()
        defaults = w["defaults"]
        submitted = time.monotonic()
        record = stack.client.wait(stack.client.submit(prompt=PROMPT, steps=steps, seed=1)["id"], timeout=3000,
                                   poll_s=0.5)
        first_s = ready_s + time.monotonic() - submitted
        if record["status"] != "succeeded":
            raise SystemExit(f"{arch} {row}: {record['error']}; see {stack.work}")
        log = (stack.work / "worker.log").read_text(errors="replace")
    return {"arch": arch, "mode": mode, "row": row, "precision": w["precision"], "memory_mode": w["memory_mode"],
            "size": f"{defaults['width']}x{defaults['height']}", "guidance": defaults["guidance_scale"],
            "steps": steps, "ready_s": round(ready_s, 1),
            "load_s": [float(x) for x in LOADED.findall(log)], "warm_up_s": [float(x) for x in WARMED.findall(log)],
            "generation_s": record["generation_s"], "first_image_s": round(first_s, 1),
            "peak_bytes": record["peak_rss_bytes"]}


def table(rows: list[dict]) -> str:
    out = ["| model | mode, precision | start | worker ready | of it: load, warm-up(s) | first job (generation) | "
           "first image from the start |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        warm = " + ".join(f"{x:.1f}" for x in r["warm_up_s"]) or "none"
        out.append(f"| {NAMES.get(r['arch'], r['arch'])} {r['size']}, {r['steps']} steps, g{r['guidance']:g} | "
                   f"{r['mode']}, {r['precision']} | {r['row']} | {r['ready_s']:.1f} s | "
                   f"{', '.join(f'{x:.1f}' for x in r['load_s'])} s, {warm} s | {r['generation_s']:.1f} s | "
                   f"{r['first_image_s']:.1f} s |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sd15,sdxl,sdxl-turbo")
    ap.add_argument("--modes", default="balanced,auto")
    ap.add_argument("--steps", type=int, default=2, help="the first job's steps (the start is what is measured)")
    ap.add_argument("--limit-gb", type=float, default=18.0)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.table:
        print(table(newest_run(RESULTS)))
        return 0
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    rows = []
    for arch in args.arch.split(","):
        for mode in args.modes.split(","):
            work = Path(tempfile.mkdtemp(prefix=f"sdfleet-coldstart-{arch}-{mode}-"))
            cache = {"SDFLEET_CACHE_DIR": str(work / "cache")}
            hub = {"SDFLEET_MODEL": hub_home(arch, work / "hf"), "HF_HOME": str(work / "hf"), **cache}
            for row, settings in (("empty cache", cache), ("warm cache", cache), ("hub ID, warm cache", hub)):
                rows.append(keep_row(RESULTS, {**start(arch, mode, row, args.steps, args.limit_gb, **settings),
                                               "run": stamp}))
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
