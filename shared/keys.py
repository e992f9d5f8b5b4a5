"""API keys: random bearer tokens of which only the SHA-256 is stored (a token has 256 bits of entropy, so
a fast hash is enough), each with its webhook signing secret and an optional submission rate limit."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ApiKey, utcnow

TOKEN_PREFIX = "sdf_"
SIGNATURE_HEADER = "X-Sdfleet-Signature"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class NewKey:
    id: str
    name: str
    token: str  # shown once; only its hash is kept
    webhook_secret: str


def create_key(session: Session, name: str, rate_limit_per_min: int | None = None) -> NewKey:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=str(uuid.uuid4()), name=name, key_hash=hash_token(token),
                 webhook_secret=secrets.token_urlsafe(32), rate_limit_per_min=rate_limit_per_min)
    session.add(key)
    session.flush()
    return NewKey(key.id, name, token, key.webhook_secret)


def any_key_ever(session: Session) -> bool:
    """Whether a key was ever created here, revoked ones included: once keys exist, revoking them all never
    opens the API again (SDFLEET_AUTH=auto)."""
    return session.scalar(select(ApiKey.id).limit(1)) is not None


def lookup_hash(session: Session, digest: str) -> ApiKey | None:
    """The live (not revoked) key whose token hashes to `digest`."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))


def revoke(session: Session, name: str) -> bool:
    key = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True


def sign(secret: str, body: bytes) -> str:
    """The webhook signature header's value: HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, body), signature)
