"""Errors of loom_webhook.

::

    Exception
     └── LoomError (loom_common)
          └── WebhookError
               ├── SignatureRejected                  bad or missing signature → 401; the
               │                                      message is for the logs only
               ├── UnsupportedMediaType (ValueError)  neither JSON nor form-encoded → 415
               └── MalformedBody (ValueError)         the body does not decode → 400

A 401 answer never carries `SignatureRejected`'s message: it says which check failed,
which would help a forger. `SignatureRejected.public_detail` is all a sender is told.
"""

from __future__ import annotations

from loom_common.errors import LoomError

__all__ = [
    "MalformedBody",
    "SignatureRejected",
    "UnsupportedMediaType",
    "WebhookError",
]


class WebhookError(LoomError):
    """Base of the errors loom_webhook raises on purpose."""


class SignatureRejected(WebhookError):
    """A delivery failed its hook's authentication: the signature, token or timestamp is
    missing, malformed, wrong or out of the replay window.

    `reason` (also the message) says which, for the server's logs; `public_detail` is all
    the sender is told.
    """

    public_detail = "the delivery's signature could not be verified"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnsupportedMediaType(WebhookError, ValueError):
    """The delivery's `Content-Type` is neither JSON nor `application/x-www-form-urlencoded`
    (HTTP 415); the message names the type, which the sender chose and may be shown."""


class MalformedBody(WebhookError, ValueError):
    """The body does not decode: invalid JSON, or a form without one `payload` field
    holding JSON. The message says why and may be shown to the sender."""
