"""Keys from LOOM_SECRET_KEY: separate purposes, rotation, and clear refusals."""

from __future__ import annotations

from base64 import urlsafe_b64encode

import pytest
from cryptography.fernet import Fernet, InvalidToken

from loom_db.keys import derive_keys, generate_secret_key, parse_secret_keys

KEY_A = "a" * 40
KEY_B = "b" * 40


def test_the_signing_key_and_the_secrets_key_are_different_32_byte_keys() -> None:
    keys = derive_keys(KEY_A)
    assert len(keys.signing_key) == 32
    token = keys.secrets.encrypt(b"payload")
    # The signing key cannot open what the secrets key sealed: they are separate keys.
    with pytest.raises(InvalidToken):
        Fernet(urlsafe_b64encode(keys.signing_key)).decrypt(token)
    assert keys.secrets.decrypt(token) == b"payload"


def test_derivation_is_deterministic_and_key_specific() -> None:
    assert derive_keys(KEY_A).signing_key == derive_keys(KEY_A).signing_key
    assert derive_keys(KEY_A).signing_key != derive_keys(KEY_B).signing_key
    sealed = derive_keys(KEY_A).secrets.encrypt(b"x")
    assert derive_keys(KEY_A).secrets.decrypt(sealed) == b"x"
    with pytest.raises(InvalidToken):
        derive_keys(KEY_B).secrets.decrypt(sealed)


def test_several_keys_newest_first_encrypt_with_the_first_and_decrypt_with_any() -> None:
    old = derive_keys(KEY_A).secrets.encrypt(b"old")
    both = derive_keys(f"{KEY_B}, {KEY_A}")
    assert both.secrets.decrypt(old) == b"old"
    new = both.secrets.encrypt(b"new")
    assert derive_keys(KEY_B).secrets.decrypt(new) == b"new"
    with pytest.raises(InvalidToken):
        derive_keys(KEY_A).secrets.decrypt(new)
    # Tokens are signed with the newest key alone.
    assert both.signing_key == derive_keys(KEY_B).signing_key
    assert derive_keys([KEY_B, KEY_A]).signing_key == both.signing_key


def test_parse_secret_keys_splits_on_commas_and_ignores_blanks() -> None:
    assert parse_secret_keys(f" {KEY_B} ,{KEY_A},, ") == [KEY_B, KEY_A]


@pytest.mark.parametrize("value", ["", " , ", "short", f"{KEY_A},tooshort"])
def test_missing_or_short_keys_are_refused_with_a_clear_message(value: str) -> None:
    with pytest.raises(ValueError, match="LOOM_SECRET_KEY") as info:
        derive_keys(value)
    assert "tooshort" not in str(info.value)  # the message never echoes a key


def test_an_empty_list_of_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="no secret key"):
        derive_keys([])


def test_generated_keys_are_long_enough_and_random() -> None:
    first, second = generate_secret_key(), generate_secret_key()
    assert first != second
    assert len(first) >= 32 and "," not in first
    derive_keys(first)


def test_the_repr_of_keys_shows_no_key_material() -> None:
    keys = derive_keys(KEY_A)
    assert keys.signing_key.hex() not in repr(keys)
    assert "signing_key" not in repr(keys)
