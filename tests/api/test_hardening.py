"""The API's hardening, in-process against real Redis and each database (SQLite and PostgreSQL): statuses
inside the documented contract, webhook URLs that would reach inside the fleet refused at submit, auth that
cannot fall open. Live-process cases are in tests/system/test_faults.py and tests/worker/test_failures.py."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount

from shared import keys
from shared.db import engine_for, migrate, session_factory
from tests.conftest import POSTGRES_URL, postgres_database
from tests.helpers import BODY, assert_error_shape, count, make_api
from tests.helpers import api, database_url, db, fresh_url  # noqa: F401 (fixtures)


@pytest.mark.parametrize("job_id", ["%00", "x", "1%27%20OR%201=1", "a" * 300, "72045503-5ffa-4421-902f-05d8c70b2a6"])
def test_a_malformed_job_id_is_404_on_every_route(api, job_id):
    for method, path in [("get", "/v1/jobs/{}"), ("delete", "/v1/jobs/{}"), ("get", "/v1/jobs/{}/images/0.png"),
                         ("get", "/v1/jobs/{}/memory")]:
        assert_error_shape(getattr(api, method)(path.format(job_id)), 404, "not_found")


def _cursor(value) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()  # json.dumps escapes \u0000, \ud800
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


JOB = "72045503-5ffa-4421-902f-05d8c70b2a63"
WHEN = "2026-01-01T00:00:00+00:00"


@pytest.mark.parametrize("cursor,reason", [
    ("WyIyMDI2LTAxLTAxVDAwOjAwOjAwIiwgIngiXQ", "job ID"),  # ["2026-01-01T00:00:00", "x"], as the tester sent it
    (_cursor(["2026-01-01T00:00:00", JOB]), "time zone"),  # naive: the database layer refused it (a 500)
    (_cursor([WHEN, "a\u0000b"]), "job ID"),  # NUL: PostgreSQL's DataError
    (_cursor([WHEN, "\ud800"]), "job ID"),  # a lone surrogate: UnicodeEncodeError
    (_cursor([WHEN, JOB + "\n"]), "job ID"),  # a UUID and a newline (a `$` that matches before it)
    (_cursor([WHEN, JOB.upper()]), "job ID"),
    (_cursor([WHEN, 5]), "pair"), (_cursor([WHEN]), "pair"), (_cursor([WHEN, JOB, JOB]), "pair"),
    (_cursor({WHEN: 1, JOB: 2}), "pair"), (_cursor(None), "pair"), (_cursor("x"), "pair"),
    (_cursor(["yesterday", JOB]), "ISO 8601"), (_cursor(["2026-01-01T00:00:00\u0000+00:00", JOB]), "ISO 8601"),
    (_cursor(["0001-01-01T00:00:00+14:00", JOB]), "out of range"),
    (_cursor(b"\xff\xfe"), "JSON"), ("not-a-cursor", "JSON"), ("%00", "JSON"),
])
def test_a_cursor_the_api_never_gave_out_is_422_with_the_reason(api, cursor, reason):
    error = assert_error_shape(api.get("/v1/jobs", params={"cursor": cursor}), 422, "invalid_request")
    assert error["details"][0]["field"] == "cursor" and reason in error["details"][0]["reason"], error
    assert reason in error["message"]


def test_a_cursor_pages_the_same_whatever_zone_its_time_is_written_in(api):
    ids = [api.post("/v1/jobs", json=BODY).json()["id"] for _ in range(3)]
    first = api.get("/v1/jobs", params={"limit": 1}).json()
    assert first["jobs"][0]["id"] == ids[-1]
    rest = api.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()["jobs"]
    assert [j["id"] for j in rest] == ids[-2::-1]
    created, job_id = json.loads(base64.urlsafe_b64decode(first["next_cursor"] + "=="))
    shifted = datetime.fromisoformat(created).astimezone(timezone(timedelta(hours=2))).isoformat()  # same instant
    again = api.get("/v1/jobs", params={"limit": 2, "cursor": _cursor([shifted, job_id])}).json()["jobs"]
    assert [j["id"] for j in again] == [j["id"] for j in rest]


def test_wrong_method_is_405_with_allow_and_a_trailing_slash_is_404_not_a_redirect(api):
    r = api.put("/v1/jobs", json=BODY)
    assert_error_shape(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, POST"
    r = api.put(f"/v1/jobs/{uuid.uuid4()}", json=BODY)
    assert_error_shape(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "DELETE, GET"
    r = api.post("/v1/jobs/", json=BODY, follow_redirects=False)
    assert_error_shape(r, 404, "not_found")


METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _route_paths(app) -> dict[str, set[str]]:
    """Every path of the app (a sample of each: UUIDs for job IDs, 0 for an index, a file under a mount) and the
    methods its routes take, all of them: two routes of one path (GET and DELETE /v1/jobs/{id}) add up."""
    samples = {"{job_id}": str(uuid.uuid4()), "{index}": "0", "{role}": "image"}
    paths: dict[str, set[str]] = {}
    for route in iter_route_contexts(app.routes):  # included routers' routes too, with their prefixes
        if isinstance(route.original_route, Mount):  # the web page's files: StaticFiles takes GET and HEAD
            paths.setdefault(route.path + "/app.js", set()).update({"GET", "HEAD"})
            continue
        path = route.path
        for name, value in samples.items():
            path = path.replace(name, value)
        assert "{" not in path, f"no sample value for {route.path}"
        paths.setdefault(path, set()).update(route.methods)
    return paths


def test_every_405_names_every_method_its_path_takes(api):
    paths = _route_paths(api.app)
    assert {"/v1/jobs", "/v1/images/generations", "/openapi.json", "/healthz", "/"} <= set(paths)
    for path, allowed in paths.items():
        for method in METHODS:
            if method in allowed:
                continue
            r = api.request(method, path)
            assert r.status_code == 405, (method, path, r.status_code, r.text)
            assert r.headers["allow"] == ", ".join(sorted(allowed)), (method, path)
            if method == "HEAD":
                continue  # no body
            if path.startswith("/v1/images/"):  # OpenAI's shape on its route
                assert r.json()["error"]["code"] == "method_not_allowed", r.text
            else:
                assert_error_shape(r, 405, "method_not_allowed")


def test_a_body_over_the_cap_is_413_whether_it_says_its_length_or_not(api, db):
    """SDFLEET_MAX_BODY_BYTES on a route that takes no image (POST /v1/plan); the routes that take images have
    a larger cap (tests/api/test_images_in.py)."""
    before = count(db)
    big = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    r = api.post("/v1/plan", content=big, headers={"content-type": "application/json"})
    error = assert_error_shape(r, 413, "payload_too_large")
    assert error["details"]["max_body_bytes"] == 64 * 1024

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b" " * 4096
        yield b'{"width": 64}'

    r = api.post("/v1/plan", content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(r, 413, "payload_too_large")
    upload = api.app.state.ctx.settings.upload_body_bytes
    r = api.post("/v1/jobs", content=b" " * (upload + 1), headers={"content-type": "application/json"})
    assert assert_error_shape(r, 413, "payload_too_large")["details"]["max_body_bytes"] == upload
    assert count(db) == before


def test_blank_idempotency_key_is_422(api, db):
    before = count(db)
    for key in ("", "   ", "caf\u00e9"):
        r = api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key.encode()})
        assert_error_shape(r, 422, "invalid_request")
    assert count(db) == before
    assert api.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "order-17"}).status_code == 202


def test_the_openapi_schema_describes_every_status_and_the_webhook_rules(api):
    spec = api.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"200", "202", "401", "404", "409", "410"} <= set(paths["/v1/jobs/{job_id}"]["delete"]["responses"])
    assert {"200", "202", "401", "409", "413", "422", "429", "503"} <= set(paths["/v1/jobs"]["post"]["responses"])
    hook = spec["components"]["schemas"]["JobCreate"]["properties"]["webhook_url"]
    assert "public addresses" in hook["description"] and "credentials" in hook["description"]


@pytest.mark.parametrize("url,why", [
    ("http://localhost:6379/", "loopback"), ("http://127.0.0.1:8000/v1/jobs", "loopback"),
    ("http://2130706433/", "loopback"), ("http://0/", "unspecified"), ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"), ("http://10.0.0.1/", "private"), ("http://192.168.1.1/", "private"),
    ("http://172.16.0.1/", "private"), ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://224.0.0.1/", "multicast"), ("http://240.0.0.1/", "reserved"),
    ("http://user:pass@203.0.113.5/", "credentials"), ("http://203.0.113.5/\r\nX: 1", "control"),
    ("http://no-such-host.invalid/", "does not resolve"),
    # IPv6 addresses that carry a refused IPv4 address, whatever range they are in
    ("http://[2002:7f00:1::]/", "loopback address (6to4 for 127.0.0.1)"),
    ("http://[2002:a00:1::]/", "private address (6to4 for 10.0.0.1)"),
    ("http://[2002:a9fe:a9fe::1]/", "link-local address (6to4 for 169.254.169.254)"),
    ("http://[64:ff9b::7f00:1]/", "loopback address (NAT64 for 127.0.0.1)"),
    ("http://[64:ff9b::a00:1]/", "private address (NAT64 for 10.0.0.1)"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local address (NAT64 for 169.254.169.254)"),
    ("http://[64:ff9b:1::7f00:1]/", "NAT64 local-use"), ("http://[64:ff9b:1::5db8:d70e]/", "NAT64 local-use"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "loopback address (Teredo client for 127.0.0.1)"),
    ("http://[2001:0:a00:1::a247:28f1]/", "private address (Teredo server for 10.0.0.1)"),
    ("http://[::ffff:10.0.0.1]/", "private address (IPv4-mapped for 10.0.0.1)"),
    ("http://[::127.0.0.1]/", "loopback address (IPv4-compatible for 127.0.0.1)"),
    ("http://[::10.0.0.1]/", "private address (IPv4-compatible for 10.0.0.1)"),
])
def test_webhooks_that_would_reach_inside_are_refused_at_submit(api, db, url, why):
    """Checked without a packet leaving the machine: these are literals, or names the test resolver refuses."""
    before = count(db)
    error = assert_error_shape(api.post("/v1/jobs", json={**BODY, "webhook_url": url}), 422, "invalid_request")
    assert error["details"][0]["field"] == "webhook_url" and why in error["message"], error
    assert count(db) == before


@pytest.mark.parametrize("url", ["http://93.184.215.14/hook", "http://[2606:4700::1111]/hook",
                                 "http://[2002:5db8:d70e::1]/hook", "http://[64:ff9b::5db8:d70e]/hook",
                                 "http://[::ffff:93.184.215.14]/hook"])
def test_webhooks_to_public_addresses_are_accepted_whatever_carries_them(api, url):
    """A public IPv4 address through 6to4, NAT64's well-known prefix (DNS64 networks) or IPv4-mapped."""
    assert api.post("/v1/jobs", json={**BODY, "webhook_url": url}).status_code == 202


def test_an_operator_can_allow_an_internal_network(db, database_url, redis_url):
    with make_api(database_url, redis_url, webhook_allow_networks="127.0.0.0/8") as client:
        assert client.post("/v1/jobs", json={**BODY, "webhook_url": "http://127.0.0.1:9/hook"}).status_code == 202
        r = client.post("/v1/jobs", json={**BODY, "webhook_url": "http://10.0.0.1/hook"})
        assert_error_shape(r, 422, "invalid_request")


ROUTES = [("post", "/v1/jobs"), ("get", f"/v1/jobs/{uuid.uuid4()}"), ("get", "/v1/workers"), ("get", "/v1/models"),
          ("get", "/metrics")]


def _all_401(client, headers=None):
    for method, path in ROUTES:
        kwargs = {"json": BODY} if method == "post" else {}
        assert_error_shape(getattr(client, method)(path, headers=headers or {}, **kwargs), 401, "unauthorized")


def test_revoking_the_last_key_never_opens_the_api(fresh_url, redis_url):
    db = session_factory(fresh_url)
    with make_api(fresh_url, redis_url, auth="auto", api_host="127.0.0.1") as client:
        assert client.post("/v1/jobs", json=BODY).status_code == 202  # loopback and no key ever: open
        with db.begin() as s:
            key = keys.create_key(s, f"k-{uuid.uuid4().hex[:6]}")
        with db.begin() as s:
            assert keys.revoke(s, key.name)
        client.app.state.ctx._auth["checked"] = float("-inf")  # as after the 5 s every host re-reads keys
        _all_401(client)
        _all_401(client, {"Authorization": f"Bearer {key.token}"})  # the revoked key stays revoked
        assert client.get("/healthz").status_code == 200


def test_required_auth_with_no_key_refuses_everyone_and_unknown_bind_is_required(db, database_url, redis_url):
    with make_api(database_url, redis_url, auth="required", api_host="127.0.0.1") as client:
        _all_401(client)
    with make_api(database_url, redis_url, auth="auto", api_host="0.0.0.0") as client:
        _all_401(client)
    with make_api(database_url, redis_url, auth="auto", api_host=None) as client:  # built elsewhere: not open
        _all_401(client)


@pytest.fixture
def openai_api(db, database_url, redis_url):
    """The API with a short wait on /v1/images/generations: a job it admits (nobody runs it) answers 504 at once."""
    with make_api(database_url, redis_url, images_wait_s=0.2) as client:
        yield client


@pytest.mark.parametrize("field,value,param", [
    ("size", "64x64\n", "size"),  # Python's `$` matches before a final newline
    ("size", "\u0666\u0664x\u0666\u0664", "size"),  # Arabic-Indic digits: `\d` matches them, int() reads 64
    ("size", "\u06f6\u06f4x\u06f6\u06f4", "size"),  # extended Arabic-Indic
    ("size", "\uff16\uff14x\uff16\uff14", "size"),  # fullwidth
    ("size", " 64x64", "size"), ("size", "64x64 ", "size"), ("size", "64X64", "size"), ("size", "64x", "size"),
    ("size", "+64x64", "size"), ("size", 64, "size"),
    ("n", "2", "n"), ("n", True, "n"), ("n", 2.0, "n"), ("steps", "1", "steps"), ("seed", "7", "seed"),
    ("guidance_scale", "1.0", "guidance_scale"), ("prompt", 5, "prompt"), ("user", 5, "user"),
])
def test_the_openai_route_is_as_strict_as_v1_jobs(openai_api, db, field, value, param):
    before = count(db)
    r = openai_api.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64", "steps": 1, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_value" and error["type"] == "invalid_request_error" and error["param"] == param
    assert r.headers["x-should-retry"] == "false"
    assert count(db) == before  # nothing stored


def test_the_openai_route_takes_what_v1_jobs_takes(openai_api, db):
    """The other side of the strictness: an ASCII size, numbers as numbers (an int guidance scale too), "auto"."""
    before = count(db)
    for body in ({"size": "64x64", "n": 2, "steps": 1, "guidance_scale": 1, "seed": 7}, {"size": "auto"}):
        r = openai_api.post("/v1/images/generations", json={"prompt": "a cat", **body})
        assert r.status_code == 504 and r.json()["error"]["code"] == "job_timeout", r.text  # admitted, never run
    assert count(db) == before + 2


def test_a_used_up_database_pool_is_503_with_retry_after_never_a_500(redis_url):
    """A real PostgreSQL engine whose pool is one connection and whose wait is 0.2 s: while that connection is
    held, a request that needs the database waits 0.2 s and is answered 503 in the error shape, with
    Retry-After, and nothing is stored; once it is free again the same requests go through."""
    if not POSTGRES_URL:
        pytest.skip("SDFLEET_TEST_POSTGRES_URL is not set (CI sets it to the local server)")
    for url in postgres_database():
        migrate(engine_for(url))
        with make_api(url, redis_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout_s=0.2,
                      images_wait_s=0.2) as client:
            engine = client.app.state.ctx.sessions.kw["bind"]
            assert engine.dialect.name == "postgresql" and engine.pool.size() == 1
            before = count(session_factory(url))
            client.get("/v1/jobs")  # the fleet cache and the pool warm
            held = engine.connect()  # the pool's one connection, as a slow request would hold it
            try:
                for method, path, kwargs in [("get", "/v1/jobs", {}), ("get", f"/v1/jobs/{uuid.uuid4()}", {}),
                                             ("post", "/v1/jobs", {"json": BODY}), ("get", "/v1/workers", {})]:
                    started = time.monotonic()
                    r = getattr(client, method)(path, **kwargs)
                    error = assert_error_shape(r, 503, "service_unavailable")
                    assert "database connection" in error["message"] and r.headers["retry-after"] == "1"
                    assert time.monotonic() - started >= 0.2
                r = client.post("/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable", r.text
                assert r.headers["retry-after"] == "1" and r.headers["x-should-retry"] == "true"
            finally:
                held.close()
            assert count(session_factory(url)) == before  # nothing was stored
            assert client.get("/v1/jobs").status_code == 200
            assert client.post("/v1/jobs", json=BODY).status_code == 202
        engine.dispose()
