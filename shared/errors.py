"""The error codes every part speaks, and the one root exception the API maps to HTTP at its edge."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    invalid_request = "invalid_request"
    not_found = "not_found"
    unauthorized = "unauthorized"
    rate_limited = "rate_limited"
    conflict = "conflict"
    idempotency_conflict = "idempotency_conflict"
    insufficient_memory = "insufficient_memory"
    out_of_memory = "out_of_memory"
    generation_failed = "generation_failed"
    worker_lost = "worker_lost"
    worker_left = "worker_left"  # an attempt's end in a job's history: handed back, queued again
    model_unavailable = "model_unavailable"
    service_unavailable = "service_unavailable"
    timeout = "timeout"
    cancelled = "cancelled"
    gone = "gone"
    method_not_allowed = "method_not_allowed"
    payload_too_large = "payload_too_large"
    bad_request = "bad_request"  # malformed HTTP, answered by the server before there is a request to route
    request_timeout = "request_timeout"  # a request's headers did not arrive in time (SDFLEET_API_HEADER_TIMEOUT_S)
    headers_too_large = "headers_too_large"  # a request's line and headers past the server's cap
    internal = "internal"


class SdfleetError(Exception):
    """Root of sdfleet's own errors: a code, a message for people, details for programs."""

    code: ErrorCode = ErrorCode.internal
    http_status: int = 500

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(SdfleetError):
    code, http_status = ErrorCode.invalid_request, 422


class NotFound(SdfleetError):
    code, http_status = ErrorCode.not_found, 404


class Gone(SdfleetError):
    """The job existed and was deleted by retention."""

    code, http_status = ErrorCode.gone, 410


class PayloadTooLarge(SdfleetError):
    code, http_status = ErrorCode.payload_too_large, 413


class ServiceUnavailable(SdfleetError):
    code, http_status = ErrorCode.service_unavailable, 503


class InvalidTransition(SdfleetError):
    """A job state change that the state machine forbids (a bug or a race lost, never user input)."""

    code, http_status = ErrorCode.internal, 409


class InsufficientMemory(SdfleetError):
    """No live worker serving the model has the memory this job is predicted to need."""

    code, http_status = ErrorCode.insufficient_memory, 422


class ModelUnavailable(SdfleetError):
    code, http_status = ErrorCode.model_unavailable, 503


class Unauthorized(SdfleetError):
    code, http_status = ErrorCode.unauthorized, 401


class RateLimited(SdfleetError):
    code, http_status = ErrorCode.rate_limited, 429

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, {"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class Conflict(SdfleetError):
    code, http_status = ErrorCode.conflict, 409


class IdempotencyConflict(SdfleetError):
    code, http_status = ErrorCode.idempotency_conflict, 409
