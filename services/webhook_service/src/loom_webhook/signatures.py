"""Authenticating webhook deliveries (DESIGN §6): pure functions, no I/O.

Each hook names one scheme:

* `github`: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>`;
* `gitlab`: `X-Gitlab-Token` equals the secret;
* `standard` (Standard Webhooks 1.0): `webhook-id`, `webhook-timestamp` (unix seconds,
  within ±5 minutes of now) and `webhook-signature`, a space-separated list of
  `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` of which any one may match;
  a `whsec_<base64>` secret is base64-decoded into the HMAC key, as the specification
  says (any other secret is used as its UTF-8 bytes); entries of other versions
  (`v1a`, asymmetric) are ignored;
* `token`: `Authorization: Bearer <secret>`;
* `none`: anything passes (only when a graph says so explicitly).

Every comparison is constant-time (`hmac.compare_digest`). Every failure is the same
`SignatureRejected`, whose message is for the logs: the HTTP answer says nothing about
why. Header names are looked up case-insensitively in any `Mapping[str, str]` (a plain
dict as much as Starlette's `Headers`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Final, Literal, get_args

from loom_webhook.errors import SignatureRejected

__all__ = [
    "AUTH_SCHEMES",
    "MAX_DELIVERY_ID_LENGTH",
    "REPLAY_WINDOW",
    "AuthScheme",
    "delivery_id",
    "event_name",
    "github_signature",
    "header",
    "standard_signature",
    "verify",
]

AuthScheme = Literal["github", "gitlab", "standard", "token", "none"]
AUTH_SCHEMES: Final = frozenset[str](get_args(AuthScheme))

REPLAY_WINDOW: Final = timedelta(minutes=5)
"""How far a Standard Webhooks `webhook-timestamp` may be from now, either way."""

MAX_DELIVERY_ID_LENGTH: Final = 200
"""Longer delivery ids are replaced by their SHA-256 (see `delivery_id`), so the
idempotency key `webhook:{graph}:{hook}:{id}` always fits its column."""

_WHSEC_PREFIX: Final = "whsec_"
# Unix seconds have 10 digits until 2286; a longer value is garbage, not a time, and
# parsing thousands of digits would be wasted work (or a ValueError past 4,300).
_MAX_TIMESTAMP_DIGITS: Final = 12


def header(headers: Mapping[str, str], name: str) -> str | None:
    """The value of header `name`, whatever the case of its spelling, stripped of
    surrounding whitespace; None when absent or blank. Raises nothing."""
    value = headers.get(name)  # the exact spelling, or a mapping that ignores case
    if value is None:
        wanted = name.lower()
        for key, candidate in headers.items():
            if key.lower() == wanted:
                value = candidate
                break
    if value is None:
        return None
    return value.strip() or None


def verify(
    scheme: AuthScheme,
    secret: str | None,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime,
    *,
    tolerance: timedelta = REPLAY_WINDOW,
) -> None:
    """Check that a delivery of `body` with `headers` passes `scheme` with `secret` (the
    secret's value, not its name). `now` (timezone-aware) and `tolerance` bound the
    Standard Webhooks timestamp; the other schemes carry no time.

    Returns None when the delivery is authentic. Raises `SignatureRejected` (reason in the
    message, for logs only) for a missing, malformed or wrong signature or token, a
    timestamp outside `now ± tolerance`, a missing secret or an unusable `whsec_` secret
    (failing closed), or an unknown scheme. Raises `ValueError` for a naive `now`, a
    programming error.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("`now` must be timezone-aware")
    if scheme == "none":
        return
    if scheme not in AUTH_SCHEMES:
        raise SignatureRejected(f"unknown auth scheme {scheme!r}")
    if not secret:
        raise SignatureRejected(f"auth {scheme!r} but the hook's secret is empty or missing")
    if scheme == "github":
        _verify_github(secret, headers, body)
    elif scheme == "gitlab":
        _verify_gitlab(secret, headers)
    elif scheme == "standard":
        _verify_standard(secret, headers, body, now, tolerance)
    else:
        _verify_token(secret, headers)


def delivery_id(scheme: AuthScheme, headers: Mapping[str, str]) -> str | None:
    """The provider's id of this delivery, the same on every retry, for de-duplication:
    GitHub `X-GitHub-Delivery`; GitLab `X-Gitlab-Event-UUID`, else `Idempotency-Key`;
    Standard Webhooks `webhook-id`; `token` and `none` `Idempotency-Key`. None when the
    sender gave none. An id longer than `MAX_DELIVERY_ID_LENGTH` characters comes back
    as `sha256:<hex digest>` of it: still one per delivery, and bounded. Raises nothing.
    """
    if scheme == "github":
        value = header(headers, "X-GitHub-Delivery")
    elif scheme == "gitlab":
        value = header(headers, "X-Gitlab-Event-UUID") or header(headers, "Idempotency-Key")
    elif scheme == "standard":
        value = header(headers, "webhook-id")
    else:
        value = header(headers, "Idempotency-Key")
    if value is not None and len(value) > MAX_DELIVERY_ID_LENGTH:
        value = "sha256:" + hashlib.sha256(_bytes(value)).hexdigest()
    return value


def event_name(scheme: AuthScheme, headers: Mapping[str, str]) -> str | None:
    """The provider's own event name, which `events` filters list: GitHub
    `X-GitHub-Event` (`push`, `ping`), GitLab `X-Gitlab-Event` (`Push Hook`); None for
    the other schemes or when the header is absent. Raises nothing."""
    if scheme == "github":
        return header(headers, "X-GitHub-Event")
    if scheme == "gitlab":
        return header(headers, "X-Gitlab-Event")
    return None


def github_signature(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`: `sha256=<hex>`. Raises
    nothing."""
    return "sha256=" + hmac.new(_bytes(secret), body, hashlib.sha256).hexdigest()


def standard_signature(secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """One `webhook-signature` entry, `v1,<base64>`, for a Standard Webhooks delivery.

    Raises `SignatureRejected` when `secret` starts with `whsec_` but the rest is not
    base64 (or decodes to nothing).
    """
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_standard_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


# --- the schemes ------------------------------------------------------------------------


def _verify_github(secret: str, headers: Mapping[str, str], body: bytes) -> None:
    given = header(headers, "X-Hub-Signature-256")
    if given is None:
        raise SignatureRejected("X-Hub-Signature-256 missing")
    algorithm, sep, digest = given.partition("=")
    if not sep or algorithm.strip().lower() != "sha256":
        raise SignatureRejected("X-Hub-Signature-256 is not `sha256=<hex>`")
    expected = hmac.new(_bytes(secret), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(_bytes(digest.strip().lower()), _bytes(expected)):
        raise SignatureRejected("X-Hub-Signature-256 does not match the body")


def _verify_gitlab(secret: str, headers: Mapping[str, str]) -> None:
    given = header(headers, "X-Gitlab-Token")
    if given is None:
        raise SignatureRejected("X-Gitlab-Token missing")
    if not hmac.compare_digest(_bytes(given), _bytes(secret)):
        raise SignatureRejected("X-Gitlab-Token does not match")


def _verify_token(secret: str, headers: Mapping[str, str]) -> None:
    given = header(headers, "Authorization")
    if given is None:
        raise SignatureRejected("Authorization missing")
    kind, _, credentials = given.partition(" ")
    if kind.lower() != "bearer":  # the scheme name is case-insensitive (RFC 9110 §11.1)
        raise SignatureRejected("Authorization is not `Bearer <token>`")
    if not hmac.compare_digest(_bytes(credentials.strip()), _bytes(secret)):
        raise SignatureRejected("the bearer token does not match")


def _verify_standard(
    secret: str, headers: Mapping[str, str], body: bytes, now: datetime, tolerance: timedelta
) -> None:
    msg_id = header(headers, "webhook-id")
    timestamp = header(headers, "webhook-timestamp")
    signatures = header(headers, "webhook-signature")
    if msg_id is None or timestamp is None or signatures is None:
        names = ("webhook-id", "webhook-timestamp", "webhook-signature")
        values = (msg_id, timestamp, signatures)
        missing = ", ".join(n for n, v in zip(names, values, strict=True) if v is None)
        raise SignatureRejected(f"{missing} missing")
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > _MAX_TIMESTAMP_DIGITS:
        raise SignatureRejected("webhook-timestamp is not unix seconds")
    # Checked before the HMAC: a replayed delivery fails however good its signature.
    skew = now.timestamp() - int(timestamp)
    if abs(skew) > tolerance.total_seconds():
        when = "old" if skew > 0 else "in the future"
        raise SignatureRejected(f"webhook-timestamp is {abs(skew):.0f}s {when}, beyond {tolerance}")
    expected = _bytes(standard_signature(secret, msg_id, timestamp, body).partition(",")[2])
    matched = False
    for entry in signatures.split():
        version, sep, value = entry.partition(",")
        if sep and version == "v1" and hmac.compare_digest(_bytes(value), expected):
            matched = True
    if not matched:
        raise SignatureRejected("no v1 entry of webhook-signature matches")


def _standard_key(secret: str) -> bytes:
    if not secret.startswith(_WHSEC_PREFIX):
        return _bytes(secret)
    try:
        key = base64.b64decode(secret.removeprefix(_WHSEC_PREFIX), validate=True)
    except binascii.Error as exc:
        raise SignatureRejected("the hook's whsec_ secret is not valid base64") from exc
    if not key:
        raise SignatureRejected("the hook's whsec_ secret is empty")
    return key


def _bytes(text: str) -> bytes:
    # compare_digest refuses non-ASCII str; header values arrive decoded as latin-1 and a
    # Mapping may hold anything, so compare bytes. surrogatepass: never a UnicodeError.
    return text.encode("utf-8", "surrogatepass")
