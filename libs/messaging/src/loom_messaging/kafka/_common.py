"""What every part of the Kafka backend shares: the URL parsing, the header names, the one
place aiokafka's errors are translated, and stopping a consumer whatever the broker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from aiokafka.errors import (  # type: ignore[import-untyped, unused-ignore]
    KafkaError,
    MessageSizeTooLargeError,
)

from loom_messaging.errors import BrokerUnavailable, InvalidMessage, UnsupportedURL

_log = logging.getLogger("loom.messaging.kafka")

DELIVERIES_HEADER = "x-loom-deliveries"
REASON_HEADER = "x-loom-reason"
REPLAYED_HEADER = "x-loom-replayed"

_POLL_MS = 500  # how long one fetch waits for records before checking for shutdown


def bootstrap_servers(url: str) -> list[str]:
    """The ``host:port`` list of a ``kafka://host:port[,host:port]`` URL (port 9092 when
    left out). Raises `UnsupportedURL` for another scheme or no host."""
    scheme, separator, rest = url.partition("://")
    hosts = rest.split("/", 1)[0].split("?", 1)[0]
    servers = [h if ":" in h.rsplit("]", 1)[-1] else f"{h}:9092" for h in hosts.split(",") if h]
    if scheme != "kafka" or not separator or not servers:
        raise UnsupportedURL(f"not a kafka://host:port[,host:port] URL: {url!r}")
    return servers


@contextlib.contextmanager
def _translated(doing: str) -> Iterator[None]:
    """aiokafka's errors, translated in this one place: a message over the size limit is
    `InvalidMessage`; any other Kafka, socket or timeout error is `BrokerUnavailable`."""
    try:
        yield
    except MessageSizeTooLargeError as exc:
        raise InvalidMessage(f"{doing}: the message is over the size limit ({exc})") from exc
    except (KafkaError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(f"{doing}: {exc}") from exc


def _key(record: Any) -> str:
    return record.key.decode("utf-8", "replace") if record.key else ""


async def _stop(consumer: Any) -> None:
    """`consumer.stop()`, whatever the broker does. aiokafka 0.14's `Fetcher.close`
    awaits the fetch tasks it has just cancelled, and one that was backing off after a
    connection error re-raises its CancelledError (aio-libs/aiokafka#647) — not a
    cancellation of ours. We absorb it, unless this task is being cancelled, and finish
    what `stop()` skipped: the other fetch tasks and the connections."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        fetcher = consumer._fetcher  # aiokafka 0.14 internals
        pending = list(fetcher._pending_tasks) if fetcher is not None else []
        for fetch in pending:
            fetch.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await consumer._client.close()
