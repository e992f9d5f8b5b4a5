"""Operations on the real stack: cancel, progress and queue position, priorities, idempotent submit,
webhooks (signed, retried, never in the worker's way), metrics."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

from shared import keys
from tests.conftest import WEBHOOK_SECRET, wait_for
from tests.helpers import assert_error_shape
from tests.helpers import wait_status

# 150 steps at 256x256: seconds on the tiny model (a quarter of 512x512's work), long enough to watch it run
LONG = dict(width=256, height=256, steps=150, guidance_scale=1.0)
SHORT = dict(width=64, height=64, steps=1)


@pytest.mark.one_database  # the cancel's compare-and-set races on both databases in tests/shared/test_races.py
def test_cancel_queued_never_runs_running_stops_at_next_step_finished_is_409(stack, spawn_worker):
    model, _ = spawn_worker("cancel")
    running = stack.api.submit(prompt="a long job", model=model, **LONG)
    queued = stack.api.submit(prompt="waits behind it", model=model, **SHORT)
    wait_status(stack, running["id"], "running")

    r = stack.api.http.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = stack.api.http.delete(f"/v1/jobs/{running['id']}")
    assert r.status_code == 202
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True

    done = stack.api.wait(running["id"], timeout=60)
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert done["images"] == [] and done["finished_at"]
    after = stack.api.job(queued["id"])
    assert after["status"] == "cancelled" and after["attempts"] == 0 and after["started_at"] is None
    # the worker goes on: the next job runs, and the cancelled one still never did
    nxt = stack.api.wait(stack.api.submit(prompt="next", model=model, **SHORT)["id"], timeout=60)
    assert nxt["status"] == "succeeded"
    assert stack.api.job(queued["id"])["attempts"] == 0

    assert_error_shape(stack.api.http.delete(f"/v1/jobs/{nxt['id']}"), 409, "conflict")
    assert_error_shape(stack.api.http.delete("/v1/jobs/no-such-job"), 404, "not_found")


@pytest.mark.one_database
def test_progress_while_running_and_queue_position_while_queued(stack, spawn_worker):
    model, _ = spawn_worker("progress")
    first = stack.api.submit(prompt="a long job", model=model, num_images=2, **LONG)
    second = stack.api.submit(prompt="second", model=model, **SHORT)
    third = stack.api.submit(prompt="third", model=model, **SHORT)
    wait_status(stack, first["id"], "running")
    assert stack.api.job(second["id"])["queue_position"] == 1
    assert stack.api.job(third["id"])["queue_position"] == 2

    seen = []
    while (job := stack.api.job(first["id"]))["status"] == "running":
        if job["progress"]:
            seen.append((job["progress"]["image"], job["progress"]["step"]))
            assert job["progress"]["steps"] == 150 and job["progress"]["images"] == 2
        time.sleep(0.1)
    assert job["status"] == "succeeded" and job["progress"] is None
    assert len(set(seen)) >= 2 and seen == sorted(seen)  # it moved forward, never back
    assert all(0 <= step <= 150 for _, step in seen)
    for j in (second, third):
        assert stack.api.wait(j["id"], timeout=60)["status"] == "succeeded"


@pytest.mark.one_database
def test_priorities_are_honoured_by_the_broker(stack, spawn_worker):
    model, _ = spawn_worker("priority")
    blocker = stack.api.submit(prompt="a long job", model=model, **LONG)
    wait_status(stack, blocker["id"], "running")
    low = [stack.api.submit(prompt=f"low {i}", model=model, priority="low", **SHORT) for i in range(2)]
    normal = stack.api.submit(prompt="normal", model=model, **SHORT)
    high = stack.api.submit(prompt="high", model=model, priority="high", **SHORT)
    assert stack.api.job(high["id"])["queue_position"] == 1
    assert stack.api.job(low[1]["id"])["queue_position"] == 4
    done = [stack.api.wait(j["id"], timeout=120) for j in [blocker, *low, normal, high]]
    order = [d["parameters"]["prompt"] for d in sorted(done[1:], key=lambda d: d["started_at"])]
    assert order == ["high", "normal", "low 0", "low 1"]


def test_idempotent_submit(stack):
    body = {"prompt": "a cat", **SHORT, "seed": 5}
    headers = {"Idempotency-Key": "order-42"}
    first = stack.api.http.post("/v1/jobs", json=body, headers=headers)
    again = stack.api.http.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = stack.api.http.post("/v1/jobs", json={**body, "seed": 6}, headers=headers)
    error = assert_error_shape(other, 409, "idempotency_conflict")
    assert error["details"]["job_id"] == first.json()["id"]
    fresh = stack.api.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-43"})
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
    stack.api.wait(first.json()["id"], timeout=60)


class _Hook(http.server.BaseHTTPRequestHandler):
    """Records POSTs; fails the first `fail_first` of them, and sleeps `delay_s` before answering."""

    received: list
    fail_first = 0
    delay_s = 0.0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay_s)
        self.received.append((time.monotonic(), dict(self.headers), body))
        ok = len(self.received) > self.fail_first
        self.send_response(200 if ok else 500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook_server():
    servers = []

    def start(fail_first=0, delay_s=0.0):
        handler = type("Hook", (_Hook,), {"received": [], "fail_first": fail_first, "delay_s": delay_s})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/hook", handler.received

    yield start
    for s in servers:
        s.shutdown()


def _wait_webhook(stack, job_id, status="delivered", timeout=60):
    return wait_for(stack, job_id, "webhook_status", status, timeout)


@pytest.mark.one_database
def test_webhook_is_retried_with_backoff_until_delivered(stack, webhook_server):
    url, received = webhook_server(fail_first=2)
    job = stack.api.submit(prompt="a cat", webhook_url=url, **SHORT)
    done = _wait_webhook(stack, job["id"])
    assert done["status"] == "succeeded"
    assert len(received) == 3
    gaps = [b[0] - a[0] for a, b in zip(received, received[1:])]
    # the backoff grows: 1 s, then 2 s, at least (a loaded machine only adds to each gap, by a varying amount,
    # so their ratio says nothing; each scheduled wait is a floor)
    assert gaps[0] >= 0.95 and gaps[1] >= 1.95, gaps
    _, headers, body = received[-1]
    record = json.loads(body)
    assert record["id"] == job["id"] and record["status"] == "succeeded" and record["images"]
    assert headers["X-Sdfleet-Job"] == job["id"]
    # signed: HMAC-SHA256 of the exact body with the secret (an open API's SDFLEET_WEBHOOK_SECRET here)
    assert keys.verify(WEBHOOK_SECRET, body, headers[keys.SIGNATURE_HEADER])
    assert not keys.verify("another secret", body, headers[keys.SIGNATURE_HEADER])


@pytest.mark.one_database
def test_a_slow_webhook_does_not_hold_up_the_workers_next_job(stack, webhook_server):
    url, received = webhook_server(delay_s=6)
    first = stack.api.submit(prompt="with a slow hook", webhook_url=url, **SHORT)
    stack.api.wait(first["id"], timeout=60)
    second = stack.api.wait(stack.api.submit(prompt="the next job", **SHORT)["id"], timeout=60)
    assert second["status"] == "succeeded"
    assert stack.api.job(first["id"])["webhook_status"] == "pending"  # still being delivered
    _wait_webhook(stack, first["id"])
    assert len(received) == 1


@pytest.mark.one_database  # the cancel's compare-and-set races on both databases in tests/shared/test_races.py
def test_cancelled_queued_job_calls_its_webhook(stack, spawn_worker, webhook_server):
    url, received = webhook_server()
    model, _ = spawn_worker("hooked")
    blocker = stack.api.submit(prompt="a long job", model=model, **LONG)
    wait_status(stack, blocker["id"], "running")
    job = stack.api.submit(prompt="never runs", model=model, webhook_url=url, **SHORT)
    stack.api.http.delete(f"/v1/jobs/{job['id']}")
    _wait_webhook(stack, job["id"])
    assert json.loads(received[0][2])["status"] == "cancelled"
    stack.api.http.delete(f"/v1/jobs/{blocker['id']}")


def test_metrics(stack):
    done = stack.api.wait(stack.api.submit(prompt="a cat", **SHORT)["id"], timeout=60)
    assert done["status"] == "succeeded"
    r = stack.api.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines['sdfleet_jobs{state="succeeded"}'] >= 1
    assert f'sdfleet_queue_depth{{model="{stack.model}"}}' in lines
    assert lines[f'sdfleet_job_duration_seconds_count{{model="{stack.model}"}}'] >= 1
    assert lines[f'sdfleet_job_queue_wait_seconds_bucket{{le="+Inf",model="{stack.model}"}}'] >= 1
    assert lines[f'sdfleet_job_peak_rss_bytes_sum{{model="{stack.model}"}}'] >= done["peak_rss_bytes"]
    assert lines[f'sdfleet_workers{{alive="true",model="{stack.model}"}}'] >= 1
    assert any(k.startswith("sdfleet_worker_budget_bytes{") for k in lines)
