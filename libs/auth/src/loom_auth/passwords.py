"""Password hashing with argon2id (argon2-cffi) and the password policy.

The parameters live in a small frozen `PasswordParams` whose defaults are argon2-cffi's
own (RFC 9106's low-memory profile: 3 passes over 64 MiB, 4 lanes). Each hash records the
parameters it was made with, so `verify_password` reads any older hash, and
`needs_rehash` tells the login route to store a fresh hash once the parameters change.

A login for an unknown user should still cost one verification, or the response time
tells which usernames exist: `verify_dummy` spends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from loom_auth.errors import InvalidPasswordHash, PasswordPolicyError

__all__ = [
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "PasswordParams",
    "check_password_policy",
    "hash_password",
    "needs_rehash",
    "verify_dummy",
    "verify_password",
]

MIN_PASSWORD_LENGTH = 12
"""Characters. Length is the one rule that measurably helps (NIST SP 800-63B)."""
MAX_PASSWORD_LENGTH = 1024
"""Characters; a bound so a request body cannot make hashing arbitrarily expensive."""


@dataclass(frozen=True, slots=True)
class PasswordParams:
    """argon2id parameters. Changing one makes `needs_rehash` true for older hashes."""

    time_cost: int = 3
    """Passes over the memory."""
    memory_cost: int = 65536
    """KiB (64 MiB)."""
    parallelism: int = 4
    hash_len: int = 32
    salt_len: int = 16


DEFAULT_PARAMS = PasswordParams()


@cache
def _hasher(params: PasswordParams) -> PasswordHasher:
    return PasswordHasher(
        time_cost=params.time_cost,
        memory_cost=params.memory_cost,
        parallelism=params.parallelism,
        hash_len=params.hash_len,
        salt_len=params.salt_len,
        type=Type.ID,
    )


def check_password_policy(
    password: str,
    *,
    min_length: int = MIN_PASSWORD_LENGTH,
    max_length: int = MAX_PASSWORD_LENGTH,
) -> None:
    """Check a NEW password (not one given at login). Raises `PasswordPolicyError` with a
    message fit for the user when it is shorter than `min_length` or longer than
    `max_length` characters."""
    if len(password) < min_length:
        raise PasswordPolicyError(
            f"the password has {len(password)} characters; at least {min_length} are needed"
        )
    if len(password) > max_length:
        raise PasswordPolicyError(f"the password is longer than {max_length} characters")


def hash_password(password: str, params: PasswordParams = DEFAULT_PARAMS) -> str:
    """The argon2id hash of `password` (a PHC string: `$argon2id$v=19$m=...`).

    Checks no policy: call `check_password_policy` first for a password being set.
    Raises nothing for any `str`.
    """
    return _hasher(params).hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether `password` matches `password_hash`; `False` on a mismatch, never an error
    for a wrong password. The hash's own parameters are used, whatever they are.

    Raises `InvalidPasswordHash` when `password_hash` is not a readable argon2 hash:
    that is a corrupt row, which should be noticed rather than read as a wrong password.
    """
    try:
        # The verifying hasher's own parameters do not matter: the hash carries its own.
        return _hasher(DEFAULT_PARAMS).verify(password_hash, password)
    except VerifyMismatchError:
        return False
    except (InvalidHashError, VerificationError) as exc:
        # A mismatch is `VerifyMismatchError` (caught above); any other verification
        # error is argon2 failing to decode the hash, i.e. a corrupt row.
        raise InvalidPasswordHash("the stored password hash is not an argon2 hash") from exc


def needs_rehash(password_hash: str, params: PasswordParams = DEFAULT_PARAMS) -> bool:
    """Whether `password_hash` was made with parameters other than `params`, so that a
    successful login should store `hash_password(password, params)` instead.

    Raises `InvalidPasswordHash` when `password_hash` is not an argon2 hash.
    """
    try:
        return _hasher(params).check_needs_rehash(password_hash)
    except InvalidHashError as exc:
        raise InvalidPasswordHash("the stored password hash is not an argon2 hash") from exc


@cache
def _dummy_hash(params: PasswordParams) -> str:
    return hash_password("loom-dummy-password-for-timing", params)


def verify_dummy(password: str, params: PasswordParams = DEFAULT_PARAMS) -> bool:
    """Spend the time of one verification and return `False`: for a login whose username
    does not exist, so that it takes as long as one with a wrong password."""
    verify_password(_dummy_hash(params), password)
    return False
