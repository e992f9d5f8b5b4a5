"""Slow webhook receivers hold up nobody else's webhooks: a real ops worker (`sdfleet ops`, its settings the
defaults but for a short deadline) delivering to real HTTP servers on loopback that answer a byte at a time.
Each delivery is cut off at its one deadline however the receiver trickles; a normal receiver is called at once
behind 8 trickling receivers, and behind one trickling receiver with more deliveries than the ops worker has
threads (it never has more than SDFLEET_WEBHOOK_PER_RECEIVER of them open to one receiver)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

import pytest
import redis

from shared import deliveries, jobstore
from shared.db import engine_for, migrate, session_factory
from shared.errors import ErrorCode
from shared.models import Job
from shared.queue import WEBHOOK_QUEUE, make_celery, send_webhook
from shared.settings import Settings
from sdfleet.stack import stop
from tests.conftest import ROOT, stack_env
from tests.helpers import PARAMS
from tests.helpers import database_url  # noqa: F401 (a fixture)

pytestmark = pytest.mark.one_database  # processes and sockets; the deliveries' SQL is tested on both databases

DEADLINE_S = 3.0  # SDFLEET_WEBHOOK_TIMEOUT_S of this ops worker
PROMPT_S = 1.5  # a normal receiver's webhook arrives within this of being handed out: well under one deadline


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Reads the POST, then answers one byte every 0.1 s for 30 s (ten deadlines): never a whole response.
    Records when each exchange started, when the ops worker hung up, how many are open and the most at once."""

    starts: list
    exchanges: list
    open_now: list
    lock: threading.Lock

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        start = time.monotonic()
        self.starts.append(start)
        with self.lock:
            self.open_now[0] += 1
            self.open_now[1] = max(self.open_now[1], self.open_now[0])
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            end = start + 30
            while time.monotonic() < end:
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the ops worker hung up
            pass
        finally:
            with self.lock:
                self.open_now[0] -= 1
            self.exchanges.append((start, time.monotonic()))
        self.close_connection = True

    def log_message(self, *args):
        pass


class _Prompt(http.server.BaseHTTPRequestHandler):
    arrivals: list

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.arrivals.append((time.monotonic(), self.headers["X-Sdfleet-Job"], body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    started = []

    def start(handler: type, **state):
        cls = type(handler.__name__, (handler,), state)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return f"http://127.0.0.1:{server.server_port}/hook", cls

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def _trickler(start):
    return start(_Trickle, starts=[], exchanges=[], open_now=[0, 0], lock=threading.Lock())


@pytest.fixture(scope="module")
def ops(database_url, redis_url, tmp_path_factory):
    """A real ops worker with the default settings, but for a short deadline and one attempt per webhook."""
    migrate(engine_for(database_url))
    broker = redis.Redis.from_url(redis_url)
    broker.delete(WEBHOOK_QUEUE)
    env = stack_env(database_url, redis_url, SDFLEET_WEBHOOK_TIMEOUT_S=str(DEADLINE_S),
                    SDFLEET_WEBHOOK_MAX_ATTEMPTS="1")
    log = tmp_path_factory.mktemp("ops") / "ops.log"
    proc = subprocess.Popen([sys.executable, "-m", "sdfleet", "ops"], cwd=ROOT, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    settings = Settings(database_url=database_url, redis_url=redis_url)
    try:
        yield session_factory(database_url), make_celery(settings), log
    finally:
        stop([proc])
        broker.delete(WEBHOOK_QUEUE)


def _finished_job_with_webhook(sessions, url: str) -> tuple[str, deliveries.WebhookHandout]:
    with sessions.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS, webhook_url=url))
        attempt = jobstore.start_attempt(s, job.id, job.delivery_id, "h", "h:1", 2)
        jobstore.finish_failed(s, attempt, ErrorCode.generation_failed, "boom", None)
    with sessions.begin() as s:
        return job.id, deliveries.webhook_handout(s, job.id)


def _hand_out(sessions, celery, url: str) -> str:
    job_id, handout = _finished_job_with_webhook(sessions, url)
    assert send_webhook(celery, job_id, handout.delivery_id, handout.attempts_done)
    return job_id


def _wait_arrival(prompt, job_id: str, timeout: float, log) -> float:
    deadline = time.monotonic() + timeout
    while not any(j == job_id for _, j, _ in prompt.arrivals):
        assert time.monotonic() < deadline, f"no webhook for {job_id}:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.01)
    return next(t for t, j, _ in prompt.arrivals if j == job_id)


def _prompt_delay(sessions, celery, prompt_url, prompt, log) -> float:
    handed_out = time.monotonic()
    job_id = _hand_out(sessions, celery, prompt_url)
    return _wait_arrival(prompt, job_id, 30, log) - handed_out


def _webhook_status(sessions, job_id: str) -> str:
    with sessions() as s:
        return s.get(Job, job_id).webhook_status


def test_trickling_receivers_are_cut_off_and_hold_up_no_one_else(ops, servers):
    sessions, celery, log = ops
    prompt_url, prompt = servers(_Prompt, arrivals=[])
    # the ops worker is up once a webhook arrives
    _wait_arrival(prompt, _hand_out(sessions, celery, prompt_url), 60, log)

    # 8 receivers that trickle, each with one webhook, handed out first
    tricklers = [_trickler(servers) for _ in range(8)]
    trickled = [_hand_out(sessions, celery, url) for url, _ in tricklers]
    time.sleep(0.3)  # theirs are taken first
    delay = _prompt_delay(sessions, celery, prompt_url, prompt, log)
    assert delay < PROMPT_S, f"a normal receiver waited {delay:.1f} s behind 8 trickling ones"

    # each trickling exchange was cut off at its deadline, and the webhook ended failed (one attempt here)
    deadline = time.monotonic() + DEADLINE_S + 10
    while not all(len(cls.exchanges) == 1 for _, cls in tricklers):
        assert time.monotonic() < deadline, [cls.exchanges for _, cls in tricklers]
        time.sleep(0.05)
    for _, cls in tricklers:
        (start, hung_up), = cls.exchanges
        assert DEADLINE_S - 0.5 < hung_up - start < DEADLINE_S + 1.5, hung_up - start
    while not all(_webhook_status(sessions, j) == "failed" for j in trickled):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_one_trickling_receiver_with_many_webhooks_holds_up_no_one_else(ops, servers):
    """More webhooks to one slow receiver than the ops worker has threads (SDFLEET_WEBHOOK_CONCURRENCY, 64):
    at most SDFLEET_WEBHOOK_PER_RECEIVER (4) are sent to it at once, the others wait their turn without
    taking a thread or an attempt."""
    sessions, celery, log = ops
    prompt_url, prompt = servers(_Prompt, arrivals=[])
    _wait_arrival(prompt, _hand_out(sessions, celery, prompt_url), 60, log)

    slow_url, slow = _trickler(servers)
    handouts = [_finished_job_with_webhook(sessions, slow_url) for _ in range(72)]
    for job_id, handout in handouts:  # all at once
        assert send_webhook(celery, job_id, handout.delivery_id, handout.attempts_done)
    many = [job_id for job_id, _ in handouts]
    deadline = time.monotonic() + 10
    while slow.open_now[0] < 4:
        assert time.monotonic() < deadline, slow.open_now
        time.sleep(0.01)
    time.sleep(0.3)  # theirs are all taken first
    delay = _prompt_delay(sessions, celery, prompt_url, prompt, log)
    assert delay < PROMPT_S, f"a normal receiver waited {delay:.1f} s behind one trickling receiver"
    assert slow.open_now[1] == 4, f"{slow.open_now[1]} exchanges open at once to one receiver"
    # the ones that waited are sent in turn as the first are cut off, each taking its own attempt (only then)
    deadline = time.monotonic() + 2 * DEADLINE_S + 10
    while len(slow.starts) < 5:
        assert time.monotonic() < deadline, slow.starts
        time.sleep(0.05)
    assert slow.starts[4] > min(slow.starts[:4]) + DEADLINE_S - 0.2  # once one was cut off
    started = len(slow.starts)  # each exchange's attempt was taken before it started
    with sessions() as s:
        attempts = [s.get(Job, j).webhook_attempts for j in many]
    assert set(attempts) <= {0, 1} and started <= sum(attempts) <= len(slow.starts) + 4
