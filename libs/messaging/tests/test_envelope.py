"""Envelopes (DESIGN §1): what `encode` writes, what `decode` accepts and the reasons it
gives for what it refuses (they become dead-letter reasons)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from loom_common import MESSAGE_TYPES, encode_envelope
from loom_messaging import (
    LOG_BATCH_MAX_BYTES,
    MAX_MESSAGE_BYTES,
    Envelope,
    InvalidMessage,
    MessagingError,
    decode,
    encode,
)


def raw(**fields: Any) -> bytes:
    envelope: dict[str, Any] = {
        "type": "execution.requested",
        "version": 1,
        "id": "0b7c7a5e",
        "ts": "2025-01-01T00:00:00Z",
        "trace": {},
        "data": {"execution_id": "exec-1", "graph": "g"},
    }
    envelope.update(fields)
    return orjson.dumps({k: v for k, v in envelope.items() if v is not ...})


def log_batch(text_bytes: int) -> dict[str, Any]:
    line = {"seq": 1, "node": "build", "stream": "stdout", "ts": "t", "text": "x" * text_bytes}
    return {"execution_id": "exec-1", "lines": [line]}


@pytest.mark.parametrize("type_", sorted(MESSAGE_TYPES))
def test_every_message_type_round_trips(type_: str) -> None:
    data = {"execution_id": "exec-1", "nested": {"list": [1, 2.5, None, "é"]}}
    envelope = decode(encode(type_, data, trace={"traceparent": "00-abc-def-01"}))
    assert envelope.type == type_
    assert envelope.version == MESSAGE_TYPES[type_]
    assert envelope.data == data
    assert envelope.trace == {"traceparent": "00-abc-def-01"}
    assert envelope.id and envelope.ts.endswith("Z")


def test_each_encoded_envelope_has_its_own_id() -> None:
    data = {"execution_id": "exec-1", "graph": "g"}
    assert (
        decode(encode("execution.requested", data)).id
        != decode(encode("execution.requested", data)).id
    )


def test_missing_trace_decodes_as_empty() -> None:
    assert decode(raw(trace=...)).trace == {}


def test_decode_gives_the_envelope_fields() -> None:
    assert decode(raw()) == Envelope(
        type="execution.requested",
        version=1,
        id="0b7c7a5e",
        ts="2025-01-01T00:00:00Z",
        trace={},
        data={"execution_id": "exec-1", "graph": "g"},
    )


def test_log_batch_may_be_up_to_256_kib() -> None:
    body = encode("log.batch", log_batch(200 * 1024))
    assert MAX_MESSAGE_BYTES < len(body) <= LOG_BATCH_MAX_BYTES
    assert decode(body).type == "log.batch"


def test_log_batch_over_256_kib_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="over its cap of 262144"):
        encode("log.batch", log_batch(LOG_BATCH_MAX_BYTES))
    with pytest.raises(InvalidMessage, match="over the cap of 262144"):
        decode(encode_envelope("log.batch", log_batch(LOG_BATCH_MAX_BYTES)))


def test_other_messages_over_64_kib_are_refused() -> None:
    data = {"execution_id": "exec-1", "graph": "g" * MAX_MESSAGE_BYTES}
    with pytest.raises(InvalidMessage, match="execution.requested of .* over its cap of 65536"):
        encode("execution.requested", data)
    with pytest.raises(InvalidMessage, match="execution.requested of .* over its cap of 65536"):
        decode(encode_envelope("execution.requested", data))


def test_unknown_type_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="unknown message type 'no.such'"):
        encode("no.such", {})
    with pytest.raises(InvalidMessage, match="unknown message type 'no.such'"):
        decode(raw(type="no.such"))
    for odd in ([], {}, 1, None):  # not a name at all: refused too, not a TypeError
        with pytest.raises(InvalidMessage, match="unknown message type"):
            decode(raw(type=odd))


def test_unknown_version_is_refused() -> None:
    with pytest.raises(InvalidMessage, match=r"unsupported version 2 of execution.requested"):
        decode(raw(version=2))


@pytest.mark.parametrize("body", [b"", b"{not JSON", b"\xff\xfe", b'{"type": "execution.requ'])
def test_not_json_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidMessage, match="not JSON"):
        decode(body)


@pytest.mark.parametrize("field", ["type", "version", "id", "ts", "data"])
def test_missing_field_is_refused(field: str) -> None:
    with pytest.raises(InvalidMessage, match="not an envelope"):
        decode(raw(**{field: ...}))


@pytest.mark.parametrize("body", [b"[]", b'"execution.requested"', b"42", b"null"])
def test_json_that_is_not_an_object_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidMessage, match="not an envelope"):
        decode(body)


@pytest.mark.parametrize("fields", [{"data": []}, {"data": "x"}, {"trace": ["a"]}])
def test_data_and_trace_must_be_objects(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidMessage, match="must be objects"):
        decode(raw(**fields))


def test_invalid_message_is_a_value_error_of_loom_messaging() -> None:
    with pytest.raises(InvalidMessage) as caught:
        decode(b"nope")
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, MessagingError)
