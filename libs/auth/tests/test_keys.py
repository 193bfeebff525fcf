from __future__ import annotations

import pytest
from pydantic import SecretStr

from loom_auth import require_signing_key, signing_key_from_secret
from loom_common import LoomSettings, SettingsError

SECRET = "k" * 40
OLDER = "o" * 40


def test_signing_key_is_32_deterministic_bytes() -> None:
    key = signing_key_from_secret(SECRET)
    assert isinstance(key, bytes) and len(key) == 32
    assert key == signing_key_from_secret(SECRET)
    assert key != signing_key_from_secret("j" * 40)
    assert key != SECRET.encode()[:32]


def test_only_the_newest_key_signs() -> None:
    assert signing_key_from_secret(f"{SECRET},{OLDER}") == signing_key_from_secret(SECRET)
    assert signing_key_from_secret(f" {SECRET} , {OLDER} ,") == signing_key_from_secret(SECRET)
    assert signing_key_from_secret(f"{OLDER},{SECRET}") != signing_key_from_secret(SECRET)


@pytest.mark.parametrize("value", ["", " , ", "short", f"{SECRET},short"])
def test_unusable_secret_keys_are_settings_errors(value: str) -> None:
    with pytest.raises(SettingsError, match="LOOM_SECRET_KEY"):
        signing_key_from_secret(value)


def test_a_missing_secret_key_stops_the_service_with_a_clear_message() -> None:
    settings = LoomSettings(secret_key=None)
    with pytest.raises(SettingsError) as caught:
        require_signing_key(settings, "loom-rest")
    message = str(caught.value)
    assert "LOOM_SECRET_KEY is not set" in message
    assert "loom-rest cannot start" in message
    assert "token_urlsafe" in message


def test_require_signing_key_derives_from_the_settings() -> None:
    settings = LoomSettings(secret_key=SecretStr(SECRET))
    assert require_signing_key(settings) == signing_key_from_secret(SECRET)
