"""The keys derived from `LOOM_SECRET_KEY` (DESIGN §3, §11).

One master key, several purposes: HKDF-SHA256 derives a separate key for each, with its
own `info` label, so the key that encrypts secrets never signs a token and knowing one
derived key tells nothing about the other.

* `Keys.secrets` — a `MultiFernet` for the secrets table. `LOOM_SECRET_KEY` may hold
  several master keys separated by commas, NEWEST FIRST: the first one encrypts, every
  one still decrypts, so a key can rotate (add the new key in front, run
  `rotate_secrets`, then drop the old key).
* `Keys.signing_key` — 32 bytes for HS256 tokens (loom_auth), from the newest key only:
  tokens are short-lived, so rotating it only logs people out.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.fernet import Fernet, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "MIN_SECRET_KEY_LENGTH",
    "Keys",
    "derive_keys",
    "generate_secret_key",
    "parse_secret_keys",
]

MIN_SECRET_KEY_LENGTH = 32
"""Characters; `generate_secret_key()` makes 64."""

_SECRETS_INFO = b"loom secrets v1"
_SIGNING_INFO = b"loom token signing v1"


@dataclass(frozen=True, slots=True)
class Keys:
    """The purpose-bound keys of one `LOOM_SECRET_KEY`. The repr shows no key material."""

    secrets: MultiFernet = field(repr=False)
    """Encrypts with the newest key, decrypts with any."""
    signing_key: bytes = field(repr=False)
    """32 bytes for HS256, derived from the newest key only."""


def parse_secret_keys(text: str) -> list[str]:
    """The keys of a `LOOM_SECRET_KEY` value: comma-separated, newest first, blanks
    ignored. Raises `ValueError` if there is none or one is too short."""
    keys = [part.strip() for part in text.split(",") if part.strip()]
    if not keys:
        raise ValueError("LOOM_SECRET_KEY is empty")
    _check_lengths(keys)
    return keys


def derive_keys(secret_key: str | Sequence[str]) -> Keys:
    """Derive the purpose keys from the master key(s).

    A `str` is read as a `LOOM_SECRET_KEY` value (`parse_secret_keys`); a sequence is the
    keys themselves, newest first. Raises `ValueError` for no key or a key shorter than
    `MIN_SECRET_KEY_LENGTH` characters.
    """
    if isinstance(secret_key, str):
        keys = parse_secret_keys(secret_key)
    else:
        keys = list(secret_key)
        if not keys:
            raise ValueError("no secret key given")
        _check_lengths(keys)
    fernets = [Fernet(base64.urlsafe_b64encode(_hkdf(key, _SECRETS_INFO))) for key in keys]
    return Keys(
        secrets=MultiFernet(fernets),
        signing_key=_hkdf(keys[0], _SIGNING_INFO),
    )


def generate_secret_key() -> str:
    """A new random master key (64 URL-safe characters), for `loom up`'s first start."""
    return secrets.token_urlsafe(48)


def _hkdf(key: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        key.encode("utf-8")
    )


def _check_lengths(keys: Sequence[str]) -> None:
    for position, key in enumerate(keys, start=1):
        if len(key) < MIN_SECRET_KEY_LENGTH:
            where = f"key {position} of {len(keys)}" if len(keys) > 1 else "the key"
            raise ValueError(
                f"LOOM_SECRET_KEY: {where} has {len(key)} characters; at least "
                f"{MIN_SECRET_KEY_LENGTH} are needed (generate one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
