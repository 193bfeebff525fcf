"""`open_broker(url, prefix)`: the backend a URL names."""

from __future__ import annotations

from urllib.parse import urlsplit

from loom_messaging.abc import Broker
from loom_messaging.errors import UnsupportedURL

__all__ = ["open_broker"]


def open_broker(url: str, *, prefix: str = "loom", max_deliveries: int = 5) -> Broker:
    """A (not yet started) `Broker` for `memory://`, `amqp://...` / `amqps://...` or
    `kafka://host:port[,host:port]`. Backends are imported only when used."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from loom_messaging.memory import MemoryBroker

        return MemoryBroker(url, prefix=prefix, max_deliveries=max_deliveries)
    if scheme in ("amqp", "amqps"):
        from loom_messaging.rabbitmq import RabbitBroker

        return RabbitBroker(url, prefix=prefix, max_deliveries=max_deliveries)
    if scheme == "kafka":
        from loom_messaging.kafka import KafkaBroker

        return KafkaBroker(url, prefix=prefix, max_deliveries=max_deliveries)
    raise UnsupportedURL(f"no broker for {scheme or url!r}: use memory://, amqp:// or kafka://")
