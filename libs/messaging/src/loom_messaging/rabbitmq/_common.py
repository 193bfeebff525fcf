"""What every part of the RabbitMQ backend shares: the one place driver errors are
translated, the key header, and reading headers and stale deliveries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import aiormq
import pamqp.exceptions
from aio_pika.abc import AbstractIncomingMessage
from pamqp.common import FieldTable

from loom_messaging.errors import BrokerUnavailable, MessagingError

_log = logging.getLogger("loom.messaging.rabbitmq")

_KEY = "x-loom-key"
_REASON = "x-loom-reason"


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """The one place where aio-pika / aiormq errors become ours."""
    try:
        yield
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        # Inequivalent queue arguments and the like: a configuration error, not an outage.
        raise MessagingError(f"RabbitMQ refused to {what}: {exc}") from exc
    except aiormq.exceptions.PublishError as exc:
        raise BrokerUnavailable(f"RabbitMQ could not route a message ({what}): {exc}") from exc
    except aiormq.exceptions.ChannelInvalidStateError as exc:
        raise BrokerUnavailable(
            f"RabbitMQ: cannot {what}: its channel is closed (the connection was lost, "
            "or the broker closed the channel)"
        ) from exc
    except (aiormq.exceptions.AMQPError, pamqp.exceptions.PAMQPException, OSError) as exc:
        # OSError covers refused connections and TimeoutError (our `asyncio.timeout`s).
        raise BrokerUnavailable(f"RabbitMQ: cannot {what}: {exc!r}") from exc


def _as_text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _text(headers: FieldTable | None, name: str) -> str | None:
    return _as_text((headers or {}).get(name))


def _key(message: AbstractIncomingMessage) -> str:
    return _text(message.headers, _KEY) or ""


def _is_stale(message: AbstractIncomingMessage) -> bool:
    """True when the channel that carried `message` is gone (the connection was lost):
    RabbitMQ has put it back, and its delivery tag means nothing on the new channel."""
    try:
        message.channel  # noqa: B018 - the property raises for a closed channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return True
    return False
