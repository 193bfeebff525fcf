"""Access tokens, and the attacks DESIGN §11 names: each must end in `InvalidToken`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest

from loom_auth import (
    ACCESS_TOKEN_LIFETIME,
    InvalidToken,
    Role,
    decode_access_token,
    new_access_token,
    new_family_id,
    new_refresh_token,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0

# What an RS256 server would publish; HS/RS confusion signs with it as an HMAC secret.
PUBLIC_KEY_PEM = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo
4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u
-----END PUBLIC KEY-----
"""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, as an attacker would: HMAC-SHA256 with `key`, or no signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key else b""
    return f"{signing_input}.{b64(signature)}"


def claims(**changes: Any) -> dict[str, Any]:
    base = {
        "sub": "mallory",
        "role": "admin",
        "iat": int(NOW),
        "exp": int(NOW) + 900,
        "jti": "j1",
        "typ": "access",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def reason(token: str, key: bytes = KEY, now: float = NOW) -> str:
    with pytest.raises(InvalidToken) as caught:
        decode_access_token(token, key, now=now)
    return caught.value.reason


def test_round_trip_carries_every_claim() -> None:
    issued = new_access_token(KEY, "alice", "editor", session_id="fam-1", now=NOW)
    decoded = decode_access_token(issued.token, KEY, now=NOW + 1)
    assert decoded == issued.claims
    assert decoded.username == "alice"
    assert decoded.role is Role.EDITOR
    assert decoded.session_id == "fam-1"
    assert decoded.expires_at - decoded.issued_at == ACCESS_TOKEN_LIFETIME == 900
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "HS256"
    payload = jwt.decode(issued.token, options={"verify_signature": False})
    assert set(payload) == {"sub", "role", "iat", "exp", "jti", "typ", "sid"}
    assert payload["typ"] == "access"


def test_each_token_has_its_own_jti() -> None:
    first = new_access_token(KEY, "alice", Role.VIEWER, now=NOW)
    second = new_access_token(KEY, "alice", Role.VIEWER, now=NOW)
    assert first.claims.jti != second.claims.jti


def test_a_hand_forged_token_with_the_right_key_verifies() -> None:
    """The forging helper is right, so the attacks below fail for their own reason."""
    assert (
        decode_access_token(forge({"alg": "HS256"}, claims(), KEY), KEY, now=NOW).role is Role.ADMIN
    )


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_rejected(alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, claims(), None)
    assert "algorithm" in reason(token)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "HS384", "HS512"])
def test_a_token_claiming_another_algorithm_is_rejected(alg: str) -> None:
    """RS/HS confusion: the header says RS256 and the "signature" is an HMAC."""
    token = forge({"alg": alg, "typ": "JWT"}, claims(), KEY)
    assert "algorithm" in reason(token)


def test_hs256_signed_with_a_public_key_is_rejected() -> None:
    token = forge({"alg": "HS256", "typ": "JWT"}, claims(), PUBLIC_KEY_PEM)
    assert reason(token) == "signature does not verify"


def test_a_tampered_payload_is_rejected() -> None:
    token = new_access_token(KEY, "victor", "viewer", now=NOW).token
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    body["role"] = "admin"
    escalated = f"{header}.{b64(json.dumps(body).encode())}.{signature}"
    assert reason(escalated) == "signature does not verify"


def test_flipping_one_payload_byte_is_rejected() -> None:
    token = new_access_token(KEY, "victor", "viewer", now=NOW).token
    header, payload, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    raw[len(raw) // 2] ^= 0x01
    assert "signature" in reason(f"{header}.{b64(bytes(raw))}.{signature}")


def test_a_token_signed_with_another_key_is_rejected() -> None:
    token = new_access_token(OTHER_KEY, "alice", "admin", now=NOW).token
    assert reason(token) == "signature does not verify"


def test_expiry_is_exact_and_leeway_allows_skew() -> None:
    token = new_access_token(KEY, "alice", "viewer", now=NOW, lifetime=60).token
    decode_access_token(token, KEY, now=NOW + 59.9)
    assert "expired" in reason(token, now=NOW + 60)
    decode_access_token(token, KEY, now=NOW + 61, leeway=5)
    assert "expired" in reason(forge({"alg": "HS256"}, claims(exp=int(NOW) - 1), KEY))


def test_a_token_from_the_future_is_rejected() -> None:
    token = new_access_token(KEY, "alice", "viewer", now=NOW + 3600).token
    assert "future" in reason(token)


def test_a_refresh_token_is_not_an_access_token() -> None:
    refresh = new_refresh_token(new_family_id()).token
    assert "malformed" in reason(refresh)
    typed_refresh = forge({"alg": "HS256"}, claims(typ="refresh"), KEY)
    assert "not an access token" in reason(typed_refresh)


@pytest.mark.parametrize("missing", ["sub", "role", "iat", "exp", "jti", "typ"])
def test_every_claim_is_required(missing: str) -> None:
    token = forge({"alg": "HS256"}, claims(**{missing: None}), KEY)
    assert missing in reason(token)


@pytest.mark.parametrize(
    "change",
    [
        {"role": "root"},
        {"role": 2},
        {"sub": ""},
        {"sub": 7},
        {"exp": "2030-01-01"},
        {"iat": True},
        {"jti": ""},
        {"sid": 12},
    ],
)
def test_mistyped_claims_are_rejected(change: dict[str, Any]) -> None:
    reason(forge({"alg": "HS256"}, claims(**change), KEY))


@pytest.mark.parametrize("garbage", ["", "x", "a.b", "a.b.c", "....", "ü.ü.ü"])
def test_garbage_is_an_invalid_token(garbage: str) -> None:
    reason(garbage)


def test_every_failure_has_one_public_message() -> None:
    failures = [
        forge({"alg": "none"}, claims(), None),
        new_access_token(OTHER_KEY, "a", "viewer", now=NOW).token,
        new_access_token(KEY, "a", "viewer", now=NOW - 3600).token,
    ]
    for token in failures:
        with pytest.raises(InvalidToken) as caught:
            decode_access_token(token, KEY, now=NOW)
        assert caught.value.public_detail == "the token is invalid or expired"
        assert caught.value.reason not in caught.value.public_detail


def test_weak_keys_and_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        new_access_token(b"short", "alice", "viewer")
    with pytest.raises(ValueError, match="at least 32"):
        decode_access_token("x.y.z", b"short")
    with pytest.raises(ValueError):
        new_access_token(KEY, "", "viewer")
    with pytest.raises(ValueError):
        new_access_token(KEY, "alice", "viewer", lifetime=0)
