"""Errors of loom_auth.

::

    Exception
     └── LoomError (loom_common)
          ├── SettingsError (ValueError)   LOOM_SECRET_KEY missing or too short (loom_common's)
          └── AuthError
               ├── InvalidToken (ValueError)         a token failed; `.reason` is for logs
               ├── PasswordPolicyError (ValueError)  a new password is too short or too long
               ├── InvalidPasswordHash (ValueError)  a stored hash is unreadable (corrupt row)
               ├── UnknownRole (ValueError)          not admin, editor or viewer
               ├── NotAuthenticated                  no valid credentials on a guarded route → 401
               └── PermissionDenied (PermissionError) valid credentials, role too low → 403

Clients never see `InvalidToken.reason`: every token failure answers the same
`InvalidToken.public_detail`, so a caller learns nothing about why a forged token failed.
"""

from __future__ import annotations

from loom_common.errors import LoomError

__all__ = [
    "AuthError",
    "InvalidPasswordHash",
    "InvalidToken",
    "NotAuthenticated",
    "PasswordPolicyError",
    "PermissionDenied",
    "UnknownRole",
]


class AuthError(LoomError):
    """Base of the errors loom_auth raises on purpose."""


class InvalidToken(AuthError, ValueError):
    """A token is malformed, forged, expired, of the wrong kind or signed with another key.

    `reason` says which, for the server's logs; `public_detail` is all a client is told.
    """

    public_detail = "the token is invalid or expired"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class PasswordPolicyError(AuthError, ValueError):
    """A new password does not meet the policy; the message says how, and may be shown."""


class InvalidPasswordHash(AuthError, ValueError):
    """A stored password hash could not be read: the row is corrupt, not the password wrong."""


class UnknownRole(AuthError, ValueError):
    """A role name other than `admin`, `editor` or `viewer`."""


class NotAuthenticated(AuthError):
    """A guarded route was called without valid credentials (HTTP 401).

    `invalid_token` tells "credentials were presented but rejected" (RFC 6750's
    `error="invalid_token"`) from "none were presented".
    """

    def __init__(self, detail: str, *, invalid_token: bool = False) -> None:
        self.invalid_token = invalid_token
        super().__init__(detail)


class PermissionDenied(AuthError, PermissionError):
    """The caller is authenticated but their role is too low (HTTP 403)."""
