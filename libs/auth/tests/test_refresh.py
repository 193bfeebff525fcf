from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from loom_auth import (
    REFRESH_TOKEN_LIFETIME,
    InvalidToken,
    Outcome,
    RefreshFamilyState,
    hash_token,
    is_api_token,
    new_family_id,
    new_refresh_token,
    parse_refresh_token,
    rotate,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_refresh_token_names_its_family_and_is_stored_only_as_a_hash() -> None:
    family_id = new_family_id()
    issued = new_refresh_token(family_id)
    assert issued.token.startswith(family_id + ".")
    assert issued.jti == hash_token(issued.token)
    assert issued.token not in issued.jti
    assert parse_refresh_token(issued.token) == (family_id, issued.jti)
    assert not is_api_token(issued.token)


def test_tokens_of_one_family_differ() -> None:
    family_id = new_family_id()
    assert new_refresh_token(family_id).token != new_refresh_token(family_id).token


@pytest.mark.parametrize(
    "token",
    [
        "",
        "no-dot-at-all",
        ".secretonly" + "a" * 33,
        "fam." + "a" * 42,
        "fam." + "a" * 44,
        "fam." + "a" * 42 + "!",
        "fam/../x." + "a" * 43,
        "fam.x." + "a" * 41,
        "a" * 37 + "." + "a" * 43,
    ],
)
def test_malformed_refresh_tokens_are_invalid_before_any_lookup(token: str) -> None:
    with pytest.raises(InvalidToken, match="malformed refresh token"):
        parse_refresh_token(token)


def test_new_refresh_token_rejects_a_family_id_that_could_not_be_parsed_back() -> None:
    with pytest.raises(ValueError):
        new_refresh_token("has.dot")
    with pytest.raises(ValueError):
        new_refresh_token("")


def _state(current_jti: str, **changes: object) -> RefreshFamilyState:
    state = RefreshFamilyState(
        family_id="f", current_jti=current_jti, expires_at=NOW + REFRESH_TOKEN_LIFETIME
    )
    return replace(state, **changes)  # type: ignore[arg-type]


def test_rotate_outcomes() -> None:
    current, spent = "a" * 64, "b" * 64
    assert rotate(_state(current), current, now=NOW) is Outcome.ROTATE
    assert rotate(_state(current), spent, now=NOW) is Outcome.REVOKE_FAMILY
    assert rotate(_state(current, revoked=True), current, now=NOW) is Outcome.REJECT
    assert rotate(_state(current, revoked=True), spent, now=NOW) is Outcome.REJECT
    expired = _state(current, expires_at=NOW)
    assert rotate(expired, current, now=NOW) is Outcome.REJECT
    assert rotate(expired, current, now=NOW - timedelta(seconds=1)) is Outcome.ROTATE


def test_reuse_of_a_spent_refresh_token_revokes_the_family_for_everyone() -> None:
    """Login, two refreshes by the client; a thief replays the first token: the family is
    revoked, so the client's current token stops working too."""
    family_id = new_family_id()
    first = new_refresh_token(family_id)
    state = RefreshFamilyState(family_id, first.jti, NOW + REFRESH_TOKEN_LIFETIME)

    presented = first
    for _ in range(2):
        _, jti = parse_refresh_token(presented.token)
        assert rotate(state, jti, now=NOW) is Outcome.ROTATE
        presented = new_refresh_token(family_id)
        state = replace(state, current_jti=presented.jti)
    clients_current = presented

    _, stolen_jti = parse_refresh_token(first.token)
    assert rotate(state, stolen_jti, now=NOW) is Outcome.REVOKE_FAMILY
    state = replace(state, revoked=True)

    _, jti = parse_refresh_token(clients_current.token)
    assert rotate(state, jti, now=NOW) is Outcome.REJECT
