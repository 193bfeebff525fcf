"""The message envelope and types of DESIGN §1, shared by every writer of messages.

Pure: building and checking envelopes needs no broker. loom_db writes work and control
messages into the outbox with these; loom_messaging carries and decodes them.

Envelope: `{type, version, id, ts, trace, data}`, orjson-encoded.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

__all__ = [
    "CHANNEL_OF",
    "MESSAGE_TYPES",
    "Channel",
    "encode_envelope",
]

Channel = Literal["queue", "events", "control"]

MESSAGE_TYPES: dict[str, int] = {
    "execution.requested": 1,
    "execution.cancel": 1,
    "graph.changed": 1,
    "execution.status": 1,
    "node.status": 1,
    "log.batch": 1,
}
"""Every message type and its current version."""

CHANNEL_OF: dict[str, Channel] = {
    "execution.requested": "queue",
    "execution.cancel": "control",
    "graph.changed": "control",
    "execution.status": "events",
    "node.status": "events",
    "log.batch": "events",
}


def encode_envelope(
    type: str, data: dict[str, Any], *, trace: dict[str, str] | None = None
) -> bytes:
    """The orjson bytes of a new envelope of `type` carrying `data`.

    Raises `ValueError` for a type that is not in `MESSAGE_TYPES`.
    """
    version = MESSAGE_TYPES.get(type)
    if version is None:
        raise ValueError(f"unknown message type {type!r}")
    envelope = {
        "type": type,
        "version": version,
        "id": str(uuid.uuid4()),
        "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "trace": trace or {},
        "data": data,
    }
    return orjson.dumps(envelope)
