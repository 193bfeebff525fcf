from __future__ import annotations

import loom_auth


def test_public_names_are_pinned_and_importable() -> None:
    """A name leaving `__all__` breaks the services that import it: change it on purpose."""
    assert loom_auth.__all__ == sorted(loom_auth.__all__, key=lambda n: (not n.isupper(), n))
    for name in loom_auth.__all__:
        assert hasattr(loom_auth, name), name
    assert {
        "BearerAuthBackend",
        "LoginLimiter",
        "Principal",
        "decode_access_token",
        "hash_password",
        "new_access_token",
        "new_api_token",
        "new_refresh_token",
        "parse_refresh_token",
        "requires_role",
        "rotate",
        "signing_key_from_secret",
        "verify_password",
    } <= set(loom_auth.__all__)
