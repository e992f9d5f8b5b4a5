"""API keys: required everywhere but health once configured, stored hashed, scoped (another key's job is
404, not 403), rate-limited (429 + Retry-After). The API in-process on its own database and real Redis."""

from __future__ import annotations

import uuid

from fastapi.routing import iter_route_contexts
from sqlalchemy import select
from starlette.routing import Mount

from shared import jobstore, keys
from shared.db import session_factory
from shared.models import ApiKey
from tests.helpers import BODY, assert_error_shape, auth, make_api, secured  # noqa: F401 (a fixture)


def test_keys_are_stored_hashed(secured):
    _, sessions, alice, _ = secured
    with sessions() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.name == "alice"))
    assert row.key_hash == keys.hash_token(alice.token) and alice.token not in row.key_hash


def test_no_key_or_a_wrong_key_is_401_on_every_route_but_health(secured):
    client, *_ = secured
    for method, path in [("post", "/v1/jobs"), ("get", "/v1/jobs/x"), ("delete", "/v1/jobs/x"),
                         ("get", "/v1/jobs/x/images/0.png"), ("get", "/v1/jobs/x/memory"),
                         ("get", "/v1/workers"), ("get", "/v1/models"), ("get", "/metrics")]:
        kwargs = {"json": BODY} if method == "post" else {}
        r = getattr(client, method)(path, **kwargs)
        assert_error_shape(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        r = getattr(client, method)(path, headers={"Authorization": "Bearer sdf_wrong"}, **kwargs)
        assert_error_shape(r, 401, "unauthorized")
    assert client.get("/healthz").status_code == 200


def test_a_key_sees_only_its_own_jobs_and_images(secured):
    client, sessions, alice, bob = secured
    job = client.post("/v1/jobs", json=BODY, headers=auth(alice)).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(alice)).status_code == 200
    # give it an image, as a worker would
    with sessions.begin() as s:
        attempt = jobstore.start_attempt(s, job["id"], None, "h", "h:1", 2)
        jobstore.finish_succeeded(s, attempt, [jobstore.GeneratedImage(0, 1, 64, 64, b"\x89PNG fake")], 0.1,
                               jobstore.MemoryReading(1, 1, 0, 1, "vmhwm"))
    assert client.get(f"/v1/jobs/{job['id']}/images/0.png", headers=auth(alice)).status_code == 200
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/images/0.png"):
        assert_error_shape(client.get(path, headers=auth(bob)), 404, "not_found")
    assert_error_shape(client.delete(f"/v1/jobs/{job['id']}", headers=auth(bob)), 404, "not_found")
    # an image path that is not an image of that job
    for path in (f"/v1/jobs/{job['id']}/images/1.png", f"/v1/jobs/{job['id']}/images/-1.png",
                 f"/v1/jobs/{job['id']}/images/../../etc/passwd", f"/v1/jobs/{job['id']}/images/0.jpg"):
        assert client.get(path, headers=auth(alice)).status_code == 404


def test_rate_limit_is_429_with_retry_after(secured):
    client, sessions, alice, bob = secured
    codes = [client.post("/v1/jobs", json=BODY, headers=auth(bob)).status_code for _ in range(4)]
    assert codes[:3] == [202, 202, 202]
    r = client.post("/v1/jobs", json=BODY, headers=auth(bob))
    error = assert_error_shape(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 60 and error["details"]["retry_after_s"] == int(r.headers["retry-after"])
    with sessions() as s:
        assert jobstore.count_jobs(s) == 3  # nothing stored for a refused submission
    assert client.post("/v1/jobs", json=BODY, headers=auth(alice)).status_code == 202  # alice has no limit


def _every_route(app) -> list[tuple[str, str]]:
    """(method, a path of it) for every route of the app: included routers' too; a file for the static mount."""
    samples = {"{job_id}": str(uuid.uuid4()), "{index}": "0", "{role}": "image"}
    out = []
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, Mount):
            out.append(("GET", route.path + "/app.js"))
            continue
        path = route.path
        for name, value in samples.items():
            path = path.replace(name, value)
        out += [(method, path) for method in sorted(route.methods)]
    return out


# What answers without a key under SDFLEET_AUTH=required, as README.md and docs/security.md say: the health
# check and the web page's own files. Everything else, the OpenAPI schema and its two pages too, is 401.
WITHOUT_A_KEY = {"/healthz", "/", "/static/app.js"}


def test_required_auth_walks_every_route_only_health_and_the_page_answer_without_a_key(sqlite_url, redis_url):
    with session_factory(sqlite_url).begin() as s:
        key = keys.create_key(s, "carol")
    with make_api(sqlite_url, redis_url, auth="required", api_host="127.0.0.1", images_wait_s=0.2) as client:
        routes = _every_route(client.app)
        assert {"/openapi.json", "/docs", "/redoc", "/v1/jobs", "/v1/images/generations", "/v1/images/edits"} <= {
            p for _, p in routes}
        answered = set()
        for method, path in routes:
            kwargs = {"json": BODY} if method == "POST" else {}
            r = client.request(method, path, **kwargs)
            if r.status_code == 401:
                if path.startswith("/v1/images/"):  # OpenAI's shape there
                    assert r.json()["error"]["code"] == "invalid_api_key", r.text
                else:
                    assert_error_shape(r, 401, "unauthorized")
                assert r.headers["www-authenticate"] == "Bearer"
            else:
                answered.add(path)
                assert r.status_code == 200, (method, path, r.status_code)
            # with the key, each route answers (whatever its answer to this request: never 401)
            r = client.request(method, path, headers=auth(key), **kwargs)
            assert r.status_code != 401, (method, path, r.text)
        assert answered == WITHOUT_A_KEY
        # the schema and its pages, with the key
        assert client.get("/openapi.json", headers=auth(key)).json()["paths"]["/v1/jobs"]
        for page in ("/docs", "/redoc"):
            r = client.get(page, headers=auth(key))
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert "/openapi.json" in r.text
