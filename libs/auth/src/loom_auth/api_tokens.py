"""API tokens: ``loom_`` + 32 random bytes (URL-safe base64), stored as a SHA-256 hash.

The prefix makes a leaked token recognisable (secret scanners, logs) and tells the
authentication backend to look it up rather than decode it as a JWT. The server keeps
`hash_token(token)` (a unique column, so the lookup is an index hit) and the first
characters as `prefix`, to tell a user's tokens apart in a list; the token itself is
shown once, at creation.
"""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

from loom_auth.tokens import hash_token

__all__ = ["API_TOKEN_PREFIX", "ApiToken", "is_api_token", "new_api_token"]

API_TOKEN_PREFIX = "loom_"
_DISPLAY_PREFIX_LENGTH = 12  # "loom_" and 7 random characters; fits String(16)
_API_TOKEN = re.compile(r"loom_[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


class ApiToken(NamedTuple):
    """A new API token and what the server stores of it."""

    token: str
    """Shown once to its creator, never stored."""
    prefix: str
    """The first 12 characters, stored to identify the token in lists."""
    token_hash: str
    """SHA-256 hex of `token`: what the server stores and looks up."""


def new_api_token() -> ApiToken:
    """A new random API token. Raises nothing."""
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    return ApiToken(
        token=token, prefix=token[:_DISPLAY_PREFIX_LENGTH], token_hash=hash_token(token)
    )


def is_api_token(value: str) -> bool:
    """Whether `value` has the exact shape of an API token (not whether it exists)."""
    return _API_TOKEN.fullmatch(value) is not None
