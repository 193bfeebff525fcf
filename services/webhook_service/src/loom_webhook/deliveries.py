"""Decoding a delivery's body (DESIGN §6): pure functions, no I/O.

Two steps, because DESIGN §6 answers 415 BEFORE checking the signature but parses only
authenticated bodies: `body_format(content_type)` classifies the `Content-Type` header
(or raises `UnsupportedMediaType`); `decode_body(format, body)`, called after
`signatures.verify`, turns the raw bytes into the payload templates see.

* JSON: `application/json` or any `+json` type (`application/vnd.github+json`); a
  missing `Content-Type` is read as JSON too, for minimal senders (`curl -d`-less
  scripts). Strict RFC 8259: no `NaN`/`Infinity`.
* `application/x-www-form-urlencoded` with one `payload` field holding JSON: GitHub's
  form mode.
* An empty body, in either format, is the payload None (a bare "something happened").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final, Literal
from urllib.parse import parse_qs

from loom_webhook.errors import MalformedBody, UnsupportedMediaType
from loom_webhook.signatures import AuthScheme, event_name

__all__ = ["BodyFormat", "body_format", "decode_body", "is_github_ping"]

BodyFormat = Literal["json", "form"]

_FORM: Final = "application/x-www-form-urlencoded"
# A GitHub form delivery has one field; a few more are tolerated, thousands are an attack
# on parse_qs's time, not a webhook.
_MAX_FORM_FIELDS: Final = 100


def body_format(content_type: str | None) -> BodyFormat:
    """How to decode a body sent with `content_type` (the header's value, parameters such
    as `charset` allowed; None when absent, which is read as JSON).

    Raises `UnsupportedMediaType` for any type but JSON and form-encoded.
    """
    if content_type is None or not content_type.strip():
        return "json"
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return "json"
    if media_type == _FORM:
        return "form"
    raise UnsupportedMediaType(
        f"unsupported content type {media_type!r}: send application/json or {_FORM}"
    )


def decode_body(fmt: BodyFormat, body: bytes) -> object:
    """The payload of a delivery: the JSON value of `body`, or of its `payload` field when
    `fmt` is `form`; None for an empty body.

    Raises `MalformedBody` for invalid JSON (bad syntax, not UTF-8, NaN or Infinity,
    nesting too deep), or a form without exactly one `payload` field.
    """
    if not body.strip():
        return None
    if fmt == "json":
        return _json(body, "the body")
    try:
        # parse_qs on bytes re-encodes decoded values as ASCII: parse text, strictly UTF-8.
        fields = parse_qs(
            body.decode("utf-8"),
            keep_blank_values=True,
            max_num_fields=_MAX_FORM_FIELDS,
            encoding="utf-8",
            errors="strict",
        )
    except ValueError as exc:  # too many fields, or not UTF-8 (UnicodeDecodeError)
        raise MalformedBody(f"the form body is malformed: {exc}") from exc
    values = fields.get("payload", [])
    if len(values) != 1:
        raise MalformedBody(
            "a form-encoded delivery needs exactly one `payload` field holding JSON"
            f" (found {len(values)})"
        )
    return _json(values[0], "the form's `payload` field")


def is_github_ping(scheme: AuthScheme, headers: Mapping[str, str]) -> bool:
    """Whether this is GitHub's `ping`, sent when a hook is created: answered 200 and
    never run (DESIGN §6). Only for `github` hooks; raises nothing."""
    return scheme == "github" and event_name(scheme, headers) == "ping"


def _json(raw: bytes | str, what: str) -> object:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise MalformedBody(f"{what} is JSON nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"{what} is not UTF-8 JSON: {exc.reason}") from exc
    except ValueError as exc:  # JSONDecodeError, the constants, an integer too long
        raise MalformedBody(f"{what} is not valid JSON: {exc}") from exc


def _reject_constant(name: str) -> object:
    # Python reads NaN and Infinity, JSON has neither: a stored payload must be portable
    # (PostgreSQL's jsonb refuses them).
    raise ValueError(f"{name} is not JSON")
