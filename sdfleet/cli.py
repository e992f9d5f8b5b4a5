"""`sdfleet`: up (the local stack), api, worker, ops, reconcile, keys, submit, status, model make-tiny|export,
db upgrade.

This is the composition root: it may start the API and the worker, which never import each other.
Heavy imports (uvicorn, Celery, the model stack) happen inside the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from sdfleet.client import ApiError, Client



def _client(api: str | None) -> Client:
    """The API client, with SDFLEET_API_URL and SDFLEET_API_KEY from the environment (the one settings class)."""
    from shared.settings import get_settings

    settings = get_settings()
    return Client(api or settings.api_url, api_key=settings.api_key)


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--negative-prompt")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--model")
    p.add_argument("--out", type=Path, help="write the PNG here (image i > 0 gets a -i suffix); implies --wait")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job")


def _job_params(args: argparse.Namespace, prompt: str) -> dict:
    names = ("negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "num_images", "model")
    return {"prompt": prompt, **{n: getattr(args, n) for n in names}}


def _write_images(client: Client, record: dict, out: Path) -> list[Path]:
    written = []
    for image in record["images"]:
        path = out if image["index"] == 0 else out.with_name(f"{out.stem}-{image['index']}{out.suffix or '.png'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(client.image(image["url"]))
        written.append(path)
    return written


def _submit_and_report(client: Client, params: dict, wait: bool, out: Path | None, timeout: float) -> int:
    record = client.submit(**params)
    if wait or out:
        record = client.wait(record["id"], timeout=timeout)
    print(json.dumps(record, indent=2))
    if out and record["status"] == "succeeded":
        for path in _write_images(client, record, out):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if record["status"] in ("queued", "running", "succeeded") else 1


def cmd_submit(args) -> int:
    return _submit_and_report(_client(args.api), _job_params(args, args.prompt), args.wait, args.out, args.timeout)


def cmd_status(args) -> int:
    print(json.dumps(_client(args.api).job(args.job_id), indent=2))
    return 0


def cmd_api(args) -> int:
    import uvicorn

    from shared.settings import get_settings

    # the factory (in each uvicorn worker process) learns where it listens from the environment
    os.environ["SDFLEET_API_HOST"] = args.host
    get_settings.cache_clear()
    get_settings()  # refuse bad or unknown settings here, before uvicorn starts
    uvicorn.run("api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level="warning" if args.quiet else "info")
    return 0


def cmd_worker(args) -> int:
    from worker.app import main

    main(args.celery_args)
    return 0


def cmd_ops(args) -> int:
    from worker.ops import main

    main(args.celery_args)
    return 0


def cmd_reconcile(_args) -> int:
    import redis

    from shared.db import session_factory
    from shared.queue import make_celery
    from shared.reconcile import reconcile
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
    from worker.tiny import make_tiny

    print(make_tiny(args.dir, args.arch))
    return 0


def cmd_export(args) -> int:
    from worker.export import ExportError, export

    try:
        stamp = export(args.src, args.out, args.weight_format,
                       on_step=lambda line: print(line, file=sys.stderr, flush=True))
    except ExportError as exc:
        print(f"sdfleet model export: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {stamp['weight_format']} in {stamp['seconds']} s, largest step's peak {stamp['peak_mb']} MB")
    return 0


def cmd_db_upgrade(_args) -> int:
    from shared.db import engine_for, migrate, schema_revision, wait_for_database
    from shared.settings import get_settings

    engine = engine_for(get_settings().database_url)
    wait_for_database(engine)
    migrate(engine)
    print(f"schema at revision {schema_revision(engine)}")
    return 0


def cmd_up(args) -> int:
    """The whole local stack in one command: Redis if none answers, the API, one worker."""
    from sdfleet.stack import ensure_redis, spawn, stop
    from shared.db import engine_for, migrate, wait_for_database
    from shared.settings import get_settings
    from worker.tiny import default_tiny_dir

    settings = get_settings()
    env = {}
    if settings.model is None:
        # the demo's model: built once (about half a minute), then reused from the cache
        tiny = default_tiny_dir(settings.cache_dir)
        subprocess.run([sys.executable, "-m", "sdfleet", "model", "make-tiny", str(tiny)], check=True, stdout=sys.stderr)
        settings = settings.model_copy(update={"model": str(tiny)})
        env["SDFLEET_MODEL"] = str(tiny)
    name = settings.served_model_name
    env["SDFLEET_DEFAULT_MODEL"] = settings.default_model or name
    if "SDFLEET_PAUSE_CPU_PERCENT" not in os.environ:
        env["SDFLEET_PAUSE_CPU_PERCENT"] = "100"  # whoever runs the local stack wants it to run: no CPU pause

    procs: list[subprocess.Popen] = []
    try:
        redis_proc = ensure_redis(settings.redis_url)
        if redis_proc:
            print(f"no Redis answered at {settings.redis_url}: started the bundled redis-server", file=sys.stderr)
            procs.append(redis_proc)
        engine = engine_for(settings.database_url)
        wait_for_database(engine)
        migrate(engine)  # once, before two processes would race to do it

        args.log_dir.mkdir(parents=True, exist_ok=True)
        worker = spawn(["worker"], env, str(args.log_dir / "worker.log"))
        ops = spawn(["ops"], env, str(args.log_dir / "ops.log"))
        api = spawn(["api", "--port", str(args.port)], env, str(args.log_dir / "api.log"))
        procs[:0] = [worker, ops, api]  # stopped first, Redis last
        client = _client(f"http://127.0.0.1:{args.port}")
        deadline = time.monotonic() + 60
        while not client.healthy():
            if api.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the API did not start; see {args.log_dir / 'api.log'}")
            time.sleep(0.2)
        deadline = time.monotonic() + settings.model_load_timeout_s
        while not any(w["alive"] and w["model"] == name for w in client.workers()):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not come up; see {args.log_dir / 'worker.log'}")
            time.sleep(0.2)
        print(f"sdfleet is up: API http://127.0.0.1:{args.port} (docs at /docs), model {name!r}, "
              f"database {settings.database_url}; logs in {args.log_dir}", file=sys.stderr)

        if args.submit:
            record = client.submit(**_job_params(args, args.submit))
            print(f"submitted job {record['id']}; waiting", file=sys.stderr)
            deadline = time.monotonic() + args.timeout
            while record["status"] in ("queued", "running"):
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited; see {args.log_dir / 'worker.log'}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"job {record['id']} still {record['status']} after {args.timeout:.0f} s")
                time.sleep(0.2)
                record = client.job(record["id"])
            print(json.dumps(record, indent=2))
            if record["status"] == "succeeded" and args.out:
                for path in _write_images(client, record, args.out):
                    print(f"wrote {path}", file=sys.stderr)
            if not args.keep:
                return 0 if record["status"] == "succeeded" else 1
        print("Ctrl-C stops the stack", file=sys.stderr)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(procs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdfleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the local stack: Redis (bundled if none answers), the API, one worker, "
                       "one ops worker")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--submit", metavar="PROMPT", help="submit this prompt, wait, print the record, then stop")
    p.add_argument("--keep", action="store_true", help="with --submit: keep the stack running afterwards")
    p.add_argument("--log-dir", type=Path, default=Path("."), help="where api.log and worker.log go")
    _job_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("api", help="run the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="API processes (they share nothing but the "
                   "database and Redis)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker", help="run a worker for SDFLEET_MODEL (extra arguments go to Celery)")
    p.add_argument("celery_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("ops", help="run an ops worker: webhook deliveries and the periodic reconciler")
    p.add_argument("celery_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_ops)

    p = sub.add_parser("reconcile", help="reconcile the database with Redis once and print what changed")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("keys", help="API keys")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("create", help="create a key (printed once) with its webhook secret")
    k.add_argument("name")
    k.add_argument("--rate-limit", type=int, metavar="PER_MIN", help="submissions per minute")
    k.set_defaults(func=cmd_keys)
    k = ksub.add_parser("revoke", help="revoke a key")
    k.add_argument("name")
    k.set_defaults(func=cmd_keys)

    p = sub.add_parser("submit", help="submit a prompt")
    p.add_argument("prompt")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--api", help="the API's URL (default SDFLEET_API_URL, else http://127.0.0.1:8000)")
    _job_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="print a job's record")
    p.add_argument("job_id")
    p.add_argument("--api", help="the API's URL (default SDFLEET_API_URL, else http://127.0.0.1:8000)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("model", help="model tools")
    msub = p.add_subparsers(dest="model_command", required=True)
    m = msub.add_parser("make-tiny", help="build the tiny random-weight test model as OpenVINO IR")
    m.add_argument("dir", type=Path)
    m.add_argument("--arch", choices=("sd", "sdxl"), default="sd")
    m.set_defaults(func=cmd_make_tiny)
    m = msub.add_parser("export", help="export a diffusers pipeline (or compress an IR folder) to OpenVINO IR, "
                                       "one component per process")
    m.add_argument("src", type=Path, help="a diffusers pipeline folder, or an OpenVINO IR folder to compress")
    m.add_argument("out", type=Path, help="the new IR folder (must not exist)")
    m.add_argument("--weight-format", choices=("fp16", "int8", "int4"), default="fp16")
    m.set_defaults(func=cmd_export)

    p = sub.add_parser("db", help="database tools")
    dsub = p.add_subparsers(dest="db_command", required=True)
    d = dsub.add_parser("upgrade", help="migrate the schema to the newest revision")
    d.set_defaults(func=cmd_db_upgrade)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ApiError as exc:
        print(f"sdfleet: {exc}", file=sys.stderr)
        if isinstance(exc.body, dict):
            print(json.dumps(exc.body, indent=2), file=sys.stderr)
        return 2
