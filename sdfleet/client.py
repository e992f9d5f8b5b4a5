"""A small HTTP client of the sdfleet API, for the CLI, the demo and the tests."""

from __future__ import annotations

import time

import httpx

from shared.jobs import JobStatus


class ApiError(Exception):
    def __init__(self, status: int, body: dict | str):
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.code = error.get("code")
        super().__init__(f"HTTP {status}: {error.get('message', body)}")


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 30.0, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def _json(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, body)
        return response.json()

    def submit(self, **params) -> dict:
        return self._json(self.http.post("/v1/jobs", json={k: v for k, v in params.items() if v is not None}))

    def job(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if JobStatus(record["status"]).is_terminal:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record['status']} after {timeout:.0f} s")
            time.sleep(poll_s)

    def image(self, url_or_job: str, index: int | None = None) -> bytes:
        url = url_or_job if index is None else f"/v1/jobs/{url_or_job}/images/{index}.png"
        response = self.http.get(url)
        if response.status_code >= 400:
            raise ApiError(response.status_code, response.json())
        return response.content

    def workers(self) -> list[dict]:
        return self._json(self.http.get("/v1/workers"))

    def models(self) -> list[dict]:
        return self._json(self.http.get("/v1/models"))

    def memory(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}/memory"))

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
