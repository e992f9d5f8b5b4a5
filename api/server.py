"""The HTTP server's protocol (`sdfleet api` runs uvicorn with it): uvicorn's httptools protocol, with a
deadline and a size for a request's head, and the API's error shape for what the server answers itself.

- **A head must arrive in time.** uvicorn times out nothing while a request's line and headers come in (its
  keep-alive timeout only starts after a response): a client that trickles a header a byte at a time, or
  connects and sends nothing, holds its connection and its memory for ever (300 such connections were held
  for 60 s). Here a connection's first request must have all its headers within SDFLEET_API_HEADER_TIMEOUT_S
  of the connection, and each later one within that time of its first byte. Past it: 408 `request_timeout`
  in the error shape and the connection closed; a connection that sent nothing is just closed.
- **A head has a size.** httptools sets none: a client could send hundreds of MiB of headers within the
  deadline, all held in the process's memory (190 MiB in one request, measured). A head past MAX_HEAD_BYTES
  is 431 `headers_too_large` in the error shape, and the connection is closed.
- **Malformed HTTP is a JSON 400.** uvicorn answered what httptools cannot parse with a plain-text 400
  ("Invalid HTTP request received."); here it is 400 `bad_request` in the one error shape.

These answers come before there is a request to route, so they are in sdfleet's shape on every path
(OpenAI's route included)."""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from api.errors import ErrorBody, ErrorDetail
from shared.errors import ErrorCode
from shared.settings import get_settings

log = logging.getLogger(__name__)

# The largest request line and headers taken (nginx takes 4 x 8 KiB by default, h11 16 KiB; the API's own
# requests need a few hundred bytes, a browser's with cookies a few KiB)
MAX_HEAD_BYTES = 64 * 1024


def error_bytes(status: int, code: ErrorCode, message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response with the error shape as its body, closing the connection."""
    body = ErrorBody(error=ErrorDetail(code=code, message=message)).model_dump_json().encode()
    head = [STATUS_LINE[status]]
    for name, value in default_headers:  # uvicorn's own (server, date)
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\n", b"content-length: ", str(len(body)).encode(), b"\r\n",
             b"connection: close\r\n", b"\r\n"]
    return b"".join(head) + body


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size for each request's head, and its own answers in
    the error shape (module doc)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = get_settings().api_header_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None
        self._reading_head = False  # some of a request has arrived, not yet all its headers
        self._head_bytes = 0  # bytes received while that was so

    # the deadline: armed when the connection opens and when a request's first byte arrives (if not armed
    # already), disarmed when its headers are complete or the connection closes
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_head and not self.transport.is_closing():  # the head goes on past this chunk
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, ErrorCode.headers_too_large,
                             f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes; the "
                             "connection is closed")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head, self._head_bytes = True, 0
        if self._head_deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if not self._reading_head:  # connected and sent nothing
            self.transport.close()
            return
        self._refuse(408, ErrorCode.request_timeout, f"the request's headers did not arrive within "
                     f"{self.header_timeout_s:g} s (SDFLEET_API_HEADER_TIMEOUT_S); the connection is closed")

    def _refuse(self, status: int, code: ErrorCode, message: str) -> None:
        """Answer the request whose head is being read with this error, and close the connection."""
        self._disarm()
        log.info("%s: %d %s", "%s:%d" % self.client if self.client else "a client", status, message)
        if self.cycle is not None and not self.cycle.response_complete:
            # a response is still being sent (the head is a pipelined request behind it): read no more, and
            # close once that response is complete rather than write into the middle of it
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.transport.write(error_bytes(status, code, message, self.server_state.default_headers))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """What httptools could not parse (uvicorn's own answer was plain text), in the error shape; only
        closed when a response to the request has begun (a broken chunked body while the app answers)."""
        self._disarm()
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()
            return
        self.transport.write(error_bytes(
            400, ErrorCode.bad_request, "malformed HTTP request: the request line or a header could not be "
            "parsed; the connection is closed", self.server_state.default_headers))
        self.transport.close()
