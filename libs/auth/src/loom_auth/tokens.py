"""JWT access tokens (pyjwt, HS256) and the hashing shared by every opaque token.

An access token is a JWT signed with HS256 under the signing key that `keys.py` derives
from `LOOM_SECRET_KEY`. Its claims::

    sub   the username            role  admin | editor | viewer
    iat   issued at (epoch s)     exp   expires at (epoch s; 15 minutes later by default)
    jti   a random id             typ   "access"
    sid   the refresh-token family the login started (optional; logout revokes it)

Decoding trusts nothing in the token's header: the algorithm is pinned to HS256 (so
`alg: none` and RS256/HS256 confusion fail before any claim is read), every claim above
but `sid` is required and type-checked, and the clock is an argument so tests need no
sleeping. Every failure is one `InvalidToken` whose `reason` is for the logs.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import jwt

from loom_auth.errors import InvalidToken, UnknownRole
from loom_auth.roles import Role, parse_role

__all__ = [
    "ACCESS_TOKEN_LIFETIME",
    "ALGORITHM",
    "MIN_SIGNING_KEY_BYTES",
    "AccessClaims",
    "AccessToken",
    "check_signing_key",
    "decode_access_token",
    "hash_token",
    "new_access_token",
    "token_hash_matches",
]

ALGORITHM = "HS256"
ACCESS_TOKEN_LIFETIME = 15 * 60
"""Seconds. Short, because an access token cannot be revoked before it expires."""
MIN_SIGNING_KEY_BYTES = 32
"""HS256 keys shorter than the hash output weaken it (RFC 7518 §3.2)."""

_TYP = "access"
_REQUIRED = ["exp", "iat", "sub", "role", "jti", "typ"]


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """The verified claims of an access token."""

    username: str
    role: Role
    jti: str
    issued_at: int
    expires_at: int
    session_id: str | None = None
    """The refresh-token family of the login this token came from, if any."""


class AccessToken(NamedTuple):
    """A freshly signed access token and what it says."""

    token: str
    claims: AccessClaims


def new_access_token(
    signing_key: bytes,
    username: str,
    role: Role | str,
    *,
    session_id: str | None = None,
    lifetime: int = ACCESS_TOKEN_LIFETIME,
    now: float | None = None,
) -> AccessToken:
    """Sign an access token for `username` with `role`, valid `lifetime` seconds from
    `now` (default: the current time).

    Raises `ValueError` for a key shorter than `MIN_SIGNING_KEY_BYTES`, an empty username
    or a lifetime that is not positive; `UnknownRole` for a role that is not one.
    """
    check_signing_key(signing_key)
    if not username:
        raise ValueError("an access token needs a username")
    if lifetime <= 0:
        raise ValueError(f"lifetime must be positive, not {lifetime}")
    issued_at = int(time.time() if now is None else now)
    claims = AccessClaims(
        username=username,
        role=role if isinstance(role, Role) else parse_role(role),
        jti=secrets.token_urlsafe(16),
        issued_at=issued_at,
        expires_at=issued_at + lifetime,
        session_id=session_id,
    )
    payload: dict[str, Any] = {
        "sub": claims.username,
        "role": claims.role.value,
        "iat": claims.issued_at,
        "exp": claims.expires_at,
        "jti": claims.jti,
        "typ": _TYP,
    }
    if session_id is not None:
        payload["sid"] = session_id
    return AccessToken(jwt.encode(payload, signing_key, algorithm=ALGORITHM), claims)


def decode_access_token(
    token: str,
    signing_key: bytes,
    *,
    now: float | None = None,
    leeway: float = 0.0,
) -> AccessClaims:
    """Verify `token` and return its claims.

    Raises `InvalidToken` for anything but a well-formed HS256 access token signed with
    `signing_key` that is not expired at `now` (± `leeway` seconds for clock skew between
    replicas): another algorithm (`none`, RS256...), a bad signature, a missing or
    mistyped claim, an unknown role, `typ` other than "access", expired, or issued in
    the future. Raises `ValueError` for a key shorter than `MIN_SIGNING_KEY_BYTES`.
    """
    check_signing_key(signing_key)
    try:
        payload = jwt.decode(
            token,
            signing_key,
            algorithms=[ALGORITHM],
            # Times are checked below against the injected clock, not pyjwt's.
            options={
                "require": _REQUIRED,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidAlgorithmError as exc:
        raise InvalidToken(f"algorithm not allowed: {exc}") from exc
    except jwt.InvalidSignatureError as exc:
        raise InvalidToken("signature does not verify") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidToken(f"missing claim {exc.claim!r}") from exc
    except jwt.PyJWTError as exc:  # DecodeError and the other claim checks of pyjwt
        raise InvalidToken(f"malformed token: {exc}") from exc
    claims = _claims(payload)
    current = time.time() if now is None else now
    if current >= claims.expires_at + leeway:
        raise InvalidToken(f"expired at {claims.expires_at}")
    if claims.issued_at > current + leeway:
        raise InvalidToken(f"issued in the future ({claims.issued_at})")
    return claims


def _claims(payload: dict[str, Any]) -> AccessClaims:
    if payload.get("typ") != _TYP:
        raise InvalidToken(f"not an access token (typ={payload.get('typ')!r})")
    sub, role, jti, sid = payload["sub"], payload["role"], payload["jti"], payload.get("sid")
    exp, iat = payload["exp"], payload["iat"]
    if not isinstance(sub, str) or not sub:
        raise InvalidToken("claim 'sub' is not a non-empty string")
    if not isinstance(jti, str) or not jti:
        raise InvalidToken("claim 'jti' is not a non-empty string")
    if sid is not None and not isinstance(sid, str):
        raise InvalidToken("claim 'sid' is not a string")
    for name, value in (("exp", exp), ("iat", iat)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidToken(f"claim {name!r} is not an integer")
    if not isinstance(role, str):
        raise InvalidToken("claim 'role' is not a string")
    try:
        parsed_role = parse_role(role)
    except UnknownRole as exc:
        raise InvalidToken(f"claim 'role': {exc}") from exc
    return AccessClaims(
        username=sub,
        role=parsed_role,
        jti=jti,
        issued_at=iat,
        expires_at=exp,
        session_id=sid,
    )


def check_signing_key(signing_key: bytes) -> None:
    """Raises `ValueError` for a key shorter than `MIN_SIGNING_KEY_BYTES`."""
    if len(signing_key) < MIN_SIGNING_KEY_BYTES:
        raise ValueError(
            f"the signing key has {len(signing_key)} bytes; HS256 needs at least "
            f"{MIN_SIGNING_KEY_BYTES} (derive it with signing_key_from_secret)"
        )


def hash_token(token: str) -> str:
    """The SHA-256 hex digest of an opaque token (API or refresh), as stored server-side.

    A plain hash and not argon2: these tokens carry 256 random bits, so no dictionary or
    brute force can invert the digest, and a slow hash would only slow every request
    down. (Passwords are low-entropy; that is why they get argon2id.)
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_hash_matches(token: str, stored_hash: str) -> bool:
    """Whether `token` hashes to `stored_hash`, compared in constant time."""
    return hmac.compare_digest(hash_token(token).encode(), stored_hash.lower().encode())
