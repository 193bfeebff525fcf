"""Decoding delivery bodies: JSON, GitHub's form mode, and what is refused."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from loom_webhook import (
    MalformedBody,
    UnsupportedMediaType,
    body_format,
    decode_body,
    is_github_ping,
)

PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "octo/loom"}, "commits": [1, 2]}


# --- content types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        " application/json ;charset=UTF-8",
        "application/vnd.github+json",
        "application/cloudevents+json",
        None,
        "",
    ],
)
def test_json_content_types_and_a_missing_one_read_as_json(content_type: str | None) -> None:
    assert body_format(content_type) == "json"


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "application/x-www-form-urlencoded; charset=utf-8"],
)
def test_form_content_type_reads_as_form(content_type: str) -> None:
    assert body_format(content_type) == "form"


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/json",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/jsonp",
        "text/x+json",
    ],
)
def test_other_content_types_are_unsupported(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        body_format(content_type)
    assert isinstance(caught.value, ValueError)
    assert content_type.partition(";")[0] in str(caught.value)


# --- JSON -------------------------------------------------------------------------------


def test_json_body_decodes_to_its_value() -> None:
    assert decode_body("json", json.dumps(PUSH).encode()) == PUSH
    assert decode_body("json", b"[1, 2]") == [1, 2]
    assert decode_body("json", '{"name": "zoë"}'.encode()) == {"name": "zoë"}


def test_json_body_with_utf8_bom_decodes() -> None:
    assert decode_body("json", b"\xef\xbb\xbf" + b'{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("body", [b"", b"  \r\n"])
@pytest.mark.parametrize("fmt", ["json", "form"])
def test_empty_body_is_the_payload_none(fmt: str, body: bytes) -> None:
    assert decode_body(fmt, body) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"a": 1,}',
        b"{'a': 1}",
        b"not json",
        b'{"a": 1} trailing',
        b"NaN",
        b'{"x": Infinity}',
        b'{"x": -Infinity}',
        b"\xff\xfe\x00garbage",
        b'{"a": "\xff"}',
        b"[" * 100_000 + b"]" * 100_000,
        b"1" * 5000,
    ],
)
def test_malformed_json_is_a_clear_error(body: bytes) -> None:
    with pytest.raises(MalformedBody) as caught:
        decode_body("json", body)
    assert isinstance(caught.value, ValueError)
    assert "JSON" in str(caught.value)


# --- GitHub's form mode -----------------------------------------------------------------


def test_form_payload_field_decodes_to_its_json() -> None:
    body = urlencode({"payload": json.dumps(PUSH)}).encode()
    assert decode_body("form", body) == PUSH


def test_form_payload_with_plus_encoded_spaces_and_other_fields() -> None:
    body = b"other=1&payload=%7B%22msg%22%3A+%22hello+world%22%7D"
    assert decode_body("form", body) == {"msg": "hello world"}


def test_form_payload_with_non_ascii_text() -> None:
    body = urlencode({"payload": json.dumps({"author": "Zoë"}, ensure_ascii=False)}).encode()
    assert decode_body("form", body) == {"author": "Zoë"}


@pytest.mark.parametrize(
    "body",
    [
        b"ref=refs%2Fheads%2Fmain",  # no payload field
        b"payload=1&payload=2",  # two
        b'{"ref": "main"}',  # JSON sent as a form
    ],
)
def test_form_without_exactly_one_payload_field_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedBody, match="exactly one `payload` field"):
        decode_body("form", body)


def test_form_payload_that_is_not_json_is_malformed() -> None:
    with pytest.raises(MalformedBody, match="`payload` field is not valid JSON"):
        decode_body("form", b"payload=%7Bnot+json")


@pytest.mark.parametrize("body", [b"payload=%FF%FE", b"payload=\xff"])
def test_form_that_is_not_utf8_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedBody, match="form body is malformed"):
        decode_body("form", body)


def test_form_with_thousands_of_fields_is_malformed() -> None:
    body = b"&".join(b"f%d=1" % i for i in range(5000)) + b"&payload=%7B%7D"
    with pytest.raises(MalformedBody, match="form body is malformed"):
        decode_body("form", body)


# --- GitHub ping ------------------------------------------------------------------------


def test_github_ping_is_detected() -> None:
    assert is_github_ping("github", {"X-GitHub-Event": "ping"})
    assert is_github_ping("github", {"x-github-event": "ping"})


def test_other_events_and_schemes_are_not_a_ping() -> None:
    assert not is_github_ping("github", {"X-GitHub-Event": "push"})
    assert not is_github_ping("github", {})
    assert not is_github_ping("gitlab", {"X-Gitlab-Event": "ping", "X-GitHub-Event": "ping"})
    assert not is_github_ping("token", {"X-GitHub-Event": "ping"})
