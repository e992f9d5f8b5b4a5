"""The HTTP server itself (`sdfleet api`: uvicorn with api/server.py's protocol), over raw sockets to a real API
process on 127.0.0.1: a request whose headers trickle in is answered 408 in the error shape and closed after
SDFLEET_API_HEADER_TIMEOUT_S, a connection that sends nothing is closed, a head past the server's cap is 431,
and malformed HTTP is a 400 in the error shape, not uvicorn's plain text."""

from __future__ import annotations

import json
import socket
import time

import pytest

from api.server import MAX_HEAD_BYTES
from sdfleet.stack import stop
from shared.db import engine_for, migrate
from tests.conftest import start_api, stack_env

HEADER_TIMEOUT_S = 1.0
SLACK_S = 3.0  # a loaded machine's scheduling, on top of the timeout


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url):
    """(host, port) of an API process with a 1 s header timeout, on a SQLite database of its own."""
    tmp = tmp_path_factory.mktemp("server")
    url = f"sqlite:///{tmp / 'server.db'}"
    migrate(engine_for(url))
    env = stack_env(url, redis_url, SDFLEET_AUTH="off", SDFLEET_API_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S))
    api, base = start_api(env, tmp / "api.log")
    try:
        yield "127.0.0.1", int(base.rsplit(":", 1)[1])
    finally:
        stop([api])


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open at `deadline`."""
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            pytest.fail(f"the connection was still open at the deadline; read so far: {data!r}")
        except ConnectionResetError:  # closed with our unread bytes in its buffer: what came before is here
            return data
        if not chunk:
            return data
        data += chunk


def parse(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_error(raw: bytes, status: int, code: str) -> dict:
    got, headers, body = parse(raw)
    assert got == status, raw
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)
    assert set(error) == {"error"} and set(error["error"]) == {"code", "message", "details"}
    assert error["error"]["code"] == code and error["error"]["message"]
    return error["error"]


def healthy(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return parse(read_until_closed(s, time.monotonic() + 5))[0] == 200


def test_headers_that_trickle_in_are_408_in_the_error_shape_and_the_connection_closed(server):
    """100 connections each sending a header line every 0.2 s, never the blank line that ends the head: every
    one is answered 408 and closed within the timeout (plus slack), and the API answers others meanwhile."""
    socks = []
    try:
        for i in range(100):
            s = socket.create_connection(server, timeout=5)
            s.sendall(f"GET /v1/jobs HTTP/1.1\r\nHost: t\r\nX-Slow-{i}: 1\r\n".encode())
            socks.append(s)
        started = time.monotonic()
        assert healthy(*server)  # the held connections do not stop others
        answers, open_ = {}, list(socks)
        while open_ and time.monotonic() < started + HEADER_TIMEOUT_S + SLACK_S:
            for s in list(open_):
                try:
                    s.sendall(b"X-More: 1\r\n")
                except OSError:  # closed by the server: what it sent is still readable
                    pass
                s.settimeout(0.01)
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    chunk = b""
                answers[s] = answers.get(s, b"") + chunk
                if not chunk:
                    open_.remove(s)
            time.sleep(0.2)
        assert not open_, f"{len(open_)} of 100 slow connections still open after {HEADER_TIMEOUT_S + SLACK_S} s"
        for s in socks:
            error = assert_error(answers[s], 408, "request_timeout")
            assert "SDFLEET_API_HEADER_TIMEOUT_S" in error["message"]
    finally:
        for s in socks:
            s.close()
    assert healthy(*server)


def test_a_connection_that_sends_nothing_is_closed(server):
    with socket.create_connection(server, timeout=5) as s:
        started = time.monotonic()
        assert read_until_closed(s, started + HEADER_TIMEOUT_S + SLACK_S) == b""  # nothing to answer: closed
        assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.9


def test_a_kept_alive_connection_gets_the_same_deadline_for_each_request(server):
    """Requests on one connection work as before; a later request whose head stalls is 408 and closed."""
    with socket.create_connection(server, timeout=5) as s:
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            raw = b""
            while b"\r\n\r\n" not in raw or len(parse(raw)[2]) < int(parse(raw)[1]["content-length"]):
                raw += s.recv(65536)
            assert parse(raw)[0] == 200 and json.loads(parse(raw)[2]) == {"status": "ok"}
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # the head never ends
        assert_error(read_until_closed(s, time.monotonic() + HEADER_TIMEOUT_S + SLACK_S), 408, "request_timeout")


@pytest.mark.parametrize("raw", [
    b"GARBAGE\x01 / HTTP/1.1\r\n\r\n",  # no such method
    b"GET / HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nHo(st: t\r\n\r\n",  # not a token
    b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",  # NUL in a value
    b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
    b"GET / HTTP/1.1\nHost: t\n\n",  # bare LFs
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS to a plain-HTTP port
], ids=["method", "no-colon", "header-name", "nul", "content-length", "two-lengths", "chunk", "bare-lf", "tls"])
def test_malformed_http_is_a_400_in_the_error_shape(server, raw):
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(raw)
        error = assert_error(read_until_closed(s, time.monotonic() + 5), 400, "bad_request")
        assert "malformed HTTP request" in error["message"]


def test_a_head_past_the_cap_is_431_and_closed_one_within_it_is_answered(server):
    with socket.create_connection(server, timeout=5) as s:  # half the cap, in one header: fine
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Big: "
                  + b"a" * (MAX_HEAD_BYTES // 2) + b"\r\n\r\n")
        assert parse(read_until_closed(s, time.monotonic() + 5))[0] == 200
    with socket.create_connection(server, timeout=5) as s:  # header lines that never end: cut at the cap
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        sent = 0
        try:
            while sent < 64 * MAX_HEAD_BYTES:
                s.sendall(b"X-More: " + b"b" * 1000 + b"\r\n")
                sent += 1010
        except OSError:  # the server closed the connection
            pass
        assert sent < 64 * MAX_HEAD_BYTES, "the server read 4 MiB of headers"
        error = assert_error(read_until_closed(s, time.monotonic() + 5), 431, "headers_too_large")
        assert str(MAX_HEAD_BYTES) in error["message"]
