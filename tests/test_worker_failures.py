"""A pipeline that raises fails that job with a clear code; the same worker then runs the next job."""

from __future__ import annotations

import uuid

import pytest

from sdfleet.stack import stop
from tests.conftest import stack_env, start_worker, wait_worker_ready


@pytest.fixture
def raising_worker(stack, tiny_model, tmp_path):
    """A second worker on the same API, Redis and database, serving its own model name with a pipeline
    that raises for prompts containing FAIL (and is the real tiny pipeline otherwise)."""
    model = f"tiny-raising-{uuid.uuid4().hex[:6]}"
    env = stack_env(stack.database_url, stack.redis_url, SDFLEET_MODEL=str(tiny_model),
                    SDFLEET_MODEL_NAME=model, SDFLEET_BACKEND="tests.fakes:faulty")
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    try:
        wait_worker_ready(proc, log, stack.database_url, model)
        yield model, proc
    finally:
        stop([proc])


def test_exception_fails_the_job_and_the_next_job_succeeds_on_the_same_worker(stack, raising_worker):
    import psutil

    model, proc = raising_worker
    (child,) = psutil.Process(proc.pid).children()
    failed = stack.api.wait(stack.api.submit(prompt="FAIL please", model=model, width=64, height=64,
                                             steps=1)["id"], timeout=120)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "generation_failed"
    assert "RuntimeError: injected failure" in failed["error"]["message"]
    assert failed["images"] == [] and failed["attempts"] == 1
    assert failed["finished_at"] is not None and failed["peak_rss_bytes"] > 0

    ok = stack.api.wait(stack.api.submit(prompt="a quiet river", model=model, width=64, height=64,
                                         steps=1)["id"], timeout=120)
    assert ok["status"] == "succeeded", ok["error"]
    assert len(ok["images"]) == 1
    assert [c.pid for c in psutil.Process(proc.pid).children()] == [child.pid]  # the same pool child
