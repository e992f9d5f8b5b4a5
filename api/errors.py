"""The one error shape, the handlers that map every failure to it at the API's edge, and the OpenAPI
description of each status a route can answer."""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ErrorCode, RateLimited, SdfleetError, Unauthorized

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # FastAPI before 0.137.2: app.routes is flat
    iter_route_contexts = None

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    code: ErrorCode
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


_DESCRIBED = {
    401: "unauthorized: authentication is required (SDFLEET_AUTH) and the bearer key is missing, unknown or "
         "revoked",
    404: "not_found: no such job or image (or it belongs to another key); a job ID that is not a UUID is "
         "no job",
    405: "method_not_allowed: the path exists, the method does not; `Allow` lists the methods",
    409: "conflict (the job has finished) or idempotency_conflict (the key was used with another body)",
    410: "gone: the job was deleted by retention (when and why are in details)",
    413: "payload_too_large: the body is larger than SDFLEET_MAX_BODY_BYTES",
    422: "invalid_request (the field and the reason are in details: a value out of range or of the wrong "
         "type, an unknown field, control characters in text, a body that is not a JSON object or not "
         "valid JSON / UTF-8, a webhook_url that is not allowed) or insufficient_memory (the predicted "
         "peak, the largest budget, and hints that would fit)",
    429: "rate_limited: this key's submissions in the last minute are used up; see Retry-After",
    503: "model_unavailable (no live worker serves the model) or service_unavailable (the database "
         "or the broker is unreachable, or every connection of the API's database pool is busy: see "
         "Retry-After; nothing was stored)",
}


def responses(*statuses: int) -> dict:
    """OpenAPI `responses` for these error statuses (every route also answers 401 when auth is on)."""
    return {s: {"model": ErrorBody, "description": _DESCRIBED[s]} for s in sorted({401, *statuses})}


def error_response(status: int, code: ErrorCode, message: str, details: Any = None,
                   headers: dict | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, details=details))
    return JSONResponse(status_code=status, content=body.model_dump(mode="json"), headers=headers)


# The OpenAI-compatible routes answer errors in OpenAI's shape, which its clients parse into their own error
# classes: {"error": {"message", "type", "param", "code"}}. Invalid input is 400 there (not 422).
OPENAI_PREFIX = "/v1/images/"
_OPENAI_STATUS = {422: 400}
_OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}
_OPENAI_CODE = {ErrorCode.unauthorized: "invalid_api_key", ErrorCode.rate_limited: "rate_limit_exceeded",
                ErrorCode.model_unavailable: "model_not_found", ErrorCode.invalid_request: "invalid_value"}
_OPENAI_PARAM = {"width": "size", "height": "size", "num_images": "n"}


def openai_error(status: int, code: str, message: str, param: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape. Where a retry would submit the job again (the job exists, or the request
    is wrong), `x-should-retry: false` tells OpenAI's clients (which retry 408, 409, 429 and 5xx) not to."""
    body = {"error": {"message": message, "type": _OPENAI_TYPE.get(status, "server_error"), "param": param,
                      "code": code}}
    retry = status in (408, 429) or (status >= 500 and code in ("service_unavailable",))
    return JSONResponse(status_code=status, content=body,
                        headers={**(headers or {}), "x-should-retry": "true" if retry else "false"})


def render(request: Request, status: int, code: ErrorCode, message: str, details: Any = None,
           headers: dict | None = None) -> JSONResponse:
    """The error in the shape of the route that failed: sdfleet's, or OpenAI's on the OpenAI routes."""
    if not request.url.path.startswith(OPENAI_PREFIX):
        return error_response(status, code, message, details, headers)
    param = None
    if code is ErrorCode.invalid_request and isinstance(details, list) and details:
        field = str(details[0].get("field", ""))
        param = _OPENAI_PARAM.get(field, field) or None
    elif isinstance(details, dict) and details.get("field"):  # (413: an image past SDFLEET_MAX_IMAGE_BYTES)
        param = str(details["field"])
    if code is ErrorCode.model_unavailable:
        status = 404  # OpenAI's answer to a model it does not serve
    return openai_error(_OPENAI_STATUS.get(status, status), _OPENAI_CODE.get(code, code.value), message, param,
                        headers)


def _field_errors(exc: RequestValidationError) -> list[dict]:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc[:1] in (["body"], ["header"], ["path"], ["query"]):
            loc = loc[1:]
        if err.get("type") == "json_invalid":
            out.append({"field": "body", "reason": f"not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})"})
            continue
        if loc == [] and err.get("type") in ("model_attributes_type", "dict_type"):
            out.append({"field": "body", "reason": "must be a JSON object"})
            continue
        reason = err.get("msg", "invalid").removeprefix("Value error, ")
        out.append({"field": ".".join(loc) or "body", "reason": reason})
    return out


def route_table(routes) -> list:
    """Every route of the app, those of included routers too (FastAPI 0.137.2 on keeps an included router as
    one entry of app.routes and flattens it with iter_route_contexts; before, app.routes was flat)."""
    return list(iter_route_contexts(routes)) if iter_route_contexts else list(routes)


def allowed_methods(request: Request, headers: dict | None) -> list[str]:
    """Every method the request's path answers, for a 405's Allow. The router hands a 405 to the first route
    whose path matched, which names its own methods only (`PUT /v1/jobs/{id}` said `Allow: GET`, though DELETE
    is there too): here the methods of every route whose path matches, with those the exception named (a
    mounted app's own, such as the static files' GET and HEAD)."""
    named = (headers or {}).get("Allow") or (headers or {}).get("allow") or ""
    methods = {m.strip().upper() for m in named.split(",") if m.strip()}
    root = request.scope.get("app_root_path", request.scope.get("root_path", ""))  # a mount moves root_path
    path = request.scope["path"]
    if root and path.startswith(root):
        path = path[len(root):]
    for route in route_table(request.app.routes):
        regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if route_methods and regex is not None and regex.match(path):
            methods |= set(route_methods)
    return sorted(methods)


def install(app: FastAPI) -> None:
    def sdfleet_error(req: Request, exc: SdfleetError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimited) else None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return render(req, exc.http_status, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(SdfleetError)
    async def _sdfleet_error(req: Request, exc: SdfleetError):
        return sdfleet_error(req, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(req: Request, exc: RequestValidationError):
        details = _field_errors(exc)
        first = details[0] if details else {"field": "body", "reason": "invalid"}
        return render(req, 422, ErrorCode.invalid_request, f"{first['field']}: {first['reason']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(req: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:
            # FastAPI's body parser gave up: invalid UTF-8, nesting deeper than the parser's recursion
            # limit, an integer of more digits than Python converts. All are a body that is not valid JSON.
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, SdfleetError):  # the body limit, hit while FastAPI read the body
                return sdfleet_error(req, cause)
            reason = f"not valid JSON ({type(cause).__name__})" if cause else "not valid JSON"
            return render(req, 422, ErrorCode.invalid_request, f"body: {reason}", [{"field": "body", "reason": reason}])
        code = {404: ErrorCode.not_found, 405: ErrorCode.method_not_allowed}.get(exc.status_code,
                                                                                 ErrorCode.invalid_request)
        message = {404: "no such route", 405: "method not allowed on this path"}.get(exc.status_code, str(exc.detail))
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(req, headers))}
        return render(req, exc.status_code, code, message, headers=headers)

    @app.exception_handler(OperationalError)
    async def _database_down(req: Request, exc: OperationalError):
        log.warning("database error: %s", exc)
        return render(req, 503, ErrorCode.service_unavailable, "the database is unreachable; retry shortly")

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(req: Request, exc: PoolTimeout):
        # Every connection of the process's pool was busy for SDFLEET_DB_POOL_TIMEOUT_S: overload, not an
        # outage. Retry-After: as long as this request waited; the load that used the pool up is not gone sooner.
        wait_s = req.app.state.ctx.settings.db_pool_timeout_s
        log.warning("database pool exhausted (waited %.1f s): %s", wait_s, exc)
        return render(req, 503, ErrorCode.service_unavailable,
                      f"the API has no free database connection (waited {wait_s:g} s); retry shortly",
                      headers={"Retry-After": str(max(1, math.ceil(wait_s)))})

    @app.exception_handler(redis.RedisError)
    async def _broker_down(req: Request, exc: redis.RedisError):
        log.warning("redis error: %s", exc)
        return render(req, 503, ErrorCode.service_unavailable, "the job queue is unreachable; retry shortly")

    @app.exception_handler(Exception)
    async def _internal(req: Request, exc: Exception):
        log.exception("unhandled error")
        return render(req, 500, ErrorCode.internal, f"internal error ({type(exc).__name__})")
