"""API keys: required everywhere but health once configured, stored hashed, scoped (another key's job is
404, not 403), rate-limited (429 + Retry-After). The API in-process on its own database and real Redis."""

from __future__ import annotations


from sqlalchemy import select

from shared import jobstore, keys
from shared.models import ApiKey
from tests.helpers import BODY, assert_error_shape, auth, secured  # noqa: F401 (a fixture)


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
