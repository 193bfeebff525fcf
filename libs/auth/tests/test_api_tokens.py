from __future__ import annotations

import hashlib
import re

import pytest

from loom_auth import hash_token, is_api_token, new_api_token, token_hash_matches


def test_api_token_is_loom_prefix_and_32_random_bytes() -> None:
    token, prefix, token_hash = new_api_token()
    assert re.fullmatch(r"loom_[A-Za-z0-9_-]{43}", token)
    assert prefix == token[:12] and len(prefix) <= 16
    assert token_hash == hashlib.sha256(token.encode()).hexdigest() == hash_token(token)
    assert is_api_token(token)


def test_api_tokens_are_unique() -> None:
    tokens = {new_api_token().token for _ in range(200)}
    assert len(tokens) == 200


@pytest.mark.parametrize(
    "value",
    [
        "",
        "loom_",
        "loom_short",
        "loom_" + "a" * 42,
        "loom_" + "a" * 44,
        "loom_" + "a" * 42 + ".",
        "LOOM_" + "a" * 43,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig",
        "3f2c1a9e-0000-4000-8000-000000000000." + "a" * 43,
    ],
)
def test_is_api_token_rejects_anything_else(value: str) -> None:
    assert not is_api_token(value)


def test_token_hash_matches_compares_with_the_stored_hash() -> None:
    issued = new_api_token()
    assert token_hash_matches(issued.token, issued.token_hash)
    assert token_hash_matches(issued.token, issued.token_hash.upper())
    assert not token_hash_matches(new_api_token().token, issued.token_hash)
    assert not token_hash_matches(issued.token, "")
