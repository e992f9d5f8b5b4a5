"""What routes depend on: the process's context (settings, sessions, Celery, Redis), the caller (bearer key
authentication that cannot fall open), the submission rate limit, and path and header checks that answer
before the database is asked anything."""

from __future__ import annotations

import math
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Callable

import redis
from celery import Celery
from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.orm import Session, sessionmaker

from api.admission import FleetView
from api.submit import FleetCache, Submitter
from shared import keys
from shared.errors import InvalidRequest, NotFound, RateLimited, Unauthorized
from shared.jobs import is_job_id
from shared.models import ApiKey
from shared.queue import RATE_LIMIT_PREFIX
from shared.settings import Settings

KEYS_RECHECK_S = 5.0  # a key created on one host takes effect on every API host within this
KEY_CACHE_ENTRIES = 10_000  # keys remembered per process (cleared whole when full)


@dataclass
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    celery: Celery
    broker: redis.Redis
    limiter: MovingWindowRateLimiter
    resolver: Callable = socket.getaddrinfo  # webhook hosts (tests pass one that never leaves the machine)
    _auth: dict = field(default_factory=lambda: {"required": False, "checked": -math.inf})
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _keys: dict = field(default_factory=dict)  # SHA-256 of a token -> (its key, monotonic expiry)
    fleet: FleetCache = field(init=False)
    submitter: Submitter = field(init=False)

    def __post_init__(self) -> None:
        self.fleet = FleetCache(self.read_fleet, self.settings.api_cache_s)
        self.submitter = Submitter(self.sessions, self.celery)

    @classmethod
    def build(cls, settings: Settings, sessions, celery: Celery, resolver=None) -> "Context":
        broker = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        storage = RedisStorage(settings.redis_url, key_prefix=RATE_LIMIT_PREFIX, socket_timeout=2,
                               socket_connect_timeout=2)
        return cls(settings, sessions, celery, broker, MovingWindowRateLimiter(storage),
                   resolver or socket.getaddrinfo)

    def read_fleet(self) -> FleetView:
        with self.sessions() as session:
            return FleetView.read(session, self.settings.worker_stale_s)

    async def key_for(self, token: str) -> ApiKey | None:
        """The live key with this token. A key found is trusted for SDFLEET_API_CACHE_S (a revocation takes
        effect on every API host within that); a token not found is asked of the database every time."""
        digest = keys.hash_token(token)
        hit = self._keys.get(digest)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]

        def lookup() -> ApiKey | None:
            with self.sessions() as session:
                return keys.lookup_hash(session, digest)

        key = await run_in_threadpool(lookup)
        if key is None:
            self._keys.pop(digest, None)
        elif self.settings.api_cache_s > 0:
            if len(self._keys) >= KEY_CACHE_ENTRIES:
                self._keys.clear()
            self._keys[digest] = (key, now + self.settings.api_cache_s)
        return key

    def known_auth_required(self) -> bool | None:
        """Whether keys are required as last decided, without asking the database; None once that decision is
        older than KEYS_RECHECK_S (and keys are not yet required for good): then ask `auth_required`."""
        state = self._auth
        if state["required"] or time.monotonic() - state["checked"] <= KEYS_RECHECK_S:
            return state["required"]
        return None

    def auth_required(self) -> bool:
        """Fixed by SDFLEET_AUTH=required|off; with auto, required beyond loopback or once any key was ever
        created. Once required it stays required for the life of the process: nothing turns it off."""
        state = self._auth
        if state["required"]:
            return True
        now = time.monotonic()
        if now - state["checked"] > KEYS_RECHECK_S:
            with self._lock:
                ever = False
                if self.settings.auth == "auto" and self.settings.api_on_loopback:
                    with self.sessions() as session:
                        ever = keys.any_key_ever(session)
                state.update(required=self.settings.auth_required(ever), checked=now)
        return state["required"]


async def context(request: Request) -> Context:
    return request.app.state.ctx


Ctx = Annotated[Context, Depends(context)]


async def principal(ctx: Ctx, authorization: Annotated[str | None, Header()] = None) -> ApiKey | None:
    """The caller's key; None when the API is open (SDFLEET_AUTH off, or auto on loopback with no key ever).
    Runs on the event loop: the database is asked (in the thread pool) only when a cache is out of date."""
    required = ctx.known_auth_required()
    if required is None:
        required = await run_in_threadpool(ctx.auth_required)
    if not required:
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("an API key is required: Authorization: Bearer <key>")
    key = await ctx.key_for(token.strip())
    if key is None:
        raise Unauthorized("unknown or revoked API key")
    return key


Caller = Annotated[ApiKey | None, Depends(principal)]


def owner_id(caller: ApiKey | None) -> str | None:
    return caller.id if caller else None


def enforce_rate_limit(ctx: Context, caller: ApiKey | None) -> None:
    """A moving window over the last minute per key, shared by every API host through Redis (no burst of
    twice the limit across a fixed window's edge). Called once a submission is known not to be a replay."""
    if caller is None or not caller.rate_limit_per_min:
        return
    item = RateLimitItemPerMinute(caller.rate_limit_per_min)
    if not ctx.limiter.hit(item, caller.id):
        reset_at = ctx.limiter.get_window_stats(item, caller.id).reset_time
        retry = max(1, math.ceil(reset_at - time.time()))
        raise RateLimited(f"this key may submit {caller.rate_limit_per_min} jobs a minute; retry in {retry} s",
                          retry)


async def job_id_path(job_id: str, _caller: Caller) -> str:
    """A job ID that is not a UUID names no job: 404 without asking the database (after authentication, so
    an unauthenticated caller learns nothing from the difference)."""
    if not is_job_id(job_id):
        raise NotFound(f"no job {job_id[:64]!r}")
    return job_id


JobId = Annotated[str, Depends(job_id_path)]


async def idempotency_key(idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> str | None:
    if idempotency_key is None:
        return None
    if not idempotency_key.strip() or any(not 0x21 <= ord(c) <= 0x7E for c in idempotency_key):
        raise InvalidRequest(
            "Idempotency-Key: must be 1 to 255 visible ASCII characters (no spaces, not blank)",
            [{"field": "Idempotency-Key", "reason": "must be 1 to 255 visible ASCII characters, not blank"}])
    return idempotency_key
