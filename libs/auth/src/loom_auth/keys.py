"""The token signing key, derived from `LOOM_SECRET_KEY` (DESIGN §11).

The derivation is the SAME as `loom_db.keys` (which loom_auth may not import, DESIGN §2):
HKDF-SHA256, no salt, info ``b"loom token signing v1"``, 32 bytes, from the FIRST
(newest) of the comma-separated master keys. The root test `tests/test_keys_agree.py`
checks that both give the same bytes; a change violates this decision when it changes
one derivation without the other.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from loom_common.errors import SettingsError
from loom_common.settings import LoomSettings

__all__ = [
    "MIN_SECRET_KEY_LENGTH",
    "missing_secret_key_message",
    "require_signing_key",
    "signing_key_from_secret",
]

MIN_SECRET_KEY_LENGTH = 32
"""Characters per master key, as loom_db.keys requires."""

_SIGNING_INFO = b"loom token signing v1"


def missing_secret_key_message(service: str = "this service") -> str:
    """What to tell an operator whose service has no `LOOM_SECRET_KEY`."""
    return (
        f"LOOM_SECRET_KEY is not set: {service} cannot start without it (it signs login "
        "tokens and encrypts secrets). Set it to a random string of at least "
        f"{MIN_SECRET_KEY_LENGTH} characters, the same for every service, e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`. "
        "(`loom up` generates one into its data directory.)"
    )


def signing_key_from_secret(secret: str) -> bytes:
    """The 32-byte HS256 key of a `LOOM_SECRET_KEY` value (comma-separated master keys,
    newest first; blanks ignored; only the newest signs).

    Raises `SettingsError` when there is no key or one is shorter than
    `MIN_SECRET_KEY_LENGTH` characters.
    """
    keys = [part.strip() for part in secret.split(",") if part.strip()]
    if not keys:
        raise SettingsError("LOOM_SECRET_KEY is empty")
    for position, key in enumerate(keys, start=1):
        if len(key) < MIN_SECRET_KEY_LENGTH:
            where = f"key {position} of {len(keys)}" if len(keys) > 1 else "the key"
            raise SettingsError(
                f"LOOM_SECRET_KEY: {where} has {len(key)} characters; at least "
                f"{MIN_SECRET_KEY_LENGTH} are needed"
            )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SIGNING_INFO).derive(
        keys[0].encode("utf-8")
    )


def require_signing_key(settings: LoomSettings, service: str = "this service") -> bytes:
    """The signing key of `settings`, for a service's start-up.

    Raises `SettingsError` with `missing_secret_key_message` when `settings.secret_key`
    is unset, or as `signing_key_from_secret` does when it is unusable.
    """
    if settings.secret_key is None:
        raise SettingsError(missing_secret_key_message(service))
    return signing_key_from_secret(settings.secret_key.get_secret_value())
