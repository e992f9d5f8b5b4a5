"""The submission API: authenticates, validates a job, admits it against the fleet's memory, stores it,
enqueues its ID, and answers from the database by job ID. It imports no model stack (torch, diffusers,
OpenVINO): it stays small and starts in about a second. Routes live in api/routes/, what they depend on
(context, auth, rate limit) in api/deps.py, the one error shape in api/errors.py."""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from api import errors
from api.deps import Caller, Context
from api.routes import fleet as fleet_routes
from api.routes import images as image_routes
from api.routes import jobs as job_routes
from shared.db import Pool, engine_for, migrate, session_factory, wait_for_database
from api.bodies import components
from shared.errors import PayloadTooLarge
from shared.jobs import JobCreate
from shared.queue import make_celery
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"  # the web page: plain HTML, CSS and JS shipped in the package


# The routes whose bodies may carry images (in base64, or as multipart file parts): their limit is larger
UPLOAD_ROUTES = frozenset({("POST", "/v1/jobs"), ("POST", "/v1/images/edits")})


class BodyLimit:
    """Refuse a body over `limit` bytes (`upload_limit` on the routes that take images) with 413 in the error
    shape: by Content-Length before reading, and while reading for a chunked body (which has none)."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int | None = None):
        self.app, self.default, self.upload_limit = app, limit, upload_limit or limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if (scope.get("method"), scope.get("path", "").rstrip("/") or "/") \
            in UPLOAD_ROUTES else self.default
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._too_large(scope, receive, send, limit)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._error(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge:  # read outside FastAPI's body parser (which reports it as its cause)
            if not started:
                await self._too_large(scope, receive, send, limit)

    def _error(self, limit: int) -> PayloadTooLarge:
        setting = "SDFLEET_MAX_BODY_BYTES" + (" and SDFLEET_MAX_IMAGE_BYTES" if limit != self.default else "")
        return PayloadTooLarge(f"the body is larger than {limit} bytes ({setting})", {"max_body_bytes": limit})

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = self._error(limit)
        response = errors.render(Request(scope), 413, error.code, error.message, error.details)
        await response(scope, receive, send)


BODY_MODELS = [JobCreate, image_routes.ImageEditRequest]  # the bodies read by api/bodies.py

_frozen = False


def _freeze_startup_objects() -> None:
    """Move what start-up made (modules, routes, the ORM's and pydantic's machinery: objects that live as long
    as the process) out of the cyclic collector's sight, once per process. Every full collection under load
    walked all of them: ~95 ms each, with the event loop and every request in flight stopped (17 in a 15 s
    run at ~1,000 submissions/s), which was the submit path's p99; after this, ~4 ms (bench/README.md,
    "Submit path")."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def _add_docs(app: FastAPI) -> None:
    """/openapi.json, /docs (Swagger UI) and /redoc as FastAPI makes them, but behind the caller's key
    (FastAPI's own answer anyone who asks): with keys required they are 401 without one, like every route but
    /healthz and the web page's files (docs/security.md). The two pages fetch /openapi.json without a key:
    behind required keys a browser shows them only when something adds the key (a proxy); `curl` with the key
    reads the schema, and so does the web page, which sends its key."""

    def root_path(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request, _caller: Caller) -> JSONResponse:
        schema, root = app.openapi(), root_path(request)
        if root and app.root_path_in_servers and root not in {s.get("url") for s in schema.get("servers", [])}:
            schema = {**schema, "servers": [{"url": root}, *schema.get("servers", [])]}
        return JSONResponse(schema)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request, _caller: Caller) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=root_path(request) + "/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_ui_parameters=app.swagger_ui_parameters)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request, _caller: Caller) -> HTMLResponse:
        return get_redoc_html(openapi_url=root_path(request) + "/openapi.json", title=f"{app.title} - ReDoc")


def _add_components(app: FastAPI) -> None:
    """The schemas of the bodies that routes read themselves (JSON or multipart: api/bodies.py), which FastAPI
    cannot see to list among the schema's components."""
    make = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                {k: v for k, v in components(*BODY_MODELS).items() if k not in schema["components"]["schemas"]})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None, resolver=None) -> FastAPI:
    settings = settings or get_settings()
    if settings.auth == "off" and not settings.api_on_loopback:
        log.warning("SDFLEET_AUTH=off and the API is not on loopback (%s): anyone who reaches it reads every "
                    "job, prompt and image", settings.api_host or "address unknown")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine = engine_for(settings.database_url, Pool.of(settings))
        wait_for_database(engine)
        migrate(engine)
        _freeze_startup_objects()
        yield

    app = FastAPI(
        title="sdfleet",
        summary="Text-to-image jobs on a fleet of CPU workers that never run out of memory",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,  # /v1/jobs/ is no route (404), not a 307 to one
        # the schema and its two pages are added below, behind the same key as every other route
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    sessions = session_factory(settings.database_url, Pool.of(settings))
    app.state.ctx = Context.build(settings, sessions, make_celery(settings), resolver)
    errors.install(app)
    app.include_router(job_routes.router)
    app.include_router(fleet_routes.router)
    app.include_router(image_routes.router)
    _add_docs(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.upload_body_bytes)
    _add_components(app)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        """The web page (the same for everyone: it holds no data; it asks the API, with the caller's key)."""
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
