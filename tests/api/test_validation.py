"""Bad input: 422 with the field and the reason in the one error shape; nothing stored, nothing enqueued."""

from __future__ import annotations

import pytest
import redis

from api.app import create_app
from shared import jobstore
from shared.fleet_contract import WorkerState
from shared.queue import queue_depth
from shared.settings import Settings
from tests.helpers import assert_error_shape

BAD_BODIES = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": "a cat", "negative_prompt": "x" * 2001}, "negative_prompt"),
    ({"prompt": "a cat", "width": 500}, "width"),
    ({"prompt": "a cat", "height": 516}, "height"),
    ({"prompt": "a cat", "width": 56}, "width"),
    ({"prompt": "a cat", "height": 2056}, "height"),
    ({"prompt": "a cat", "steps": 0}, "steps"),
    ({"prompt": "a cat", "steps": 151}, "steps"),
    ({"prompt": "a cat", "guidance_scale": -0.5}, "guidance_scale"),
    ({"prompt": "a cat", "guidance_scale": 30.5}, "guidance_scale"),
    ({"prompt": "a cat", "num_images": 0}, "num_images"),
    ({"prompt": "a cat", "num_images": 9}, "num_images"),
    ({"prompt": "a cat", "seed": -1}, "seed"),
    ({"prompt": "a cat", "seed": 2**32}, "seed"),
    ({"prompt": "a cat", "model": "../../etc"}, "model"),
    ({"prompt": "a cat", "colour": "red"}, "colour"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "a cat", "width": "512"}, "width"),
    ({"prompt": "a cat", "steps": 2.5}, "steps"),
    ({"prompt": "a cat", "steps": True}, "steps"),
    ({"prompt": "a cat", "guidance_scale": "7.5"}, "guidance_scale"),
    ({"prompt": "a cat", "num_images": None}, "num_images"),
    # text PostgreSQL cannot store (a 500 there once) and control characters nobody types
    ({"prompt": "a\u0000b"}, "prompt"),
    ({"prompt": "a cat", "negative_prompt": "blurry\u0000"}, "negative_prompt"),
    ({"prompt": "a \u001b[31mcat"}, "prompt"),
    # webhook URLs: control characters, header injection, credentials, addresses inside the fleet's network
    ({"prompt": "a cat", "webhook_url": "http://example.com/\u0000"}, "webhook_url"),
    ({"prompt": "a cat", "webhook_url": "http://example.com/a\r\nX-Injected: 1"}, "webhook_url"),
    ({"prompt": "a cat", "webhook_url": "http://user:pass@example.com/hook"}, "webhook_url"),
    ({"prompt": "a cat", "webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ({"prompt": "a cat", "webhook_url": "http://10.1.2.3/hook"}, "webhook_url"),
    ({"prompt": "a cat", "webhook_url": "http://169.254.169.254/latest/meta-data/"}, "webhook_url"),
    ({"prompt": "a cat", "webhook_url": "http://[fe80::1]/hook"}, "webhook_url"),
    ({"prompt": "a cat", "webhook_url": "http://0/hook"}, "webhook_url"),
]


@pytest.fixture
def unchanged(stack):
    """Asserts after the test that the job table and the model's queue did not change."""
    r = redis.Redis.from_url(stack.redis_url)
    with stack.sessions() as s:
        before = jobstore.count_jobs(s)
    queued_before = queue_depth(r, stack.model)
    yield
    with stack.sessions() as s:
        assert jobstore.count_jobs(s) == before
    assert queue_depth(r, stack.model) == queued_before


@pytest.mark.parametrize("body,field", BAD_BODIES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_BODIES)])
def test_bad_body_is_422_with_field_and_reason(stack, unchanged, body, field):
    error = assert_error_shape(stack.api.http.post("/v1/jobs", json=body), 422, "invalid_request")
    fields = {d["field"] for d in error["details"]}
    assert field in fields, error
    assert all(d["reason"] for d in error["details"])


def test_a_lone_surrogate_in_the_prompt_is_422(stack, unchanged):
    r = stack.api.http.post("/v1/jobs", content=b'{"prompt": "a \\ud800 cat"}',
                            headers={"content-type": "application/json"})
    error = assert_error_shape(r, 422, "invalid_request")
    assert error["details"][0]["field"] == "prompt"


@pytest.mark.parametrize("content,ctype", [
    (b"{not json", "application/json"),
    (b'["a cat"]', "application/json"),
    (b'"a cat"', "application/json"),
    (b"prompt=a+cat", "application/x-www-form-urlencoded"),
    (b"", "application/json"),
    (b'{"prompt": "a \xff\xfe cat"}', "application/json"),  # not UTF-8
    (b"[" * 1000 + b"]" * 1000, "application/json"),  # deeper than the parser recurses
    (b'{"prompt": "a cat", "seed": ' + b"9" * 5000 + b"}", "application/json"),  # past int's digit limit
])
def test_body_that_is_not_a_json_object_is_422(stack, unchanged, content, ctype):
    r = stack.api.http.post("/v1/jobs", content=content, headers={"content-type": ctype})
    error = assert_error_shape(r, 422, "invalid_request")
    assert error["details"][0]["field"] == "body"


def test_unknown_job_and_image_are_404_in_the_same_shape(stack):
    assert_error_shape(stack.api.http.get("/v1/jobs/no-such-job"), 404, "not_found")
    assert_error_shape(stack.api.http.get("/v1/jobs/no-such-job/images/0.png"), 404, "not_found")
    assert_error_shape(stack.api.http.get("/v1/nothing-here"), 404, "not_found")


def test_openapi_docs_are_served(stack):
    spec = stack.api.http.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/images/{index}.png"} <= set(spec["paths"])
    assert stack.api.http.get("/docs").status_code == 200


def test_broker_down_is_503_and_nothing_is_stored(sqlite_url):
    from fastapi.testclient import TestClient

    from tests.conftest import free_port

    settings = Settings(database_url=sqlite_url, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        default_model="tiny", auth="off")
    from shared import fleet
    from shared.db import session_factory
    from shared.models import utcnow

    with session_factory(sqlite_url).begin() as s:  # a live worker for "tiny", so admission passes
        fleet.beat(s, WorkerState(name="h:1", host="h", model="tiny", backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=8 << 30, cgroup_limit_bytes=None,
                                  total_ram_bytes=16 << 30, available_bytes=12 << 30, resident_bytes=600 << 20,
                                  current_job_id=None), utcnow())
    with TestClient(create_app(settings)) as client:
        r = client.post("/v1/jobs", json={"prompt": "a cat"})
    assert_error_shape(r, 503, "service_unavailable")
    with session_factory(sqlite_url)() as s:
        assert jobstore.count_jobs(s) == 0


def test_no_model_and_no_default_is_422(sqlite_url, redis_url):
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(database_url=sqlite_url, redis_url=redis_url, auth="off"))) as client:
        error = assert_error_shape(client.post("/v1/jobs", json={"prompt": "a cat"}), 422, "invalid_request")
    assert error["details"][0]["field"] == "model"
