"""Decoding and checking envelopes (DESIGN §1): `{type, version, id, ts, trace, data}`.

Encoding lives in `loom_common.encode_envelope` (the outbox writes envelopes too);
this module is the receiving side: it refuses what is not a known type and version,
or is over the byte caps, with a reason fit for the dead-letter queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from loom_common import MESSAGE_TYPES, encode_envelope
from loom_messaging.errors import InvalidMessage

__all__ = ["LOG_BATCH_MAX_BYTES", "MAX_MESSAGE_BYTES", "Envelope", "decode", "encode"]

LOG_BATCH_MAX_BYTES = 256 * 1024
"""A `log.batch` is at most 256 KiB (DESIGN §1)."""

MAX_MESSAGE_BYTES = 64 * 1024
"""Every other message is small; this cap keeps a bug from flooding a broker."""

_REQUIRED = ("type", "version", "id", "ts", "data")


@dataclass(frozen=True, slots=True)
class Envelope:
    type: str
    version: int
    id: str
    ts: str
    trace: dict[str, str]
    data: dict[str, Any]


def cap_for(type: str) -> int:
    return LOG_BATCH_MAX_BYTES if type == "log.batch" else MAX_MESSAGE_BYTES


def encode(type: str, data: dict[str, Any], *, trace: dict[str, str] | None = None) -> bytes:
    """A new envelope's bytes; `InvalidMessage` for an unknown type or one over its cap."""
    try:
        body = encode_envelope(type, data, trace=trace)
    except ValueError as exc:
        raise InvalidMessage(str(exc)) from None
    if len(body) > cap_for(type):
        raise InvalidMessage(f"{type} of {len(body)} bytes is over its cap of {cap_for(type)}")
    return body


def decode(body: bytes) -> Envelope:
    """The envelope in `body`. Raises `InvalidMessage` saying why it cannot be accepted:
    not JSON, not an envelope, an unknown type or version, over its byte cap."""
    if len(body) > LOG_BATCH_MAX_BYTES:
        raise InvalidMessage(
            f"message of {len(body)} bytes is over the cap of {LOG_BATCH_MAX_BYTES}"
        )
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc}") from None
    if not isinstance(raw, dict) or any(key not in raw for key in _REQUIRED):
        raise InvalidMessage(f"not an envelope: needs {', '.join(_REQUIRED)}")
    type_, version = raw["type"], raw["version"]
    if type_ not in MESSAGE_TYPES:
        raise InvalidMessage(f"unknown message type {type_!r}")
    if version != MESSAGE_TYPES[type_]:
        raise InvalidMessage(
            f"unsupported version {version!r} of {type_} (expected {MESSAGE_TYPES[type_]})"
        )
    if len(body) > cap_for(type_):
        raise InvalidMessage(f"{type_} of {len(body)} bytes is over its cap of {cap_for(type_)}")
    if not isinstance(raw["data"], dict) or not isinstance(raw.get("trace") or {}, dict):
        raise InvalidMessage("an envelope's data and trace must be objects")
    return Envelope(
        type_, version, str(raw["id"]), str(raw["ts"]), raw.get("trace") or {}, raw["data"]
    )
