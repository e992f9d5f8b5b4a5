"""sdfleet turns spare CPU machines into a text-to-image service: `sdfleet up` runs the whole stack on this
machine, `sdfleet api`, `worker` and `ops` run its parts on a fleet, and `submit`, `status`, `jobs`,
`cancel`, `workers` and `plan` talk to a running API (SDFLEET_API_URL, with the key in SDFLEET_API_KEY).

This is the composition root: it may start the API and the worker, which never import each other.
Heavy imports (uvicorn, Celery, the model stack) happen inside the command that needs them.
Output: `submit` and `status` print the job record as JSON on stdout (scripts parse it); `jobs`,
`workers` and `plan` print tables there (`--json`: the API's JSON); progress and messages go to stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from sdfleet.client import ApiError, ApiUnreachable, Client
from shared.jobs import JobCreate, JobStatus
from shared.memory import fmt_size
from shared.waiting import WaitTimeout, wait_until
from modeltools.tiny import ARCHES as TINY_ARCHES

if TYPE_CHECKING:
    from shared.settings import Settings

DEFAULT_PORT = 8000
API_HELP = "the API's URL (default: SDFLEET_API_URL, else http://127.0.0.1:8000)"
EXIT_UNREACHABLE = 2


def _client(api: str | None) -> Client:
    """The API client, with SDFLEET_API_URL and SDFLEET_API_KEY from the environment (the one settings class)."""
    from shared.settings import get_settings

    settings = get_settings()
    return Client(api or settings.api_url, api_key=settings.api_key)


MODEL_DEFAULT = "default: the model's own, as `sdfleet models` shows"


def _api_default(field: str):
    return JobCreate.model_fields[field].default


def _size(text: str) -> tuple[int, int]:
    """WxH, e.g. 512x512."""
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 512x512, got {text!r}") from None


def _job_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--negative-prompt", help="what the image should not show")
    p.add_argument("--width", type=int, help=f"pixels, a multiple of 8 in 64..2048 ({MODEL_DEFAULT})")
    p.add_argument("--height", type=int, help=f"pixels, a multiple of 8 in 64..2048 ({MODEL_DEFAULT})")
    p.add_argument("--steps", type=int, help=f"denoising steps, 1..150 ({MODEL_DEFAULT})")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance, 0..30; 1 or less runs without "
                   f"it (half the UNet's work and memory; an LCM takes it as an embedding) ({MODEL_DEFAULT})")
    p.add_argument("--seed", type=int, help="0..2^32-1 (default: a random one, stored with the job)")
    p.add_argument("--num-images", type=int, help=f"images, 1..8 (API default {_api_default('num_images')})")
    p.add_argument("--model", help="the model's name (default: the API's SDFLEET_DEFAULT_MODEL)")
    p.add_argument("--priority", choices=("low", "normal", "high"),
                   help=f"queue priority among jobs of the same model (API default {_api_default('priority')})")
    p.add_argument("--webhook-url", metavar="URL", help="the API POSTs the job record here (signed) when the "
                   "job ends; http(s), public addresses only unless the operator allowed the network")
    p.add_argument("--fit", choices=("refuse", "auto"), help="when no live worker fits the job: refuse it (the "
                   "API's default, with the changes that would fit), or auto: run it with the first change that "
                   "fits (smaller size, guidance 1, an int8 variant), said on stderr and in the record's `fitted`")
    p.add_argument("--image", type=Path, metavar="FILE", help="an init image (PNG, JPEG or WebP): image-to-image, "
                   "or with --mask inpainting, or with --upscale an upscale; the job keeps its size unless "
                   "--width/--height say otherwise")
    p.add_argument("--mask", type=Path, metavar="FILE", help="inpainting: white (or transparent) is repainted")
    p.add_argument("--strength", type=float, help="with --image: 0 (the image as it is) .. 1 (from noise) "
                   "(API default 0.75; inpainting 1; upscale 0.3)")
    p.add_argument("--upscale", type=int, choices=(2, 4), help="with --image: enlarge it 2x or 4x")
    p.add_argument("--decoder", choices=("tiny", "full"), help="text-to-image: decode with the worker's tiny VAE "
                   "(faster, less detail) or the model's own (default: tiny where the model's workers have one)")
    p.add_argument("--out", type=Path, metavar="FILE", help=out_help)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job")


def _job_params(args: argparse.Namespace, prompt: str) -> dict:
    names = ("negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images", "model",
             "priority", "webhook_url", "fit", "strength", "upscale", "decoder")
    params = {"prompt": prompt, **{n: getattr(args, n, None) for n in names}}
    for name in ("image", "mask"):  # sent as base64 in the JSON body
        path = getattr(args, name, None)
        if path is not None:
            try:
                params[name] = base64.b64encode(path.read_bytes()).decode()
            except OSError as exc:
                raise SystemExit(f"sdfleet: --{name} {path}: {exc.strerror or exc}") from None
    return params


def fitted_note(record: dict) -> str | None:
    """What `fit: auto` changed of the job, for a person: None when it runs as asked."""
    fitted = record.get("fitted")
    if not fitted:
        return None
    changes = ", ".join(f"{k} {fitted['original'][k]} -> {v}" for k, v in fitted["changes"].items())
    return f"fitted: {changes} (no live worker fits it as asked; {fitted['hint']})"


def _write_images(client: Client, record: dict, out: Path) -> list[Path]:
    written = []
    for image in record["images"]:
        path = out if image["index"] == 0 else out.with_name(f"{out.stem}-{image['index']}{out.suffix or '.png'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.image(image["url"]))
        written.append(path)
    return written


# ---- progress --------------------------------------------------------------------------------------------

def _secs(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.0f} min"


def describe(record: dict) -> str:
    """One line on where a job is: queued (its position, and why no worker is taking it), running (image i of
    N, step k of n), or how it ended (time, peak RSS). It changes only when the job does (a progress line is
    printed per change), so the expected start, which counts down, is `timing`'s."""
    status = record["status"]
    cancel = " (cancel requested)" if record.get("cancel_requested") and status in ("queued", "running") else ""
    if status == "queued":
        position = record.get("queue_position")
        again = f", attempt {record['attempts'] + 1} (its worker was lost)" if record.get("attempts") else ""
        where = f", position {position} for {record['parameters']['model']}" if position else ""
        why = f": {record['waiting_reason']}" if record.get("waiting_reason") else ""
        return f"queued{where}{again}{cancel}{why}"
    if status == "running":
        p = record.get("progress")
        host = record.get("worker_host") or "a worker"
        if not p:
            return f"running on {host}: starting{cancel}"
        return (f"running on {host}: image {p['image'] + 1} of {p['images']}, step {p['step']} of {p['steps']}"
                f"{cancel}")
    peak = record.get("peak_rss_bytes")
    measured = f"peak RSS {fmt_size(peak)}" if peak else "no memory reading"
    if record.get("predicted_peak_bytes"):
        measured += f" (predicted {fmt_size(record['predicted_peak_bytes'])})"
    if status == "succeeded":
        n = len(record.get("images") or [])
        took = f" in {record['generation_s']:.1f} s" if record.get("generation_s") is not None else ""
        if took and record.get("predicted_generation_s") is not None:
            took += f" (predicted {_secs(record['predicted_generation_s'])})"
        return f"succeeded: {n} image{'s' if n != 1 else ''}{took}, {measured}"
    if status == "failed":
        error = record.get("error") or {}
        return f"failed: {error.get('code')}: {error.get('message')}; {measured}"
    return f"{status}; {measured}" if peak else status


def timing(record: dict) -> str | None:
    """The job's time as predicted: its generation, and while queued when it is expected to start."""
    parts = []
    if record["status"] == "queued":
        start = record.get("expected_start_s")
        parts.append(f"expected to start in ~{_secs(start)}" if start is not None else "expected start unknown")
    if record["status"] in ("queued", "running"):
        predicted = record.get("predicted_generation_s")
        parts.append(f"predicted generation {_secs(predicted)}" if predicted is not None
                     else "predicted generation unknown (no measurement yet)")
    return "; ".join(parts) or None


def _fraction(record: dict) -> float | None:
    p = record.get("progress")
    if record["status"] != "running" or not p or not p["images"] or not p["steps"]:
        return None
    return min(1.0, (p["image"] * p["steps"] + p["step"]) / (p["images"] * p["steps"]))


class ProgressLine:
    """A job's progress on stderr: on a terminal one line redrawn in place with a bar; otherwise (a pipe, a
    log file, a test) a plain line each time it changes."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.last: str | None = None
        self.drawn = False

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        text = f"job {record['id'][:8]}: {describe(record)}"
        if self.tty:
            fraction = _fraction(record)
            if fraction is not None:  # the bar first: a narrow terminal cuts the end of the line
                filled = round(20 * fraction)
                p = record["progress"]
                text = (f"job {record['id'][:8]} [{'#' * filled}{'.' * (20 - filled)}] {fraction:4.0%} image "
                        f"{p['image'] + 1} of {p['images']}, step {p['step']} of {p['steps']} on "
                        f"{record.get('worker_host')}{' (cancel requested)' if record.get('cancel_requested') else ''}")
            if JobStatus(record["status"]).is_terminal:  # the last line stays: whole, and ended
                self.stream.write("\r" + text + "\x1b[K\n")
                self.drawn = False
            else:  # redrawn in place: it must fit on one line
                self.stream.write("\r" + text[:shutil.get_terminal_size().columns - 1] + "\x1b[K")
                self.drawn = True
            self.stream.flush()
        elif text != self.last:
            print(text, file=self.stream, flush=True)
        self.last = text

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


class PreviewWriter:
    """`submit --preview FILE`: the job's latest preview written to FILE (replaced whole, never half-written)
    each time its record names a newer one."""

    def __init__(self, client: Client, path: Path):
        self.client, self.path = client, path
        self.last: dict | None = None

    def __call__(self, record: dict) -> None:
        p = record.get("preview")
        if not p or (self.last and (p["image"], p["step"]) == (self.last["image"], self.last["step"])):
            return
        try:
            data = self.client.preview(record["id"])
        except ApiError:
            return
        if data is None:  # it ended between the record and this read
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        part = self.path.with_name(f".{self.path.name}.part")
        part.write_bytes(data)
        os.replace(part, self.path)
        self.last = p

    def said(self) -> str:
        if self.last is None:
            return (f"no preview written to {self.path}: the job ended before one was taken (or its worker has "
                    "previews off: SDFLEET_PREVIEW_INTERVAL_S=0)")
        p = self.last
        return f"wrote {self.path}: the last preview, image {p['image'] + 1}, step {p['step']} of {p['steps']}"


def _wait_with_progress(client: Client, record: dict, timeout: float, quiet: bool = False, check=None,
                        also=None) -> dict:
    """Poll the job until it ends, showing its progress; `check()` runs at each poll (may raise), and
    `also(record)` sees each record read."""
    show = ProgressLine(enabled=not quiet)

    def update(r: dict) -> None:
        show(r)
        if also is not None:
            also(r)
        if check is not None:
            check()

    update(record)
    try:
        if JobStatus(record["status"]).is_terminal:
            return record
        return client.wait(record["id"], timeout=timeout, poll_s=0.25, on_update=update)
    finally:
        show.close()


# ---- client commands -------------------------------------------------------------------------------------

def cmd_submit(args) -> int:
    client = _client(args.api)
    record = client.submit(**_job_params(args, args.prompt))
    if note := fitted_note(record):
        print(f"sdfleet: job {record['id'][:8]} {note}", file=sys.stderr)
    if not (args.wait or args.out or args.preview):
        print(json.dumps(record, indent=2))
        return 0
    job_id = record["id"]
    previews = PreviewWriter(client, args.preview) if args.preview else None
    try:
        record = _wait_with_progress(client, record, args.timeout, quiet=args.quiet, also=previews)
    except TimeoutError:
        print(f"sdfleet: job {job_id} is not finished after {args.timeout:.0f} s; it goes on "
              f"(sdfleet status {job_id}, sdfleet cancel {job_id})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sdfleet: stopped waiting; job {job_id} goes on (sdfleet status {job_id}, sdfleet cancel "
              f"{job_id})", file=sys.stderr)
        return 130
    print(json.dumps(record, indent=2))
    if previews is not None:
        print(previews.said(), file=sys.stderr)
    if record["status"] == "succeeded":
        for path in _write_images(client, record, args.out or Path(f"{job_id}.png")):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if record["status"] == "succeeded" else 1


def cmd_status(args) -> int:
    record = _client(args.api).job(args.job_id)
    print(json.dumps(record, indent=2))
    when = timing(record)  # for a person, on stderr: stdout is the record alone
    print(f"job {record['id'][:8]}: {describe(record)}" + (f"; {when}" if when else ""), file=sys.stderr)
    return 0


def cmd_cancel(args) -> int:
    client = _client(args.api)
    rc, records = 0, []
    for job_id in args.job_ids:
        try:
            record = client.cancel(job_id)
        except ApiError as exc:
            if exc.status != 409:
                raise
            print(f"sdfleet: {exc.message}", file=sys.stderr)
            rc = 1
            continue
        if record["status"] != "cancelled" and args.wait:
            record = _wait_with_progress(client, record, args.timeout, quiet=args.json)
        records.append(record)
        if not args.json:
            if record["status"] == "cancelled":
                print(f"{job_id} cancelled")
            elif record["cancel_requested"] and record["status"] == "running":
                print(f"{job_id} cancel requested: it is running and stops at its next step (--wait waits for it)")
            else:
                print(f"{job_id} {record['status']}: it finished before the cancel took effect")
                rc = 1
    if args.json:
        print(json.dumps(records if len(args.job_ids) > 1 else (records[0] if records else None), indent=2))
    return rc


def _age(stamp: str | None, now: datetime) -> str:
    if not stamp:
        return "-"
    seconds = max(0.0, (now - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers, *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _job_where(job: dict) -> str:
    status = job["status"]
    if status == "queued":
        return f"position {job['queue_position']}" if job.get("queue_position") else "queued"
    if status == "running":
        p = job.get("progress")
        where = f"image {p['image'] + 1}/{p['images']} step {p['step']}/{p['steps']}" if p else "starting"
        return where + (" (cancelling)" if job.get("cancel_requested") else "")
    if status == "succeeded":
        return f"{job['generation_s']:.1f} s" if job.get("generation_s") is not None else ""
    if status == "failed":
        return (job.get("error") or {}).get("code") or ""
    return ""


def cmd_jobs(args) -> int:
    client = _client(args.api)
    jobs, cursor = [], None
    limit = None if args.all else args.limit
    while True:
        page = client.jobs(status=args.status, limit=min(200, limit - len(jobs)) if limit else 200, cursor=cursor)
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor or (limit and len(jobs) >= limit):
            break
    if args.json:
        print(json.dumps({"jobs": jobs, "next_cursor": cursor}, indent=2))
        return 0
    if not jobs:
        print("no jobs" + (f" with status {' or '.join(args.status)}" if args.status else ""), file=sys.stderr)
        return 0
    now = datetime.now(timezone.utc)
    rows = []
    for j in jobs:
        p = j["parameters"]
        size = f"{p['width']}x{p['height']}" + (f" x{p['num_images']}" if p["num_images"] > 1 else "")
        peak = fmt_size(j["peak_rss_bytes"]) if j.get("peak_rss_bytes") else None
        rows.append([j["id"], j["status"], _job_where(j), _age(j["created_at"], now), p["model"], size,
                     p["steps"], peak, _short(p["prompt"], 40)])
    print(_table(["ID", "STATUS", "WHERE", "CREATED", "MODEL", "SIZE", "STEPS", "PEAK RSS", "PROMPT"], rows))
    if cursor:
        print("(older jobs not shown: --limit N or --all)", file=sys.stderr)
    return 0


def cmd_workers(args) -> int:
    workers = _client(args.api).workers()
    if args.json:
        print(json.dumps(workers, indent=2))
        return 0
    if not workers:
        print("no worker has sent a heartbeat recently", file=sys.stderr)
        return 0
    now = datetime.now(timezone.utc)
    rows = []
    for w in sorted(workers, key=lambda w: (not w["alive"], w["model"], w["name"])):
        state = w["state"] if w["alive"] else "gone"
        budget = fmt_size(w["budget_bytes"])
        if w.get("max_budget_bytes") and w["max_budget_bytes"] != w["budget_bytes"]:
            budget += f" (max {fmt_size(w['max_budget_bytes'])})"
        rows.append([w["name"], w["host"], w["model"], state, f"{w['backend']}/{w['precision']}/{w['memory_mode']}",
                     budget, fmt_size(w["resident_bytes"]), fmt_size(w["available_bytes"]),
                     (w.get("current_job_id") or "")[:8] or None, _age(w["last_seen"], now),
                     w.get("state_reason") if w["alive"] else None])
    print(_table(["NAME", "HOST", "MODEL", "STATE", "RUNTIME", "BUDGET", "RESIDENT", "AVAILABLE", "JOB",
                  "LAST SEEN", "NOTE"], rows))
    return 0


def cmd_models(args) -> int:
    models = _client(args.api).models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print("no live worker serves a model", file=sys.stderr)
        return 0
    rows = []
    for m in models:
        d = m["defaults"]
        guidance = f"{d['guidance_scale']:g}" + ("" if d["guidance_doubles_batch"] else " (embedding)")
        rows.append([m["name"], d["family"], f"{d['steps']} ({d['recommended_steps'][0]}-{d['recommended_steps'][1]})",
                     guidance, f"{d['width']}x{d['height']}", ", ".join(d["overridden"]) or "-", str(m["workers"]),
                     fmt_size(m["largest_budget_bytes"]), ", ".join(m["runtimes"])])
    print(_table(["MODEL", "FAMILY", "STEPS (MADE FOR)", "GUIDANCE", "SIZE", "SET BY OPERATOR", "WORKERS",
                  "LARGEST BUDGET", "RUNTIMES"], rows))
    return 0


def cmd_plan(args) -> int:
    width, height = args.size if args.size else (None, None)
    plan = _client(args.api).plan(model=args.model, width=width, height=height, guidance_scale=args.guidance,
                                  num_images=args.images)
    rc = 0 if plan["admitted"] else 1
    if args.json:
        print(json.dumps(plan, indent=2))
        return rc
    images = plan.get("num_images") or args.images or _api_default("num_images")
    scale = plan["guidance_scale"]
    print(f"{plan['model']} {plan['width']}x{plan['height']}, {images} image{'s' if images != 1 else ''}, "
          f"guidance {'on' if plan['guidance'] else 'off'} (scale {scale:g}): {plan['message']}")
    rows = []
    for w in plan["workers"]:
        fits = f"yes ({fmt_size(w['memory_class_bytes'])} class)" if w["fits"] else "no"
        rows.append([w["name"], w["host"], w["state"], f"{w['backend']}/{w['precision']}/{w['memory_mode']}",
                     fmt_size(w["budget_bytes"]), fmt_size(w["class_limit_bytes"]), fmt_size(w["resident_bytes"]),
                     fmt_size(w["predicted_peak_bytes"]), w["prediction_source"], fits])
    print()
    print(_table(["WORKER", "HOST", "STATE", "RUNTIME", "BUDGET", "TAKES UP TO", "RESIDENT", "PREDICTED PEAK",
                  "SOURCE", "FITS"], rows))
    if plan.get("modes"):
        print("\nby memory mode, from this model's measured profiles (a worker adds its own resident floor):")
        print(_table(["RUNTIME", "PREDICTED PEAK", "SOURCE", "HOW"],
                     [[f"{m['backend']}/{m['precision']}/{m['memory_mode']}", fmt_size(m["predicted_peak_bytes"]),
                       m["prediction_source"], m["detail"]] for m in plan["modes"]]))
    hosts = sorted({w["host"] for w in plan["workers"] if w["fits"]})
    others = sorted({w["host"] for w in plan["workers"] if not w["fits"]} - set(hosts))
    print()
    if hosts:
        print(f"fits on: {', '.join(hosts)}" + (f"; not on: {', '.join(others)}" if others else ""))
    else:
        print(f"fits on no live host ({', '.join(others) or 'none serves the model'})")
        for hint in plan.get("hints") or []:
            print(f"  {'would fit' if hint['fits'] else 'would not fit'}: {hint['message']}")
        fit = plan.get("fit")
        print(f"with --fit auto: admitted as {fit['hint']} ({fmt_size(fit['memory_class_bytes'])} class)" if fit
              else "with --fit auto: refused too (no change fits)")
    return rc


# ---- services --------------------------------------------------------------------------------------------

def cmd_api(args) -> int:
    import uvicorn

    from shared.settings import get_settings

    # the factory (in each uvicorn worker process) learns where it listens from the environment
    os.environ["SDFLEET_API_HOST"] = args.host
    get_settings.cache_clear()
    get_settings()  # refuse bad or unknown settings here, before uvicorn starts
    # api/server.py: uvicorn's httptools protocol with a deadline for a request's headers and JSON 400s
    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                http="api.server:HttpProtocol", log_level="warning" if args.quiet else "info")
    return 0


def _celery(main, celery_args: list[str]) -> int:
    """Run a Celery worker's main with the extra arguments; Celery's own usage errors (a bad --loglevel) are
    shown as Celery words them, without a traceback."""
    import click

    try:
        main(celery_args)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


def cmd_worker(args) -> int:
    from worker.app import main

    return _celery(main, args.celery_args)


def cmd_ops(args) -> int:
    from ops.app import main

    return _celery(main, args.celery_args)


def cmd_reconcile(_args) -> int:
    import redis

    from shared.db import session_factory
    from shared.queue import make_celery
    from ops.reconcile import reconcile
    from shared.settings import get_settings

    settings = get_settings()
    report = reconcile(session_factory(settings.database_url), redis.Redis.from_url(settings.redis_url),
                       make_celery(settings), settings)
    print(json.dumps(vars(report), indent=2))
    return 0


def cmd_keys(args) -> int:
    from shared import keys
    from shared.db import engine_for, migrate, session_factory
    from shared.settings import get_settings

    url = get_settings().database_url
    migrate(engine_for(url))
    with session_factory(url).begin() as session:
        if args.keys_command == "create":
            key = keys.create_key(session, args.name, args.rate_limit)
            print(json.dumps({"name": key.name, "id": key.id, "key": key.token, "webhook_secret": key.webhook_secret},
                             indent=2))
            print("the key is shown once; only its hash is stored", file=sys.stderr)
            return 0
        if not keys.revoke(session, args.name):
            print(f"sdfleet: no active key named {args.name!r}", file=sys.stderr)
            return 1
    return 0


def cmd_make_tiny(args) -> int:
    from modeltools.tiny import make_tiny

    print(make_tiny(args.dir, args.arch))
    return 0


def cmd_export_tiny_vae(args) -> int:
    from modeltools.export import ExportError, export_tiny_vae

    try:
        stamp = export_tiny_vae(args.src, args.out)
    except ExportError as exc:
        print(f"sdfleet model export-tiny-vae: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: TAESD decoder, fp16, in {stamp['seconds']} s (peak {stamp['peak_mb']} MB); "
          f"serve it with SDFLEET_TINY_VAE={args.out}")
    return 0


def cmd_export(args) -> int:
    from modeltools.export import ExportError, export

    try:
        stamp = export(args.src, args.out, args.weight_format,
                       on_step=lambda line: print(line, file=sys.stderr, flush=True), lora=args.lora,
                       lora_scale=args.lora_scale, scheduler=args.scheduler, split=args.split,
                       calibration_prompts=args.calibration_prompts, calibration_samples=args.calibration_samples,
                       calibration_size=args.calibration_size)
    except ExportError as exc:
        print(f"sdfleet model export: {exc}", file=sys.stderr)
        return 2
    lora = stamp.get("lora")
    print(f"{args.out}: {stamp['weight_format']} in {stamp['seconds']} s, largest step's peak {stamp['peak_mb']} MB"
          + (f"; LoRA fused into {', '.join(lora['fused_into'])} at scale {lora['scale']:g}" if lora else "")
          + (f"; scheduler {stamp['scheduler']}" if "scheduler" in stamp else "")
          + (f"; calibrated on {stamp['calibration']['samples']} UNet calls at {stamp['calibration']['width']}px"
             if "calibration" in stamp else ""))
    return 0


def cmd_db_upgrade(_args) -> int:
    from shared.db import engine_for, migrate, schema_revision, wait_for_database
    from shared.settings import get_settings

    engine = engine_for(get_settings().database_url)
    wait_for_database(engine)
    migrate(engine)
    print(f"schema at revision {schema_revision(engine)}")
    return 0


def cmd_db_worker_role(args) -> int:
    from shared.privilege import worker_role_sql

    try:
        print(worker_role_sql(args.role), end="")
    except ValueError as exc:
        print(f"sdfleet db worker-role: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_redis_acl(args) -> int:
    import secrets
    from urllib.parse import urlparse

    from shared.privilege import worker_acl

    url = urlparse(os.environ.get("SDFLEET_REDIS_URL", "redis://127.0.0.1:6379/0"))
    db = args.db if args.db is not None else int((url.path or "/0").strip("/") or 0)
    password = secrets.token_hex(24)  # hex: it goes into a URL unescaped
    try:
        print(worker_acl(args.model, args.user, password, db))
    except ValueError as exc:
        print(f"sdfleet redis-acl: {exc}", file=sys.stderr)
        return 2
    print(f"the worker's SDFLEET_REDIS_URL (its password is shown once; Redis keeps only its SHA-256):\n"
          f"redis://{args.user}:{password}@<server>:{url.port or 6379}/{db}", file=sys.stderr)
    return 0


class StopRequested(Exception):
    """SIGTERM, SIGINT or SIGHUP reached `sdfleet up`: stop the stack."""


def _stop_on_signals() -> None:
    def handler(signum, _frame):
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # the stack is being stopped: a second signal must not cut it short
        raise StopRequested(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(s) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays ignored
            signal.signal(s, handler)


def _choose_port(requested: int | None) -> int | None:
    """The API's port: --port if free (0: any free one); without --port 8000, or a free one (said so) when
    8000 is busy. None (after saying why): a --port that is busy."""
    from sdfleet.stack import free_port, port_free

    if requested == 0:
        return free_port()
    port = DEFAULT_PORT if requested is None else requested
    if port_free(port):
        return port
    if requested is not None:
        print(f"sdfleet up: port {port} is in use (another `sdfleet up` or API?): stop it, or choose another "
              f"port with --port N (--port 0 picks a free one)", file=sys.stderr)
        return None
    port = free_port()
    print(f"port {DEFAULT_PORT} is in use (another `sdfleet up`?): this stack's API listens on port {port} "
          f"instead", file=sys.stderr)
    return port


def _up_settings() -> tuple[Settings, dict[str, str]]:
    """The settings the stack runs with, and what its processes' environment adds to ours."""
    from shared.settings import get_settings
    from modeltools.tiny import default_tiny_dir

    settings = get_settings()
    env: dict[str, str] = {}
    if settings.model is None:
        # the demo's model: built once (about half a minute), then reused from the cache
        tiny = default_tiny_dir(settings.cache_dir)
        subprocess.run([sys.executable, "-m", "sdfleet", "model", "make-tiny", str(tiny)], check=True,
                       stdout=sys.stderr)
        settings = settings.model_copy(update={"model": str(tiny)})
        env["SDFLEET_MODEL"] = str(tiny)
    env["SDFLEET_DEFAULT_MODEL"] = settings.default_model or settings.served_model_name
    if "SDFLEET_PAUSE_CPU_PERCENT" not in os.environ:
        env["SDFLEET_PAUSE_CPU_PERCENT"] = "100"  # whoever runs the local stack wants it to run: no CPU pause
    return settings, env


def _log_files(log_dir: Path) -> dict[str, Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    return {part: log_dir / f"{part}.log" for part in ("worker", "ops", "api")}


def _ensure_redis_and_migrate(settings: Settings, procs: list[subprocess.Popen], migration_log: Path) -> None:
    """Redis (the bundled one, added to `procs`, when none answers) and the schema at its newest revision."""
    from sdfleet.stack import ensure_redis
    from shared.db import engine_for, migrate, wait_for_database

    redis_proc = ensure_redis(settings.redis_url, owned=True)
    if redis_proc:
        print(f"no Redis answered at {settings.redis_url}: started the bundled redis-server", file=sys.stderr)
        procs.append(redis_proc)
    engine = engine_for(settings.database_url)
    wait_for_database(engine)
    # once, before two processes would race to do it; alembic's lines go to the API's log (where the API's
    # own migrations log), so that the terminal shows only sdfleet's lines
    migrate(engine, log_file=migration_log)


def _start_children(env: dict[str, str], port: int, logs: dict[str, Path], procs: list[subprocess.Popen]):
    """Start the worker, the ops worker and the API, each into `procs` ahead of Redis (they stop in this
    order, Redis last); returns the check that ends `sdfleet up` (SystemExit) once one of them has exited."""
    from sdfleet.stack import spawn

    children = (("worker", ["worker"], logs["worker"]), ("ops worker", ["ops"], logs["ops"]),
                ("API", ["api", "--port", str(port)], logs["api"]))
    started = []
    for i, (part, argv, log) in enumerate(children):
        proc = spawn(argv, env, str(log), owned=True)
        procs.insert(i, proc)
        started.append((part, proc, log))

    def check() -> None:
        for part, proc, log in started:
            if proc.poll() is not None:
                raise SystemExit(f"sdfleet up: the {part} exited (code {proc.returncode}); see {log}")

    return check


def _wait_until_ready(client: Client, model: str, settings: Settings, logs: dict[str, Path], check) -> None:
    """Until the API answers (60 s) and a worker of the model is alive (SDFLEET_MODEL_LOAD_TIMEOUT_S); a
    child that exits meanwhile ends the wait (`check` raises)."""
    def api_answers() -> bool:
        if client.healthy():
            return True
        check()
        return False

    def worker_alive() -> bool:
        if any(w["alive"] and w["model"] == model for w in client.workers()):
            return True
        check()  # also: the API we talk to is ours (one that failed to bind has exited by now)
        return False

    try:
        wait_until(api_answers, 60, 0.2, "the API to answer")
    except WaitTimeout:
        raise SystemExit(f"sdfleet up: the API did not answer in 60 s; see {logs['api']}") from None
    try:
        wait_until(worker_alive, settings.model_load_timeout_s, 0.2, f"a worker of {model!r}")
    except WaitTimeout:
        raise SystemExit(f"sdfleet up: the worker did not come up; see {logs['worker']}") from None
    check()


def _submit_and_write(client: Client, args, check) -> int:
    """--submit: the job's progress on stderr, its record on stdout, its PNGs in --out; 0 if it succeeded."""
    record = client.submit(**_job_params(args, args.submit))
    if note := fitted_note(record):
        print(f"sdfleet up: job {record['id'][:8]} {note}", file=sys.stderr)
    try:
        record = _wait_with_progress(client, record, args.timeout, check=check)
    except TimeoutError:
        raise SystemExit(f"sdfleet up: job {record['id']} not finished after {args.timeout:.0f} s") from None
    print(json.dumps(record, indent=2), flush=True)
    if record["status"] == "succeeded" and args.out:
        for path in _write_images(client, record, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if record["status"] == "succeeded" else 1


def _serve_until_signal(check) -> NoReturn:
    """Until a signal (StopRequested) or a child's exit (check's SystemExit) ends `sdfleet up`."""
    print(f"the stack keeps running: Ctrl-C (or SIGTERM to pid {os.getpid()}) stops it", file=sys.stderr,
          flush=True)
    while True:
        check()
        time.sleep(0.5)


def _stop_uninterrupted(procs: list[subprocess.Popen]) -> None:
    from sdfleet.stack import stop

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # nothing may interrupt the stopping
    stop(procs)


def cmd_up(args) -> int:
    """The whole local stack in one command: Redis if none answers, the API, one worker, one ops worker;
    stopped together on exit, Ctrl-C, SIGTERM or SIGHUP."""
    _stop_on_signals()
    port = _choose_port(args.port)
    if port is None:
        return 2
    procs: list[subprocess.Popen] = []
    try:
        settings, env = _up_settings()
        logs = _log_files(args.log_dir)
        _ensure_redis_and_migrate(settings, procs, logs["api"])
        check = _start_children(env, port, logs, procs)
        client = _client(f"http://127.0.0.1:{port}")
        name = settings.served_model_name
        _wait_until_ready(client, name, settings, logs, check)
        print(f"sdfleet is up: API http://127.0.0.1:{port} (docs at /docs), model {name!r}, "
              f"database {settings.database_url}; logs in {args.log_dir}", file=sys.stderr)
        if args.submit:
            rc = _submit_and_write(client, args, check)
            if not args.keep:
                return rc
        _serve_until_signal(check)
    except StopRequested as exc:
        print(f"sdfleet up: {exc}: stopping the worker, ops worker, API and Redis it started", file=sys.stderr)
        return 0
    finally:
        _stop_uninterrupted(procs)


# ---- the parser ------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False: the flag is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _description() -> str:
    """The module docstring's first paragraph, whole."""
    return " ".join(__doc__.strip().split("\n\n")[0].split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdfleet", description=_description(), formatter_class=HelpFormatter,
        epilog="`sdfleet COMMAND --help` describes each command. Connection errors exit 2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              formatter_class=HelpFormatter, **kwargs)

    # in this order in `sdfleet --help`
    for add_commands in (_add_up, _add_server_commands, _add_keys, _add_job_commands, _add_fleet_commands,
                         _add_model_tools, _add_db):
        add_commands(command)
    return parser


def _add_up(command) -> None:
    p = command("up", "run the local stack: Redis (the bundled one if none answers), the API, one worker and one "
                "ops worker; it runs until Ctrl-C or SIGTERM, which stop all it started")
    p.add_argument("--port", type=int, help=f"the API's port (default {DEFAULT_PORT}, or a free one, said so, when "
                   f"{DEFAULT_PORT} is busy; a busy --port is refused; 0: any free port)")
    p.add_argument("--submit", metavar="PROMPT", help="once up, submit this prompt, show its progress, print the "
                   "record, write --out, then stop the stack (unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the stack running after --submit's job (without "
                   "--submit it always keeps running)")
    p.add_argument("--log-dir", type=Path, default=Path("."), help="where api.log, worker.log and ops.log go")
    _job_args(p, "with --submit: write the PNGs here (image i > 0 gets a -i suffix)")
    p.set_defaults(func=cmd_up)


def _add_server_commands(command) -> None:
    """The processes a fleet runs: the API, workers, ops workers; and the reconciler, once."""
    p = command("api", "run the HTTP API (it migrates the database at start)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (any other than loopback counts "
                   "as public: keys are then required unless SDFLEET_AUTH=off)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the port to listen on")
    p.add_argument("--workers", type=int, default=1, help="API processes (they share nothing but the "
                   "database and Redis)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=cmd_api)

    for name, func, what in (("worker", cmd_worker, "a worker for SDFLEET_MODEL"),
                             ("ops", cmd_ops, "an ops worker: webhook deliveries and the periodic reconciler")):
        p = command(name, f"run {what}; every other argument goes to `celery worker` (e.g. --loglevel DEBUG, "
                    f"or after --: -- -E)", usage=f"sdfleet {name} [-h] [CELERY ARGS...]", allow_abbrev=False)
        p.set_defaults(func=func, passthrough=True, celery_args=[])

    p = command("reconcile", "reconcile the database with Redis once and print what changed")
    p.set_defaults(func=cmd_reconcile)


def _add_keys(command) -> None:
    p = command("keys", "create or revoke API keys (in the database SDFLEET_DATABASE_URL names)")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = ksub.add_parser("create", help="create a key (printed once) with its webhook secret",
                        formatter_class=HelpFormatter)
    k.add_argument("name", help="a name for the key (revoke uses it)")
    k.add_argument("--rate-limit", type=int, metavar="PER_MIN", help="submissions per minute (default: no limit)")
    k.set_defaults(func=cmd_keys)
    k = ksub.add_parser("revoke", help="revoke a key", formatter_class=HelpFormatter)
    k.add_argument("name", help="the key's name")
    k.set_defaults(func=cmd_keys)


def _add_job_commands(command) -> None:
    """The client's commands on jobs: submit, status, jobs, cancel."""
    p = command("submit", "submit a prompt; prints the job record as JSON (with --wait: when the job ends, "
                "its progress shown on stderr meanwhile)")
    p.add_argument("prompt", help="what the image should show (1..2000 characters)")
    p.add_argument("--wait", action="store_true", help="wait for the job, showing its progress on stderr, and "
                   "write its PNGs (see --out)")
    p.add_argument("-q", "--quiet", action="store_true", help="with --wait: no progress display")
    p.add_argument("--api", help=API_HELP)
    _job_args(p, "write the PNGs here (image i > 0 gets a -i suffix); implies --wait (with --wait alone: "
              "JOB_ID.png in the current directory)")
    p.add_argument("--preview", type=Path, metavar="FILE", help="while waiting, keep the job's latest preview "
                   "(a small JPEG of its latents, as the API serves it) in FILE, replaced as it denoises; implies "
                   "--wait")
    p.set_defaults(func=cmd_submit)

    p = command("status", "print a job's record as JSON")
    p.add_argument("job_id", help="the job's ID")
    p.add_argument("--api", help=API_HELP)
    p.set_defaults(func=cmd_status)

    p = command("jobs", "list your jobs (those of SDFLEET_API_KEY), newest first")
    p.add_argument("--status", action="append", choices=[s.value for s in JobStatus],
                   help="only jobs in this status (repeatable; default: all)")
    p.add_argument("--limit", type=int, default=20, help="at most this many")
    p.add_argument("--all", action="store_true", help="every job, page after page (overrides --limit)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.add_argument("--api", help=API_HELP)
    p.set_defaults(func=cmd_jobs)

    p = command("cancel", "cancel jobs: a queued one never runs, a running one stops at its next step")
    p.add_argument("job_ids", nargs="+", metavar="ID", help="the job's ID")
    p.add_argument("--wait", action="store_true", help="wait until a running job has stopped")
    p.add_argument("--timeout", type=float, default=600.0, help="with --wait: seconds to wait")
    p.add_argument("--json", action="store_true", help="print the job record(s) as JSON")
    p.add_argument("--api", help=API_HELP)
    p.set_defaults(func=cmd_cancel)


def _add_fleet_commands(command) -> None:
    """The client's commands on the fleet: workers, models, plan."""
    p = command("workers", "list the workers that sent heartbeats: model, state, budget, resident set, job")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.add_argument("--api", help=API_HELP)
    p.set_defaults(func=cmd_workers)

    p = command("models", "list the models live workers serve: family, the defaults a job gets (steps, guidance, "
                "size), workers and runtimes")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    p.add_argument("--api", help=API_HELP)
    p.set_defaults(func=cmd_models)

    p = command("plan", "predict a job's peak memory on each live worker (the prediction the API admits jobs "
                "with) and per memory mode with measured profiles, and say which hosts fit it; exits 1 when "
                "none does")
    p.add_argument("--model", help="the model (default: the API's SDFLEET_DEFAULT_MODEL)")
    p.add_argument("--size", type=_size, metavar="WxH", help=f"image size ({MODEL_DEFAULT})")
    p.add_argument("--images", "--num-images", type=int, dest="images",
                   help=f"images per job (API default {_api_default('num_images')})")
    p.add_argument("--guidance", "--guidance-scale", type=float, dest="guidance",
                   help=f"guidance scale; 1 or less runs without guidance ({MODEL_DEFAULT})")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    p.add_argument("--api", help=API_HELP)
    p.set_defaults(func=cmd_plan)


def _add_model_tools(command) -> None:
    p = command("model", "model tools: build the tiny test model, export a model to OpenVINO IR")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    m = msub.add_parser("make-tiny", help="build the tiny random-weight test model as OpenVINO IR",
                        formatter_class=HelpFormatter)
    m.add_argument("dir", type=Path, help="the folder to build it in (reused when it is current)")
    m.add_argument("--arch", choices=TINY_ARCHES, default="sd", help="the architecture")
    m.set_defaults(func=cmd_make_tiny)
    _add_export(msub)
    m = msub.add_parser("export-tiny-vae", help="export a tiny autoencoder (TAESD, TAESDXL) to OpenVINO IR, for "
                                                "SDFLEET_TINY_VAE", formatter_class=HelpFormatter)
    m.add_argument("src", help="a diffusers AutoencoderTiny folder or hub ID: madebyollin/taesd for SD 1.x/2.x "
                   "models, madebyollin/taesdxl for SDXL")
    m.add_argument("out", type=Path, help="the new folder (must not exist); its decoder goes in vae_decoder/")
    m.set_defaults(func=cmd_export_tiny_vae)


def _add_export(msub) -> None:
    m = msub.add_parser("export", help="export a diffusers pipeline (or compress an IR folder) to OpenVINO IR, "
                                       "one component per process", formatter_class=HelpFormatter)
    m.add_argument("src", help="a diffusers pipeline folder, or an OpenVINO IR folder to compress; or a hub ID "
                   "(ORG/NAME) found in the Hugging Face cache, or downloaded when the hub is reachable")
    m.add_argument("out", type=Path, help="the new IR folder (must not exist)")
    m.add_argument("--weight-format", choices=("fp16", "int8", "int4", "int8-hybrid"), default="fp16",
                   help="the weights' format; int8-hybrid also quantizes the UNet's convolutions (activations too, "
                   "calibrated on prompts) so that they stay 8-bit in memory and run in int8")
    m.add_argument("--calibration-prompts", type=Path, metavar="FILE",
                   help="int8-hybrid: prompts to calibrate on, one per line (default: 24 built-in prompts)")
    m.add_argument("--calibration-samples", type=int, metavar="N",
                   help="int8-hybrid: UNet calls to calibrate on (default: 200, as optimum-intel)")
    m.add_argument("--calibration-size", type=int, metavar="PX",
                   help="int8-hybrid: the calibration images' side (default: the model's, up to 512)")
    m.add_argument("--lora", help="a LoRA to fuse into the UNet (and the text encoders it has weights for) before "
                   "conversion: a .safetensors file, a folder holding one, or a hub ID (e.g. an LCM-LoRA)")
    m.add_argument("--lora-scale", type=float, default=1.0, help="how much of the LoRA is fused")
    m.add_argument("--scheduler", choices=("lcm", "euler", "euler-ancestral", "ddim", "dpm++"),
                   help="replace the pipeline's scheduler (an LCM-LoRA needs lcm), from its own configuration")
    m.add_argument("--split", choices=("auto", "always", "never"), default="auto",
                   help="one child process per component (always), one for all (never), or per component from "
                   "1 GiB of weights up (auto)")
    m.set_defaults(func=cmd_export)


def _add_db(command) -> None:
    p = command("db", "database tools")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    d = dsub.add_parser("upgrade", help="migrate the schema to the newest revision", formatter_class=HelpFormatter)
    d.set_defaults(func=cmd_db_upgrade)
    d = dsub.add_parser("worker-role", help="print the SQL that creates the PostgreSQL group role workers log in "
                        "through (what a worker needs and nothing else, row-level security included), to run as a "
                        "superuser in the sdfleet database; run it again after each upgrade",
                        formatter_class=HelpFormatter)
    d.add_argument("--role", default="sdfleet_worker", help="the group role's name")
    d.set_defaults(func=cmd_db_worker_role)

    p = command("redis-acl", "print the Redis ACL SETUSER line of a worker's own user, limited to its model's queues "
                "(Redis 6.2 or later); its new password goes to stderr, once")
    p.add_argument("model", help="the model the worker serves (its SDFLEET_MODEL_NAME)")
    p.add_argument("user", help="the Redis user's name, e.g. one per worker host")
    p.add_argument("--db", type=int, help="the Redis database the fleet uses (default: SDFLEET_REDIS_URL's, else 0)")
    p.set_defaults(func=cmd_redis_acl)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line. `worker` and `ops` hand every argument they do not know to Celery (a leading
    `--` only ends sdfleet's options)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.celery_args = extra[1:] if extra[:1] == ["--"] else extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _hint(exc: ApiError) -> str:
    if exc.status == 401:
        return " (set SDFLEET_API_KEY to a key from `sdfleet keys create NAME` on the API's host)"
    return ""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    try:
        return args.func(args)
    except ApiUnreachable as exc:
        print(f"sdfleet: {exc}: is `sdfleet up` or `sdfleet api` running there? (SDFLEET_API_URL or --api "
              f"names the API)", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ApiError as exc:
        print(f"sdfleet: {exc}{_hint(exc)}", file=sys.stderr)
        hints = exc.details.get("hints", []) if isinstance(exc.details, dict) else []
        for hint in hints:
            print(f"  {'would fit' if hint.get('fits') else 'would not fit'}: {hint.get('message')}", file=sys.stderr)
        if args.command == "submit" and any(hint.get("fits") for hint in hints):
            print("  (--fit auto runs it with the first that would fit)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
