"""Errors of loom_messaging.

::

    LoomError (loom_common)
     └── MessagingError
          ├── BrokerUnavailable      the broker cannot be reached now (readiness fails; retry)
          ├── InvalidMessage (ValueError)  undecodable, unknown type/version, over its byte cap
          └── UnsupportedURL (ValueError)  no backend for this URL

Driver errors (aio-pika / aiormq, aiokafka) are translated inside each backend module,
in one place each.
"""

from __future__ import annotations

from loom_common import LoomError

__all__ = ["BrokerUnavailable", "InvalidMessage", "MessagingError", "UnsupportedURL"]


class MessagingError(LoomError):
    """Base of loom_messaging's errors."""


class BrokerUnavailable(MessagingError):
    """The broker cannot be reached now."""


class InvalidMessage(MessagingError, ValueError):
    """A message that cannot be accepted: the reason is the message text."""


class UnsupportedURL(MessagingError, ValueError):
    """The URL names no backend (memory://, amqp://, amqps://, kafka://)."""
