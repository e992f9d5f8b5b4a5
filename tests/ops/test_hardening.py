"""The ops worker's hardening, on each database: a webhook's host checked again at send time, the delivery
sent to the checked address within one deadline and its hand-out sent once; retention; one reconciler pass per
interval in the whole fleet."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
from datetime import timedelta

import pytest

from ops.retention import enforce_retention
from shared import deliveries, jobstore, webhooks
from shared.db import session_factory
from shared.errors import ErrorCode
from shared.jobs import WebhookStatus
from shared.models import Job, utcnow
from shared.settings import Settings
from tests.helpers import PARAMS, assert_error_shape, make_api
from tests.helpers import database_url, db, fresh_url  # noqa: F401 (fixtures)


def test_a_name_that_resolves_inside_is_refused_at_send_time_too():
    """DNS can change between submit and send: the ops worker resolves again, and any inside address refuses."""
    def rebinding(answer):
        family = socket.AF_INET6 if ":" in answer else socket.AF_INET
        return lambda host, port, **kw: [(family, socket.SOCK_STREAM, 6, "", (answer, port))]

    for public in ("93.184.215.14", "2002:5db8:d70e::1", "64:ff9b::5db8:d70e", "::ffff:93.184.215.14"):
        assert webhooks.resolve("https://hooks.example/x", (), rebinding(public)).address == ipaddress.ip_address(public)
    # the same rule as at submit (tests/api/test_hardening.py), IPv6 answers carrying an inside IPv4 address too
    for inside, why in [("127.0.0.1", "loopback"), ("10.9.8.7", "private"), ("169.254.169.254", "link-local"),
                        ("2002:7f00:1::", "loopback address (6to4 for 127.0.0.1)"),
                        ("2002:a00:1::", "private address (6to4 for 10.0.0.1)"),
                        ("64:ff9b::a9fe:a9fe", "link-local address (NAT64 for 169.254.169.254)"),
                        ("64:ff9b:1::a00:1", "NAT64 local-use"),
                        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback address (Teredo client for 127.0.0.1)"),
                        ("::ffff:127.0.0.1", "loopback address (IPv4-mapped for 127.0.0.1)"),
                        ("::127.0.0.1", "loopback address (IPv4-compatible for 127.0.0.1)")]:
        with pytest.raises(webhooks.WebhookRefused, match="resolves to") as refused:
            webhooks.resolve("https://hooks.example/x", (), rebinding(inside))
        assert why in str(refused.value)


class _Receiver(http.server.BaseHTTPRequestHandler):
    seen: list = []
    trickle = False

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(self.headers["Host"])
        if type(self).trickle:  # one byte at a time, never done within the deadline
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(40):
                try:
                    self.wfile.write(b"X")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)
            return
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_delivery_goes_to_the_checked_address_and_has_one_deadline():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        # the name is never looked up again: the connection goes to the address that was checked
        allowed = Settings(webhook_allow_networks="127.0.0.0/8").webhook_allowed
        dest = webhooks.resolve(f"http://hooks.example:{port}/done", allowed,
                                lambda host, p, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))])
        assert webhooks.post(dest, b"{}", {"Content-Type": "application/json"}, 5.0) == 204
        assert _Receiver.seen[-1] == f"hooks.example:{port}"
        _Receiver.trickle = True
        with pytest.raises(TimeoutError):
            webhooks.post(dest, b"{}", {}, 1.0)
    finally:
        _Receiver.trickle = False
        server.shutdown()


def test_the_lookup_of_a_webhook_host_is_inside_the_deadline():
    """A DNS server that answers slowly holds a delivery no longer than its deadline (the lookup goes on alone,
    its answer unused); what it answers in time is checked as ever."""
    def slow(host, port, **kw):
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not resolve within"):
        webhooks.deliver("http://hooks.example/x", (), b"{}", {}, 0.5, slow)
    assert time.monotonic() - started < 1.5
    inside = lambda host, port, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]  # noqa: E731
    with pytest.raises(webhooks.WebhookRefused, match="private"):
        webhooks.deliver("http://hooks.example/x", (), b"{}", {}, 0.5, inside)


def test_a_webhook_hand_out_is_sent_once(db):
    with db.begin() as s:
        job = jobstore.create_job(s, jobstore.NewJob(PARAMS, webhook_url="http://203.0.113.5/hook"))
        attempt = jobstore.start_attempt(s, job.id, job.delivery_id, "h", "h:1", 2)
        jobstore.finish_failed(s, attempt, ErrorCode.generation_failed, "boom", None)
    with db.begin() as s:
        first = deliveries.webhook_handout(s, job.id)
    assert first.attempts_done == 0
    with db.begin() as s:  # the message, and a duplicate of it (Redis redelivered it)
        assert deliveries.claim_webhook(s, job.id, first.delivery_id, 0) is not None
    with db.begin() as s:
        assert deliveries.claim_webhook(s, job.id, first.delivery_id, 0) is None
    # two reconcilers find the hand-out stale at once: one re-sends
    later = utcnow() + timedelta(hours=1)
    with db.begin() as s:
        resent = deliveries.resend_webhook(s, job.id, later)
    with db.begin() as s:
        assert deliveries.resend_webhook(s, job.id, utcnow() - timedelta(hours=1)) is None  # not stale any more
    assert resent and resent.delivery_id != first.delivery_id and resent.attempts_done == 1
    with db.begin() as s:  # the old hand-out's retry is now stale
        assert deliveries.claim_webhook(s, job.id, first.delivery_id, 1) is None
        assert deliveries.claim_webhook(s, job.id, resent.delivery_id, 1) is not None
        assert deliveries.end_webhook(s, job.id, resent.delivery_id, WebhookStatus.delivered)
    with db() as s:
        assert s.get(Job, job.id).webhook_status == "delivered"


def test_retention_deletes_old_jobs_leaves_a_tombstone_and_keeps_the_rest(fresh_url, redis_url):
    db, database_url = session_factory(fresh_url), fresh_url
    def finished_job(days_ago: float, png_bytes: int) -> str:
        with db.begin() as s:
            job = jobstore.create_job(s, jobstore.NewJob(PARAMS))
            attempt = jobstore.start_attempt(s, job.id, job.delivery_id, "h", "h:1", 2)
            jobstore.finish_succeeded(s, attempt, [jobstore.GeneratedImage(0, 1, 64, 64, b"\x89PNG" + b"x" * png_bytes)],
                                   0.1, jobstore.MemoryReading(1, 1, 0, 1, "vmhwm"))
        with db.begin() as s:
            s.get(Job, job.id).finished_at = utcnow() - timedelta(days=days_ago)
        return job.id

    old, young = finished_job(40, 1000), finished_job(1, 1000)
    with db.begin() as s:
        queued = jobstore.create_job(s, jobstore.NewJob(PARAMS)).id
    settings = Settings(database_url=database_url, redis_url=redis_url, retention_days=30)
    deleted = enforce_retention(db, settings)
    assert old in deleted and young not in deleted and queued not in deleted
    with make_api(database_url, redis_url) as client:
        error = assert_error_shape(client.get(f"/v1/jobs/{old}"), 410, "gone")
        assert "retention" in error["message"] and error["details"]["status"] == "succeeded"
        assert_error_shape(client.get(f"/v1/jobs/{old}/images/0.png"), 410, "gone")
        assert client.get(f"/v1/jobs/{young}").status_code == 200
        assert client.get(f"/v1/jobs/{queued}").status_code == 200
    # a byte cap: the oldest finished go first until the stored PNGs fit
    settings = Settings(database_url=database_url, redis_url=redis_url, retention_max_image_bytes=1)
    assert young in enforce_retention(db, settings)
    with db() as s:
        assert s.get(Job, queued) is not None


def test_one_reconciler_pass_per_interval_in_the_whole_fleet(db, database_url, redis_url):
    """Every ops worker runs the reconciler thread; a Redis key that expires after the interval lets one of
    them pass per interval (it replaces one Celery beat per ops worker, which sent duplicates)."""
    import redis as redis_lib

    from ops.app import periodic_pass
    from shared.queue import RECONCILE_LOCK_KEY, make_celery

    settings = Settings(database_url=database_url, redis_url=redis_url, reconcile_interval_s=1.5)
    broker = redis_lib.Redis.from_url(redis_url)
    broker.delete(RECONCILE_LOCK_KEY)
    celery = make_celery(settings)
    assert periodic_pass(broker, "ops-a", db, celery, settings)
    assert not periodic_pass(broker, "ops-b", db, celery, settings)  # the same interval: the other one waits
    time.sleep(1.6)
    assert periodic_pass(broker, "ops-b", db, celery, settings)
