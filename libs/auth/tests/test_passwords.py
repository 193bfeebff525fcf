from __future__ import annotations

import pytest

from loom_auth import (
    InvalidPasswordHash,
    PasswordParams,
    PasswordPolicyError,
    check_password_policy,
    hash_password,
    needs_rehash,
    verify_dummy,
    verify_password,
)

# Cheap parameters keep the suite fast; one test uses the real defaults.
FAST = PasswordParams(time_cost=1, memory_cost=1024, parallelism=1)


def test_hash_is_argon2id_and_verifies_only_the_right_password() -> None:
    stored = hash_password("correct horse battery", FAST)
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "correct horse battery")
    assert not verify_password(stored, "correct horse batterY")
    assert not verify_password(stored, "")


def test_default_parameters_hash_and_verify() -> None:
    stored = hash_password("a long enough password")
    assert "m=65536,t=3,p=4" in stored
    assert verify_password(stored, "a long enough password")
    assert not needs_rehash(stored)


def test_same_password_hashes_differently_each_time() -> None:
    assert hash_password("same password!", FAST) != hash_password("same password!", FAST)


def test_changed_parameters_ask_for_a_rehash_and_old_hashes_still_verify() -> None:
    old = hash_password("rotate my hash please", FAST)
    stronger = PasswordParams(time_cost=2, memory_cost=2048, parallelism=1)
    assert needs_rehash(old, stronger)
    assert not needs_rehash(old, FAST)
    assert verify_password(old, "rotate my hash please")
    new = hash_password("rotate my hash please", stronger)
    assert not needs_rehash(new, stronger)


@pytest.mark.parametrize("corrupt", ["", "plaintext", "$argon2id$v=19$m=65536,t=3,p=4$abc"])
def test_a_corrupt_stored_hash_is_an_error_not_a_wrong_password(corrupt: str) -> None:
    with pytest.raises(InvalidPasswordHash):
        verify_password(corrupt, "whatever password")
    with pytest.raises(InvalidPasswordHash):
        needs_rehash("not a hash")


def test_dummy_verification_never_succeeds() -> None:
    assert verify_dummy("loom-dummy-password-for-timing", FAST) is False
    assert verify_dummy("anything at all", FAST) is False


def test_policy_rejects_short_and_huge_passwords_with_a_clear_message() -> None:
    check_password_policy("x" * 12)
    with pytest.raises(PasswordPolicyError, match="11 characters; at least 12"):
        check_password_policy("x" * 11)
    with pytest.raises(PasswordPolicyError, match="longer than 1024"):
        check_password_policy("x" * 1025)
    with pytest.raises(PasswordPolicyError, match="at least 20"):
        check_password_policy("x" * 12, min_length=20)
