"""Refresh tokens that rotate, and the pure rule that detects reuse (DESIGN §5, §11).

A refresh token is ``<family_id>.<secret>``: the family id (a UUID, the primary key of the
family's row) lets the server find the family without scanning, and the secret is 256
random bits. The server never stores the token: its SHA-256 hex digest is the token's
`jti`, and a family row keeps only the `current_jti`. A database dump therefore yields
no usable refresh token.

A login starts a family; each refresh presents the current token and receives the next
one, and the presented one is spent. `rotate` decides what a presented token means:

* it is the family's current token → `Outcome.ROTATE` (issue the next one; the caller
  swaps `current_jti` with a compare-and-swap ``UPDATE ... WHERE current_jti = :old``,
  so two concurrent refreshes cannot both win);
* any other token of a live family → `Outcome.REVOKE_FAMILY`: a spent token came back, so
  it was stolen (or the client raced itself); both holders are logged out. Only someone
  who held a token of the family knows its id, a UUID that appears nowhere else;
* the family is revoked or expired → `Outcome.REJECT`, nothing changes.
"""

from __future__ import annotations

import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import NamedTuple

from loom_auth.errors import InvalidToken
from loom_auth.tokens import hash_token

__all__ = [
    "REFRESH_TOKEN_LIFETIME",
    "Outcome",
    "RefreshFamilyState",
    "RefreshToken",
    "RefreshTokenId",
    "new_family_id",
    "new_refresh_token",
    "parse_refresh_token",
    "rotate",
]

REFRESH_TOKEN_LIFETIME = timedelta(days=14)
"""How long a family lives after login; a refresh does not extend it."""

_FAMILY_ID = re.compile(r"[A-Za-z0-9-]{1,36}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


class RefreshToken(NamedTuple):
    """A new refresh token (shown to the client once) and what the server stores."""

    token: str
    family_id: str
    jti: str
    """SHA-256 hex of `token`: the family's new `current_jti`."""


class RefreshTokenId(NamedTuple):
    """Where a presented refresh token belongs: its family and its `jti` (hash)."""

    family_id: str
    jti: str


@dataclass(frozen=True, slots=True)
class RefreshFamilyState:
    """What the database knows of a family, as `rotate` needs it."""

    family_id: str
    current_jti: str
    expires_at: datetime
    revoked: bool = False


class Outcome(Enum):
    """What to do with a presented refresh token (see the module docstring)."""

    ROTATE = "rotate"
    """Valid: issue the next token, make its jti the current one."""
    REVOKE_FAMILY = "revoke_family"
    """A spent token was reused: revoke the whole family, answer 401."""
    REJECT = "reject"
    """The family is revoked or expired: answer 401, change nothing."""


def new_family_id() -> str:
    """A fresh family id (a UUID4 string), for a login."""
    return str(uuid.uuid4())


def new_refresh_token(family_id: str) -> RefreshToken:
    """A new token of the family `family_id`. Raises `ValueError` for a family id that
    is not 1–36 letters, digits and hyphens (a UUID fits)."""
    if not _FAMILY_ID.fullmatch(family_id):
        raise ValueError(f"invalid refresh family id {family_id!r}")
    token = f"{family_id}.{secrets.token_urlsafe(32)}"
    return RefreshToken(token=token, family_id=family_id, jti=hash_token(token))


def parse_refresh_token(token: str) -> RefreshTokenId:
    """The family and jti of a presented token. Raises `InvalidToken` if it does not
    have the shape `new_refresh_token` gives (checked before any database lookup)."""
    family_id, dot, secret = token.partition(".")
    if not dot or not _FAMILY_ID.fullmatch(family_id) or not _SECRET.fullmatch(secret):
        raise InvalidToken("malformed refresh token")
    return RefreshTokenId(family_id=family_id, jti=hash_token(token))


def rotate(family: RefreshFamilyState, presented_jti: str, *, now: datetime) -> Outcome:
    """Decide what a presented token (`presented_jti`, from `parse_refresh_token`) means
    for `family` at `now`. Pure; raises nothing. `now` and `family.expires_at` must both
    be timezone-aware (or both naive)."""
    if family.revoked or now >= family.expires_at:
        return Outcome.REJECT
    if hmac.compare_digest(presented_jti.encode(), family.current_jti.encode()):
        return Outcome.ROTATE
    return Outcome.REVOKE_FAMILY
