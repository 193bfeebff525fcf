"""loom_auth derives the token signing key itself (it may not import loom_db, DESIGN §2);
the two derivations must give the same bytes, or tokens signed by one service would not
verify in another."""

from __future__ import annotations

import pytest

from loom_auth import signing_key_from_secret
from loom_common import SettingsError
from loom_db.keys import derive_keys, generate_secret_key

NEW = "n" * 32
OLD = "o" * 48


@pytest.mark.parametrize(
    "secret",
    [
        NEW,
        generate_secret_key(),
        f"{NEW},{OLD}",
        f" {OLD} ,, {NEW} ,",
        "ü" * 32,
    ],
    ids=["one key", "a generated key", "new and old", "spaces and empty entries", "non-ASCII"],
)
def test_loom_auth_and_loom_db_derive_the_same_signing_key(secret: str) -> None:
    assert signing_key_from_secret(secret) == derive_keys(secret).signing_key


@pytest.mark.parametrize("secret", ["", " , ", "x" * 31, f"{NEW},short"])
def test_both_refuse_the_same_unusable_keys(secret: str) -> None:
    with pytest.raises(ValueError):
        derive_keys(secret)
    with pytest.raises(SettingsError):
        signing_key_from_secret(secret)
