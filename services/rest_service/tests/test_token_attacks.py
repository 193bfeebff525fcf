"""Forged, tampered, expired and revoked credentials (DESIGN §11), on both databases:
each answers the same 401 problem details with `WWW-Authenticate`, says nothing about
why, and reaches no route, not even a viewer's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from loom_auth import new_access_token
from loom_rest import Runtime

PUBLIC_KEY_PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n"
    "4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u\n"
    "-----END PUBLIC KEY-----\n"
)
ANOTHER_KEY = b"another-signing-key-that-is-long-enough-32+"
VIEWER_ROUTES = [("GET", "/api/v1/me"), ("GET", "/api/v1/tokens"), ("POST", "/api/v1/auth/logout")]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(role: str = "admin", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "sub": "admin",
        "role": role,
        "iat": now,
        "exp": now + 600,
        "jti": "forged",
        "typ": "access",
    }
    return {**claims, **changes}


def _jwt(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A JWT made by hand, so that nothing refuses to make what an attacker would send.
    `key` None leaves the signature empty."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{_b64(signature)}"


def _alg_none(runtime: Runtime) -> str:
    return _jwt({"alg": "none", "typ": "JWT"}, _claims(), None)


def _alg_none_with_a_signature(runtime: Runtime) -> str:
    return _jwt({"alg": "none", "typ": "JWT"}, _claims(), runtime.signing_key)


def _another_key(runtime: Runtime) -> str:
    return _jwt({"alg": "HS256", "typ": "JWT"}, _claims(), ANOTHER_KEY)


def _rs256_header(runtime: Runtime) -> str:
    """The right key, but a header that claims RS256: the algorithm is pinned."""
    return _jwt({"alg": "RS256", "typ": "JWT"}, _claims(), runtime.signing_key)


def _hs256_with_a_public_key(runtime: Runtime) -> str:
    """The classic confusion: HMAC keyed with a public key an attacker can read."""
    return _jwt({"alg": "HS256", "typ": "JWT"}, _claims(), PUBLIC_KEY_PEM.encode())


def _tampered_role(runtime: Runtime) -> str:
    """A real viewer token whose payload says admin, with the original signature."""
    real = new_access_token(runtime.signing_key, "viewer", "viewer").token
    header, _, signature = real.split(".")
    payload = json.loads(base64.urlsafe_b64decode(real.split(".")[1] + "=="))
    payload["role"] = "admin"
    return f"{header}.{_b64(json.dumps(payload).encode())}.{signature}"


def _expired(runtime: Runtime) -> str:
    issued = time.time() - 3600
    return new_access_token(runtime.signing_key, "admin", "admin", lifetime=60, now=issued).token


def _a_refresh_claim(runtime: Runtime) -> str:
    """Signed with the right key, but not an access token."""
    return _jwt({"alg": "HS256", "typ": "JWT"}, _claims(typ="refresh"), runtime.signing_key)


def _malformed_api_token(runtime: Runtime) -> str:
    return "loom_not-a-real-token"


def _api_token_with_bad_characters(runtime: Runtime) -> str:
    return "loom_" + "!" * 43


def _unknown_api_token(runtime: Runtime) -> str:
    return "loom_" + "A" * 43


def _garbage(runtime: Runtime) -> str:
    return "eyJhbGciOi.garbage.token"


ATTACKS: dict[str, Callable[[Runtime], str]] = {
    "alg none": _alg_none,
    "alg none with a signature": _alg_none_with_a_signature,
    "HS256 with another key": _another_key,
    "RS256 header": _rs256_header,
    "HS256 keyed with a public key": _hs256_with_a_public_key,
    "tampered role": _tampered_role,
    "expired": _expired,
    "refresh typ": _a_refresh_claim,
    "malformed loom_ token": _malformed_api_token,
    "loom_ token with bad characters": _api_token_with_bad_characters,
    "unknown loom_ token": _unknown_api_token,
    "garbage": _garbage,
}


async def _refused(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    """Every viewer route answers 401 to `token`; the problem bodies."""
    bodies = []
    for method, path in VIEWER_ROUTES:
        answer = await client.request(method, path, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="loom", error="invalid_token"'
        bodies.append(answer.json())
    return bodies


@pytest.fixture
async def expected(clients: Any) -> dict[str, Any]:
    """The one answer every refused token gets: that of a token that is plain junk."""
    answer = await clients.anonymous.get("/api/v1/me", headers={"Authorization": "Bearer junk"})
    assert answer.status_code == 401
    body: dict[str, Any] = answer.json()
    assert set(body) == {"type", "title", "status", "detail"}
    return body


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_a_forged_or_spoiled_token_gets_the_same_401_and_reaches_nothing(
    clients: Any, runtime: Runtime, expected: dict[str, Any], attack: str
) -> None:
    token = ATTACKS[attack](runtime)
    assert all(body == expected for body in await _refused(clients.anonymous, token))
    admin_only = await clients.anonymous.get(
        "/api/v1/users", headers={"Authorization": f"Bearer {token}"}
    )
    assert admin_only.status_code == 401


async def test_a_revoked_api_token_gets_the_same_401(
    clients: Any, expected: dict[str, Any]
) -> None:
    created = (await clients.admin.post("/api/v1/tokens", json={"name": "gone"})).json()
    assert (await clients.admin.delete(f"/api/v1/tokens/{created['id']}")).status_code == 204
    assert all(body == expected for body in await _refused(clients.anonymous, created["token"]))


async def test_the_genuine_tokens_the_attacks_copy_do_work(clients: Any, runtime: Runtime) -> None:
    """The attacks above fail for being forged, not for a broken setup."""
    checks: list[Callable[[], Awaitable[httpx.Response]]] = [
        lambda: clients.anonymous.get(
            "/api/v1/me",
            headers={
                "Authorization": "Bearer "
                + new_access_token(runtime.signing_key, "viewer", "viewer").token
            },
        ),
        lambda: clients.anonymous.get(
            "/api/v1/me",
            headers={
                "Authorization": "Bearer "
                + _jwt({"alg": "HS256", "typ": "JWT"}, _claims(), runtime.signing_key)
            },
        ),
    ]
    for check in checks:
        answer = await check()
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "Token abc"])
async def test_a_malformed_authorization_header_gets_the_same_401(
    clients: Any, expected: dict[str, Any], header: str
) -> None:
    answer = await clients.anonymous.get("/api/v1/me", headers={"Authorization": header})
    assert answer.status_code == 401
    assert answer.json() == expected
    assert "WWW-Authenticate" in answer.headers
