"""Authenticating deliveries: published vectors first, then every scheme's failure modes."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone

import pytest

import loom_webhook
from loom_webhook import (
    AUTH_SCHEMES,
    MAX_DELIVERY_ID_LENGTH,
    AuthScheme,
    SignatureRejected,
    delivery_id,
    event_name,
    github_signature,
    header,
    standard_signature,
    verify,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
BODY = b'{"ref":"refs/heads/main"}'
SECRET = "s3cret-value"

# GitHub's documented example ("Validating webhook deliveries").
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_PAYLOAD = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"

# The Standard Webhooks specification's example vector (its reference libraries' tests).
STD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
STD_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
STD_TIMESTAMP = 1614265330
STD_PAYLOAD = b'{"test": 2432232314}'
STD_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
STD_NOW = datetime.fromtimestamp(STD_TIMESTAMP, UTC)


def std_headers(
    signature: str = STD_SIGNATURE, *, msg_id: str = STD_ID, timestamp: int | str = STD_TIMESTAMP
) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def rejected(
    scheme: AuthScheme,
    secret: str | None,
    headers: Mapping[str, str],
    body: bytes = BODY,
    now: datetime = NOW,
) -> str:
    """The log reason of a rejection (failing the test when the delivery passes)."""
    with pytest.raises(SignatureRejected) as caught:
        verify(scheme, secret, headers, body, now)
    assert caught.value.reason == str(caught.value)
    return caught.value.reason


# --- published vectors ------------------------------------------------------------------


def test_github_documented_example_signs_and_verifies() -> None:
    assert github_signature(GITHUB_SECRET, GITHUB_PAYLOAD) == GITHUB_SIGNATURE
    verify("github", GITHUB_SECRET, {"X-Hub-Signature-256": GITHUB_SIGNATURE}, GITHUB_PAYLOAD, NOW)


def test_standard_webhooks_spec_vector_signs_and_verifies() -> None:
    assert standard_signature(STD_SECRET, STD_ID, STD_TIMESTAMP, STD_PAYLOAD) == STD_SIGNATURE
    verify("standard", STD_SECRET, std_headers(), STD_PAYLOAD, STD_NOW)


def test_standard_whsec_secret_is_the_base64_decoded_key() -> None:
    """The spec's key is the decoded bytes after `whsec_`, not the secret's text."""
    key = base64.b64decode(STD_SECRET.removeprefix("whsec_"))
    content = f"{STD_ID}.{STD_TIMESTAMP}.".encode() + STD_PAYLOAD
    digest = hmac.new(key, content, hashlib.sha256).digest()
    assert STD_SIGNATURE == "v1," + base64.b64encode(digest).decode()


# --- github -----------------------------------------------------------------------------


def test_github_valid_signature_passes_whatever_the_header_case() -> None:
    sig = github_signature(SECRET, BODY)
    for name in ("X-Hub-Signature-256", "x-hub-signature-256", "X-HUB-SIGNATURE-256"):
        verify("github", SECRET, {name: sig}, BODY, NOW)


def test_github_uppercase_hex_passes() -> None:
    sig = github_signature(SECRET, BODY)
    verify("github", SECRET, {"X-Hub-Signature-256": "sha256=" + sig[7:].upper()}, BODY, NOW)


def test_github_wrong_secret_is_rejected() -> None:
    sig = github_signature("another-secret", BODY)
    assert "does not match" in rejected("github", SECRET, {"X-Hub-Signature-256": sig})


def test_github_tampered_body_is_rejected() -> None:
    sig = github_signature(SECRET, BODY)
    rejected("github", SECRET, {"X-Hub-Signature-256": sig}, body=BODY + b" ")


def test_github_missing_signature_is_rejected() -> None:
    assert "missing" in rejected("github", SECRET, {"X-GitHub-Event": "push"})
    assert "missing" in rejected("github", SECRET, {"X-Hub-Signature-256": "  "})


@pytest.mark.parametrize(
    "value",
    [
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",  # no prefix
        "sha1=" + hashlib.sha1(b"x").hexdigest(),
        "sha256=",
        "sha256=zz",
        "sha256=é",
    ],
)
def test_github_malformed_signature_is_rejected(value: str) -> None:
    rejected("github", GITHUB_SECRET, {"X-Hub-Signature-256": value}, body=GITHUB_PAYLOAD)


def test_github_legacy_sha1_header_alone_is_not_enough() -> None:
    legacy = "sha1=" + hmac.new(SECRET.encode(), BODY, hashlib.sha1).hexdigest()
    rejected("github", SECRET, {"X-Hub-Signature": legacy})


# --- gitlab -----------------------------------------------------------------------------


def test_gitlab_token_equal_to_the_secret_passes_whatever_the_header_case() -> None:
    for name in ("X-Gitlab-Token", "x-gitlab-token", "X-GITLAB-TOKEN"):
        verify("gitlab", SECRET, {name: SECRET}, BODY, NOW)


@pytest.mark.parametrize("token", ["wrong", SECRET + "x", SECRET[:-1], SECRET.upper(), "ünï"])
def test_gitlab_other_token_is_rejected(token: str) -> None:
    assert "does not match" in rejected("gitlab", SECRET, {"X-Gitlab-Token": token})


def test_gitlab_missing_token_is_rejected() -> None:
    assert "missing" in rejected("gitlab", SECRET, {"X-Gitlab-Event": "Push Hook"})


# --- token ------------------------------------------------------------------------------


def test_token_exact_bearer_secret_passes() -> None:
    verify("token", SECRET, {"Authorization": f"Bearer {SECRET}"}, BODY, NOW)
    verify("token", SECRET, {"authorization": f"bearer {SECRET}"}, BODY, NOW)


@pytest.mark.parametrize(
    "value",
    [
        SECRET,  # no scheme
        f"Basic {SECRET}",
        f"Token {SECRET}",
        "Bearer wrong",
        f"Bearer {SECRET}x",
        f"Bearer {SECRET[:-1]}",
        "Bearer",
        "Bearer ",
    ],
)
def test_token_anything_but_the_exact_bearer_secret_is_rejected(value: str) -> None:
    rejected("token", SECRET, {"Authorization": value})


def test_token_missing_authorization_is_rejected() -> None:
    assert "missing" in rejected("token", SECRET, {})


# --- none -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer whatever"}, {"X-Hub-Signature-256": "sha256=00"}],
)
def test_none_accepts_anything(headers: dict[str, str]) -> None:
    verify("none", None, headers, b"\x00\xff anything", NOW)


# --- standard ---------------------------------------------------------------------------


def test_standard_headers_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in std_headers().items()}
    verify("standard", STD_SECRET, headers, STD_PAYLOAD, STD_NOW)
    headers = {k.title(): v for k, v in std_headers().items()}
    verify("standard", STD_SECRET, headers, STD_PAYLOAD, STD_NOW)


def test_standard_any_one_of_several_signatures_passes() -> None:
    """Secret rotation: the old key's signature, an asymmetric one, then the current one."""
    old = standard_signature(
        "whsec_" + "b2xkLWtleS1vbGQta2V5LW9sZA==", STD_ID, STD_TIMESTAMP, STD_PAYLOAD
    )
    v1a = "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg=="
    for signature in (
        f"{old} {v1a} {STD_SIGNATURE}",
        f"{STD_SIGNATURE} {old}",
        f"  {old}   {STD_SIGNATURE}  ",
    ):
        verify("standard", STD_SECRET, std_headers(signature), STD_PAYLOAD, STD_NOW)


def test_standard_several_signatures_none_matching_is_rejected() -> None:
    old = standard_signature("whsec_b2xkLWtleQ==", STD_ID, STD_TIMESTAMP, STD_PAYLOAD)
    reason = rejected("standard", STD_SECRET, std_headers(f"{old} {old}"), STD_PAYLOAD, STD_NOW)
    assert "no v1 entry" in reason


@pytest.mark.parametrize(
    "signature",
    [
        STD_SIGNATURE.removeprefix("v1,"),  # no version
        "v2," + STD_SIGNATURE.removeprefix("v1,"),  # another version is ignored
        "v1a," + STD_SIGNATURE.removeprefix("v1,"),
        "v1,",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",  # padding missing
        "v1,G0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",  # one letter changed
        "v1,ü",
    ],
)
def test_standard_wrong_or_malformed_signature_is_rejected(signature: str) -> None:
    rejected("standard", STD_SECRET, std_headers(signature), STD_PAYLOAD, STD_NOW)


def test_standard_tampered_body_is_rejected() -> None:
    rejected("standard", STD_SECRET, std_headers(), b'{"test": 2432232315}', STD_NOW)


def test_standard_tampered_id_or_timestamp_is_rejected() -> None:
    """The id and timestamp are signed: another delivery's id, or a refreshed timestamp
    on a captured signature, fails."""
    rejected("standard", STD_SECRET, std_headers(msg_id="msg_other"), STD_PAYLOAD, STD_NOW)
    headers = std_headers(timestamp=STD_TIMESTAMP + 1)
    rejected("standard", STD_SECRET, headers, STD_PAYLOAD, STD_NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_missing_header_is_rejected(missing: str) -> None:
    headers = std_headers()
    del headers[missing]
    assert missing in rejected("standard", STD_SECRET, headers, STD_PAYLOAD, STD_NOW)


@pytest.mark.parametrize(
    "offset", [timedelta(minutes=5, seconds=1), timedelta(hours=1), timedelta(days=365 * 5)]
)
def test_standard_replayed_old_delivery_is_rejected(offset: timedelta) -> None:
    reason = rejected("standard", STD_SECRET, std_headers(), STD_PAYLOAD, STD_NOW + offset)
    assert "old" in reason


@pytest.mark.parametrize("offset", [timedelta(minutes=5, seconds=1), timedelta(hours=1)])
def test_standard_delivery_from_the_future_is_rejected(offset: timedelta) -> None:
    reason = rejected("standard", STD_SECRET, std_headers(), STD_PAYLOAD, STD_NOW - offset)
    assert "future" in reason


@pytest.mark.parametrize(
    "offset", [timedelta(minutes=-5), timedelta(minutes=-4), timedelta(0), timedelta(minutes=5)]
)
def test_standard_timestamp_within_five_minutes_passes(offset: timedelta) -> None:
    verify("standard", STD_SECRET, std_headers(), STD_PAYLOAD, STD_NOW + offset)


def test_standard_tolerance_can_be_narrowed() -> None:
    with pytest.raises(SignatureRejected):
        verify(
            "standard",
            STD_SECRET,
            std_headers(),
            STD_PAYLOAD,
            STD_NOW + timedelta(seconds=31),
            tolerance=timedelta(seconds=30),
        )


@pytest.mark.parametrize(
    "timestamp", ["", "abc", "-1614265330", "1614265330.5", "١٦١٤٢٦٥٣٣٠", "9" * 5000]
)
def test_standard_malformed_timestamp_is_rejected(timestamp: str) -> None:
    headers = std_headers(timestamp=timestamp)
    rejected("standard", STD_SECRET, headers, STD_PAYLOAD, STD_NOW)


def test_standard_now_in_another_timezone_is_the_same_instant() -> None:
    elsewhere = STD_NOW.astimezone(timezone(timedelta(hours=-7)))
    verify("standard", STD_SECRET, std_headers(), STD_PAYLOAD, elsewhere)


def test_standard_plain_secret_is_used_as_its_bytes() -> None:
    """A secret without `whsec_` is the HMAC key as written."""
    content = f"{STD_ID}.{STD_TIMESTAMP}.".encode() + STD_PAYLOAD
    digest = hmac.new(SECRET.encode(), content, hashlib.sha256).digest()
    signature = "v1," + base64.b64encode(digest).decode()
    verify("standard", SECRET, std_headers(signature), STD_PAYLOAD, STD_NOW)


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_", "whsec_abc"])
def test_standard_unusable_whsec_secret_fails_closed(secret: str) -> None:
    assert "whsec_" in rejected("standard", secret, std_headers(), STD_PAYLOAD, STD_NOW)


# --- every scheme -----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(AUTH_SCHEMES - {"none"}))
@pytest.mark.parametrize("secret", [None, ""])
def test_a_scheme_with_a_secret_fails_closed_without_one(
    scheme: AuthScheme, secret: str | None
) -> None:
    headers = {
        "X-Hub-Signature-256": github_signature("", BODY),
        "X-Gitlab-Token": "",
        "Authorization": "Bearer ",
    }
    assert "secret" in rejected(scheme, secret, headers)


@pytest.mark.parametrize("scheme", sorted(AUTH_SCHEMES - {"none"}))
def test_no_headers_at_all_is_rejected(scheme: AuthScheme) -> None:
    rejected(scheme, SECRET, {}, now=STD_NOW)


def test_unknown_scheme_fails_closed() -> None:
    rejected("hmac", SECRET, {}, BODY)  # type: ignore[arg-type]


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify("none", None, {}, BODY, datetime(2026, 3, 1, 12, 0))


def test_rejection_reason_never_contains_the_secret() -> None:
    for scheme, headers in [
        ("github", {"X-Hub-Signature-256": "sha256=00"}),
        ("gitlab", {"X-Gitlab-Token": "nope"}),
        ("token", {"Authorization": "Bearer nope"}),
        ("standard", std_headers("v1,AAAA")),
    ]:
        reason = rejected(scheme, STD_SECRET, headers, STD_PAYLOAD, STD_NOW)  # type: ignore[arg-type]
        assert STD_SECRET not in reason and STD_SECRET[6:] not in reason
    assert SignatureRejected.public_detail == "the delivery's signature could not be verified"


# --- header lookup, delivery ids, event names -------------------------------------------


def test_header_lookup_ignores_case_and_blank_values() -> None:
    headers = {"X-GitHub-Delivery": " abc ", "Empty": "  "}
    assert header(headers, "x-github-delivery") == "abc"
    assert header(headers, "X-GITHUB-DELIVERY") == "abc"
    assert header(headers, "empty") is None
    assert header(headers, "absent") is None


def test_delivery_id_per_scheme() -> None:
    assert delivery_id("github", {"x-github-delivery": "72d3162e-cc78"}) == "72d3162e-cc78"
    assert delivery_id("gitlab", {"X-Gitlab-Event-UUID": "u-1", "Idempotency-Key": "k"}) == "u-1"
    assert delivery_id("gitlab", {"idempotency-key": "k-2"}) == "k-2"
    assert delivery_id("standard", {"Webhook-Id": STD_ID}) == STD_ID
    assert delivery_id("token", {"Idempotency-Key": "k-3"}) == "k-3"
    assert delivery_id("none", {"IDEMPOTENCY-KEY": "k-4"}) == "k-4"


def test_delivery_id_absent_is_none() -> None:
    """Each scheme reads only its own header: a GitHub hook ignores Idempotency-Key."""
    assert delivery_id("github", {"Idempotency-Key": "k"}) is None
    assert delivery_id("standard", {"Idempotency-Key": "k"}) is None
    for scheme in AUTH_SCHEMES:
        assert delivery_id(scheme, {}) is None  # type: ignore[arg-type]


def test_overlong_delivery_id_is_hashed_to_a_bounded_stable_id() -> None:
    long_id = "x" * (MAX_DELIVERY_ID_LENGTH + 1)
    hashed = delivery_id("token", {"Idempotency-Key": long_id})
    assert hashed == "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()
    assert hashed == delivery_id("token", {"Idempotency-Key": long_id})
    assert hashed != delivery_id("token", {"Idempotency-Key": long_id + "y"})
    exact = "x" * MAX_DELIVERY_ID_LENGTH
    assert delivery_id("token", {"Idempotency-Key": exact}) == exact


def test_event_name_per_scheme() -> None:
    assert event_name("github", {"x-github-event": "push"}) == "push"
    assert event_name("gitlab", {"X-GITLAB-EVENT": "Push Hook"}) == "Push Hook"
    assert event_name("github", {"X-Gitlab-Event": "Push Hook"}) is None
    assert event_name("standard", {"X-GitHub-Event": "push"}) is None
    assert event_name("token", {"X-GitHub-Event": "push"}) is None


def test_public_api_is_pinned() -> None:
    """A name leaving `__all__` breaks the service shell that imports it: change it on purpose."""
    for name in loom_webhook.__all__:
        assert hasattr(loom_webhook, name), name
    assert {
        "SignatureRejected",
        "UnsupportedMediaType",
        "MalformedBody",
        "verify",
        "delivery_id",
        "event_name",
        "body_format",
        "decode_body",
        "is_github_ping",
    } <= set(loom_webhook.__all__)
