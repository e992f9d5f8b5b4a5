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
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.errors import InvalidRequest, NotFound, RateLimited, Unauthorized
from shared.jobs import is_job_id
from shared.models import ApiKey
from shared.queue import RATE_LIMIT_PREFIX
from shared.settings import Settings

KEYS_RECHECK_S = 5.0  # a key created on one host takes effect on every API host within this


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

    @classmethod
    def build(cls, settings: Settings, sessions, celery: Celery, resolver=None) -> "Context":
        broker = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
        storage = RedisStorage(settings.redis_url, key_prefix=RATE_LIMIT_PREFIX, socket_timeout=2,
                               socket_connect_timeout=2)
        return cls(settings, sessions, celery, broker, MovingWindowRateLimiter(storage),
                   resolver or socket.getaddrinfo)

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


def context(request: Request) -> Context:
    return request.app.state.ctx


Ctx = Annotated[Context, Depends(context)]


def principal(ctx: Ctx, authorization: Annotated[str | None, Header()] = None) -> ApiKey | None:
    """The caller's key; None when the API is open (SDFLEET_AUTH off, or auto on loopback with no key ever)."""
    if not ctx.auth_required():
        return None
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("an API key is required: Authorization: Bearer <key>")
    with ctx.sessions() as session:
        key = keys.lookup(session, token.strip())
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


def job_id_path(job_id: str, _caller: Caller) -> str:
    """A job ID that is not a UUID names no job: 404 without asking the database (after authentication, so
    an unauthenticated caller learns nothing from the difference)."""
    if not is_job_id(job_id):
        raise NotFound(f"no job {job_id[:64]!r}")
    return job_id


JobId = Annotated[str, Depends(job_id_path)]


def idempotency_key(idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> str | None:
    if idempotency_key is None:
        return None
    if not idempotency_key.strip() or any(not 0x21 <= ord(c) <= 0x7E for c in idempotency_key):
        raise InvalidRequest(
            "Idempotency-Key: must be 1 to 255 visible ASCII characters (no spaces, not blank)",
            [{"field": "Idempotency-Key", "reason": "must be 1 to 255 visible ASCII characters, not blank"}])
    return idempotency_key
