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


_new = object.__new__
_set_type, _set_version, _set_id, _set_ts, _set_trace, _set_data = (
    getattr(Envelope, name).__set__ for name in ("type", "version", "id", "ts", "trace", "data")
)


def _envelope(
    type_: str, version: int, id_: str, ts: str, trace: dict[str, str], data: dict[str, Any]
) -> Envelope:
    """`Envelope(...)` for `decode`, about twice as fast: it sets the slots directly
    rather than through the frozen dataclass's `object.__setattr__` calls (Envelope has
    no `__post_init__`, so the result is the same)."""
    envelope = _new(Envelope)
    _set_type(envelope, type_)
    _set_version(envelope, version)
    _set_id(envelope, id_)
    _set_ts(envelope, ts)
    _set_trace(envelope, trace)
    _set_data(envelope, data)
    return envelope


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
    size = len(body)
    if size > LOG_BATCH_MAX_BYTES:
        raise InvalidMessage(f"message of {size} bytes is over the cap of {LOG_BATCH_MAX_BYTES}")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidMessage(f"not an envelope: needs {', '.join(_REQUIRED)}")
    try:  # one lookup per field, each needed below: cheaper than a key-set check first
        type_, version, id_, ts, data = (
            raw["type"],
            raw["version"],
            raw["id"],
            raw["ts"],
            raw["data"],
        )
    except KeyError:
        raise InvalidMessage(f"not an envelope: needs {', '.join(_REQUIRED)}") from None
    expected = MESSAGE_TYPES.get(type_) if isinstance(type_, str) else None
    if expected is None:
        raise InvalidMessage(f"unknown message type {type_!r}")
    if version != expected:
        raise InvalidMessage(f"unsupported version {version!r} of {type_} (expected {expected})")
    if size > MAX_MESSAGE_BYTES and size > cap_for(type_):  # every cap is >= MAX_MESSAGE_BYTES
        raise InvalidMessage(f"{type_} of {size} bytes is over its cap of {cap_for(type_)}")
    trace = raw.get("trace") or {}
    if not isinstance(data, dict) or not isinstance(trace, dict):
        raise InvalidMessage("an envelope's data and trace must be objects")
    return _envelope(type_, version, str(id_), str(ts), trace, data)
