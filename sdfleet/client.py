"""The one HTTP client of the sdfleet API, for the command line, the demo and the tests."""

from __future__ import annotations

import httpx

from shared.jobs import JobStatus
from shared.waiting import WaitTimeout, wait_until


class ApiError(Exception):
    """The API answered with an error (its one error shape: `{"error": {code, message, details}}`)."""

    def __init__(self, status: int, body: dict | str):
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.code = error.get("code")
        self.message = error.get("message", body if isinstance(body, str) else str(body))
        self.details = error.get("details") or {}
        super().__init__(f"HTTP {status}: {self.message}")


class ApiUnreachable(httpx.TransportError):
    """No answer from the API at all: nothing listens there, the connection timed out, or it broke off. An
    httpx.TransportError (what callers catching httpx's errors expect), with the API's URL in its message."""

    def __init__(self, base_url: str, cause: httpx.TransportError):
        self.base_url = base_url
        self.cause = cause
        if isinstance(cause, httpx.TimeoutException):
            kind = "timed out"
        elif "refused" in str(cause).lower():
            kind = "connection refused"
        else:
            kind = str(cause) or type(cause).__name__
        request = getattr(cause, "_request", None)
        super().__init__(f"no answer from the API at {base_url} ({kind})", request=request)


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 30.0, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ApiUnreachable(self.base_url, exc) from exc

    def _json(self, response: httpx.Response):
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, body)
        return response.json()

    def submit(self, **params) -> dict:
        """POST /v1/jobs; parameters that are None are left to the API's defaults."""
        return self._json(self._send("POST", "/v1/jobs", json={k: v for k, v in params.items() if v is not None}))

    def job(self, job_id: str) -> dict:
        return self._json(self._send("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, status: list[str] | None = None, limit: int | None = None, cursor: str | None = None) -> dict:
        """GET /v1/jobs: the caller's jobs, newest first, one page: {"jobs": [...], "next_cursor": str | None}."""
        params: list[tuple[str, str | int]] = [("status", s) for s in status or ()]
        if limit is not None:
            params.append(("limit", limit))
        if cursor is not None:
            params.append(("cursor", cursor))
        return self._json(self._send("GET", "/v1/jobs", params=params))

    def cancel(self, job_id: str) -> dict:
        """DELETE /v1/jobs/{id}: the record, `cancelled` (it was queued) or `cancel_requested` (it is running
        and stops at its next step). A finished job raises ApiError 409."""
        return self._json(self._send("DELETE", f"/v1/jobs/{job_id}"))

    def plan(self, **shape) -> dict:
        """POST /v1/plan with {model?, width?, height?, guidance_scale?, num_images?}: what admission would
        decide for a job of this shape, worker by worker."""
        return self._json(self._send("POST", "/v1/plan", json={k: v for k, v in shape.items() if v is not None}))

    def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.2, on_update=None) -> dict:
        """Poll until the job is finished; `on_update(record)` sees every record read on the way."""
        record: dict = {}

        def finished() -> dict | None:
            nonlocal record
            record = self.job(job_id)
            if on_update is not None:
                on_update(record)
            return record if JobStatus(record["status"]).is_terminal else None

        try:
            return wait_until(finished, timeout, poll_s, f"job {job_id} to finish")
        except WaitTimeout:  # a plain TimeoutError as before, naming the status the job is still in
            raise TimeoutError(f"job {job_id} still {record['status']} after {timeout:.0f} s") from None

    def image(self, url_or_job: str, index: int | None = None) -> bytes:
        url = url_or_job if index is None else f"/v1/jobs/{url_or_job}/images/{index}.png"
        response = self._send("GET", url)
        if response.status_code >= 400:
            self._json(response)
        return response.content

    def preview(self, job_id: str) -> bytes | None:
        """GET /v1/jobs/{id}/preview: the running job's latest preview (a small JPEG), or None when it has none
        (before its first, with previews off on its worker, or once it has ended)."""
        response = self._send("GET", f"/v1/jobs/{job_id}/preview")
        if response.status_code == 404:
            self.job(job_id)  # no such job (or another key's) raises ApiError, as reading its record does
            return None
        if response.status_code >= 400:
            self._json(response)
        return response.content

    def workers(self) -> list[dict]:
        return self._json(self._send("GET", "/v1/workers"))

    def models(self) -> list[dict]:
        return self._json(self._send("GET", "/v1/models"))

    def memory(self, job_id: str) -> dict:
        return self._json(self._send("GET", f"/v1/jobs/{job_id}/memory"))

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
