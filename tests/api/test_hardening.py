"""The API's hardening, in-process against real Redis and each database (SQLite and PostgreSQL): statuses
inside the documented contract, webhook URLs that would reach inside the fleet refused at submit, auth that
cannot fall open. Live-process cases are in tests/system/test_faults.py and tests/worker/test_failures.py."""

from __future__ import annotations

import uuid

import pytest

from shared import keys
from shared.db import session_factory
from tests.helpers import BODY, assert_error_shape, count, make_api
from tests.helpers import api, database_url, db, fresh_url  # noqa: F401 (fixtures)


@pytest.mark.parametrize("job_id", ["%00", "x", "1%27%20OR%201=1", "a" * 300, "72045503-5ffa-4421-902f-05d8c70b2a6"])
def test_a_malformed_job_id_is_404_on_every_route(api, job_id):
    for method, path in [("get", "/v1/jobs/{}"), ("delete", "/v1/jobs/{}"), ("get", "/v1/jobs/{}/images/0.png"),
                         ("get", "/v1/jobs/{}/memory")]:
        assert_error_shape(getattr(api, method)(path.format(job_id)), 404, "not_found")


def test_wrong_method_is_405_with_allow_and_a_trailing_slash_is_404_not_a_redirect(api):
    r = api.put("/v1/jobs", json=BODY)
    assert_error_shape(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    r = api.post("/v1/jobs/", json=BODY, follow_redirects=False)
    assert_error_shape(r, 404, "not_found")


def test_a_body_over_the_cap_is_413_whether_it_says_its_length_or_not(api, db):
    before = count(db)
    big = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    r = api.post("/v1/jobs", content=big, headers={"content-type": "application/json"})
    error = assert_error_shape(r, 413, "payload_too_large")
    assert error["details"]["max_body_bytes"] == 64 * 1024

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b" " * 4096
        yield b'{"prompt": "a cat"}'

    r = api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(r, 413, "payload_too_large")
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
