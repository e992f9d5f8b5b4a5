"""The API fuzzed from its own OpenAPI schema (schemathesis, in-process against real Redis, on SQLite and on
PostgreSQL, which refuses what SQLite stores: NUL characters, lone surrogates): valid (positive) and invalid
(negative) requests for every operation, never a 5xx (but the documented 503 model_unavailable for a model no
worker serves), only documented statuses, and every error in the one JSON shape (OpenAI's on /v1/images/*).
The routes that take images (POST /v1/jobs, POST /v1/images/edits) are fuzzed as JSON and as multipart/form-data
(file parts of random bytes), and the fake worker takes image jobs (its defaults announce their kinds)."""

from __future__ import annotations

import collections
import itertools
import uuid

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from api.app import create_app
from shared import fleet
from shared.fleet_contract import WorkerState
from shared.db import engine_for, migrate, session_factory
from shared.memory import GB
from shared.models import utcnow
from shared.settings import Settings
from tests.conftest import offline_resolver
from tests.helpers import IMAGE_DEFAULTS

DOCUMENTED_STATUSES = {200, 202, 401, 404, 405, 409, 410, 413, 422, 429, 503}  # docs/api.md's error table
# The OpenAI-compatible route answers in OpenAI's shape; with no worker running jobs, an admitted one outlives
# the wait (504 job_timeout)
OPENAI_STATUSES = {200, 400, 401, 404, 405, 409, 413, 429, 504}


@pytest.fixture(scope="module")
def fuzz_schema(database_url, redis_url):
    url = database_url
    migrate(engine_for(url))
    model = f"fuzz-{uuid.uuid4().hex[:6]}"  # a live worker for the default model, so valid jobs are admitted
    with session_factory(url).begin() as s:
        fleet.beat(s, WorkerState(name="fuzz:1", host="fuzz", model=model, backend="optimum", precision="bf16",
                                  memory_mode="fast", budget_bytes=16 * GB, cgroup_limit_bytes=None,
                                  total_ram_bytes=24 * GB, available_bytes=20 * GB, resident_bytes=GB,
                                  current_job_id=None, defaults=IMAGE_DEFAULTS), utcnow())
    app = create_app(Settings(database_url=url, redis_url=redis_url, default_model=model, worker_stale_s=3600,
                              heartbeat_s=5, auth="off", images_wait_s=0.05), resolver=offline_resolver)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(schema):
    for result in schema.get_all_operations():
        yield result.ok()


UPLOADS = ("POST /v1/jobs", "POST /v1/images/edits")


def test_no_5xx_and_one_error_shape(fuzz_schema):
    # schemathesis's own pytest plugin does not run under pytest 9 yet: drive its strategies with hypothesis
    operations = list(_operations(fuzz_schema))
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/jobs", "GET /v1/jobs", "GET /v1/jobs/{job_id}", "DELETE /v1/jobs/{job_id}", "GET /metrics",
        "POST /v1/plan", "POST /v1/images/generations", "POST /v1/images/edits",
        "GET /v1/jobs/{job_id}/preview"}
    sent = collections.defaultdict(collections.Counter)  # the bodies' content types, by operation
    for op, mode in itertools.product(operations, GenerationMode):
        name = f"{op.method.upper()} {op.path}"
        if op.path.startswith("/v1/images/"):
            _check_openai(op, mode, sent[name])
            continue

        @given(case=op.as_strategy(mode))
        @settings(max_examples=60 if name in UPLOADS else 40, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            sent[name][case.media_type] += 1
            response = case.call()
            # 503 model_unavailable is the documented answer for a model no worker serves (#3), not a fault
            documented = response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
            assert response.status_code < 500 or documented, (case.as_curl_command(), response.text)
            assert response.status_code in DOCUMENTED_STATUSES, (case.as_curl_command(), response.text)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"}, body
                assert set(body["error"]) == {"code", "message", "details"} and body["error"]["message"], body

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation with no inputs has no invalid request
    for name in UPLOADS:  # both kinds of body were sent, many times each
        assert sent[name]["multipart/form-data"] >= 10 and sent[name]["application/json"] >= 10, (name, sent[name])


def _check_openai(op, mode, sent: collections.Counter) -> None:
    @given(case=op.as_strategy(mode))
    @settings(max_examples=60 if op.path.endswith("/edits") else 40, deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        sent[case.media_type] += 1
        response = case.call()
        assert response.status_code in OPENAI_STATUSES, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"}, body
            assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"], body
            assert response.status_code != 504 or body["error"]["code"] == "job_timeout", body

    try:
        check()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE
