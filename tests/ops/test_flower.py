"""Flower, run as docs/deploy.md says, lists the fleet's workers and jobs.

Flower learns workers by remote control (inspect) and tasks from Celery events. It runs on sdfleet's own
Celery app (`-A ops.app:app`, no model stack): make_celery's Redis transport options (the priority
separator) also shape the broker's binding keys, and a worker cannot route an inspect reply to a client
that declared its reply queue with other options. make_celery sets worker_send_task_events=False, so a
worker sends only its heartbeat events until Flower's periodic `enable_events` broadcast (every 5 s)
switches task events on: nothing in sdfleet has to change for it."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import pytest

from sdfleet.stack import stop
from tests.conftest import free_port, stack_env

# Flower's API answers 401 without an authentication option (or FLOWER_UNAUTHENTICATED_API)
USER, PASSWORD = "flower", "flower-test-secret"


def until(probe, timeout: float, what: str, log=None):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"{what} after {timeout:.0f} s\n{tail}")
        time.sleep(0.3)


@pytest.mark.one_database
def test_flower_lists_the_workers_and_the_jobs(stack, tmp_path):
    port = free_port()
    log = tmp_path / "flower.log"
    # tornado options need --name=value: Flower drops a separate value ("--port 5555") before parsing
    cmd = [sys.executable, "-m", "celery", "-A", "ops.app:app", "flower", f"--port={port}", "--address=127.0.0.1",
           f"--basic_auth={USER}:{PASSWORD}"]
    env = {k: v for k, v in stack_env(stack.database_url, stack.redis_url).items() if not k.startswith("FLOWER_")}
    with open(log, "ab") as out:
        flower = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=base, auth=(USER, PASSWORD), timeout=10)

        def answers() -> bool:
            assert flower.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                return http.get("/healthcheck").status_code == 200
            except httpx.TransportError:
                return False

        until(answers, 30, "Flower did not answer", log)
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401

        # Flower's event receiver hears the stack's worker: its heartbeat events are on whatever the settings
        def alive_worker() -> str | None:
            status = http.get("/api/workers", params={"status": "true"}).json()
            return next((n for n, alive in status.items() if n.startswith("sdfleet@") and alive), None)

        node = until(alive_worker, 30, "Flower never heard the worker's heartbeat", log)

        # remote control: the worker and the queues it consumes (its model's memory classes)
        def inspected() -> dict | None:
            info = http.get("/api/workers", params={"refresh": "true"}).json().get(node) or {}
            return info if "active_queues" in info and "stats" in info else None

        info = until(inspected, 30, f"Flower could not inspect {node}", log)
        assert info["stats"]["pid"] == stack.worker.pid
        queues = {q["name"] for q in info["active_queues"]}
        pattern = re.compile(rf"sdfleet\.model\.{re.escape(stack.model)}\.mem-\d+mib")
        assert queues and all(pattern.fullmatch(q) for q in queues), queues

        # A job that ran before Flower's first enable_events sent no task events, so submit until one is seen
        def task_of(job_id: str) -> dict | None:
            tasks = http.get("/api/tasks", params={"taskname": "sdfleet.generate"}).json()
            return next((t for t in tasks.values() if job_id in (t.get("args") or "") and t["state"] == "SUCCESS"),
                        None)

        deadline = time.monotonic() + 60
        while True:
            job = stack.api.wait(stack.api.submit(prompt="a cat", width=64, height=64, steps=1)["id"], timeout=60)
            assert job["status"] == "succeeded", job
            try:
                task = until(lambda: task_of(job["id"]), 5, "no task event")
                break
            except AssertionError:
                assert time.monotonic() < deadline, f"Flower never listed a job\n{log.read_text(errors='replace')[-3000:]}"

        assert task["name"] == "sdfleet.generate" and task["worker"] == node
        assert task["received"] and task["succeeded"] and task["runtime"] is not None
        assert http.get(f"/api/task/info/{task['uuid']}").json()["state"] == "SUCCESS"
    finally:
        stop([flower])
