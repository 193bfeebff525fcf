"""`RabbitBroker`: the connection and its channels, the topology, publishing with
confirms, storing and reading dead letters, subscriptions; and `delete_prefix`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.common import FieldTable

from loom_messaging.abc import Broker, DeadLetter
from loom_messaging.envelope import Envelope
from loom_messaging.errors import BrokerUnavailable
from loom_messaging.rabbitmq._common import (
    _KEY,
    _REASON,
    _as_text,
    _is_stale,
    _key,
    _log,
    _text,
    _translated,
)
from loom_messaging.rabbitmq._queue import _Queue
from loom_messaging.rabbitmq._stream import _Control, _Events, _Subscription

if TYPE_CHECKING:
    from loom_messaging.rabbitmq._queue import _Deliveries

SUBSCRIBER_BUFFER = 10_000
"""Events or control messages a subscriber's queue holds before RabbitMQ drops the oldest."""

_SUBSCRIBER_PREFETCH = 1_000
_PERSISTENT = 2
_TRANSIENT = 1


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True, slots=True)
class _Names:
    work: str
    dead: str
    dlx: str
    events: str
    control: str

    @classmethod
    def of(cls, prefix: str) -> _Names:
        return cls(
            work=f"{prefix}.executions",
            dead=f"{prefix}.executions.dead",
            dlx=f"{prefix}.dlx",
            events=f"{prefix}.events",
            control=f"{prefix}.control",
        )


class RabbitBroker(Broker):
    """The broker at `url` (`amqp://user:password@host:port/vhost`), under `prefix`.

    * `max_deliveries`: deliveries without an ack before a message is dead-lettered.
    * `reconnect_interval`: seconds between reconnection attempts.
    * `timeout`: seconds an operation (connect, publish and its confirm, a declaration)
      may take before it fails with `BrokerUnavailable`.
    * `subscriber_buffer`: messages an event or control subscriber may fall behind by
      before RabbitMQ drops the oldest (`x-max-length`).

    Every operation raises `BrokerUnavailable` when the broker is not started, closed, or
    not connected at the moment.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        max_deliveries: int = 5,
        reconnect_interval: float = 0.5,
        timeout: float = 10.0,
        subscriber_buffer: int = SUBSCRIBER_BUFFER,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, not {max_deliveries}")
        if subscriber_buffer < 1:
            raise ValueError(f"subscriber_buffer must be at least 1, not {subscriber_buffer}")
        self.url = url
        self.prefix = prefix
        self.names = _Names.of(prefix)
        self.max_deliveries = max_deliveries
        self.reconnect_interval = reconnect_interval
        self.timeout = timeout
        self.subscriber_buffer = subscriber_buffer
        self.queue = _Queue(self)
        self.events = _Events(self)
        self.control = _Control(self)
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._streams: set[_Deliveries | _Subscription] = set()
        self._dead_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<RabbitBroker {_redacted(self.url)} prefix={self.prefix!r}>"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Connects and declares the topology; raises `BrokerUnavailable`."""
        if self._connection is not None:
            return
        with _translated(f"connect to {_redacted(self.url)}"):
            connection = await aio_pika.connect_robust(
                self.url,
                reconnect_interval=self.reconnect_interval,
                timeout=self.timeout,
                client_properties={"connection_name": f"loom {self.prefix}"},
            )
        try:
            with _translated("declare the topology"):
                async with asyncio.timeout(self.timeout):
                    publisher = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    await self._declare_topology(publisher)
        except BaseException:
            await connection.close()
            raise
        self._connection, self._publisher = connection, publisher

    async def _declare_topology(self, channel: AbstractRobustChannel) -> None:
        """On the publisher channel, which declares it all again after a reconnect."""
        names = self.names
        await channel.declare_exchange(names.events, aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.declare_exchange(names.control, aio_pika.ExchangeType.FANOUT, durable=True)
        dlx = await channel.declare_exchange(names.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
        dead = await channel.declare_queue(names.dead, durable=True)
        await dead.bind(dlx, routing_key="")
        await self._declare_work_queue(channel)

    async def _declare_work_queue(self, channel: AbstractRobustChannel) -> AbstractRobustQueue:
        return await channel.declare_queue(
            self.names.work,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": self.max_deliveries - 1,
                "x-dead-letter-exchange": self.names.dlx,
                # Dead-lettering keeps the message until p.dlx's queue has confirmed it;
                # RabbitMQ requires reject-publish overflow for that (there is no length limit).
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )

    async def close(self) -> None:
        """Ends the open `consume` and `subscribe` blocks (unacked deliveries go back) and
        closes the connection. Idempotent."""
        connection, self._connection, self._publisher = self._connection, None, None
        for stream in list(self._streams):
            stream.stop()
        self._streams.clear()
        if connection is not None:
            with _translated("close the connection"):
                await connection.close()

    async def ping(self) -> None:
        """Opens and closes a channel and checks that the work queue exists (three round
        trips); raises `BrokerUnavailable` at once while disconnected."""
        with _translated("ping"):
            async with asyncio.timeout(self.timeout):
                channel = await self._raw_channel()
                try:
                    await channel.queue_declare(self.names.work, passive=True)
                finally:
                    await channel.close()

    # -- connections and channels ------------------------------------------------------

    def _connected(self) -> AbstractRobustConnection:
        connection = self._connection
        if connection is None:
            raise BrokerUnavailable(f"{self!r} is not started (or closed)")
        if not connection.connected.is_set():
            raise BrokerUnavailable(f"{self!r} lost its connection; reconnecting")
        return connection

    async def _open_channel(self) -> AbstractRobustChannel:
        """A robust channel: restored with its consumers after a reconnect."""
        connection = self._connected()
        with _translated("open a channel"):
            async with asyncio.timeout(self.timeout):
                return await connection.channel(publisher_confirms=False)

    async def _close_channel(self, channel: AbstractRobustChannel) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await channel.close()
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            OSError,
        ) as exc:
            # The connection is gone, and RabbitMQ dropped the channel (and put back its
            # unacked messages) with it.
            _log.debug("closing a channel failed: %r", exc)

    async def _raw_channel(self) -> aiormq.abc.AbstractChannel:
        """A plain aiormq channel for one short operation: not restored after a
        reconnect, and a channel error on it disturbs no other."""
        transport = self._connected().transport
        if transport is None:
            raise BrokerUnavailable(f"{self!r} lost its connection; reconnecting")
        return await transport.connection.channel(publisher_confirms=False)

    # -- publishing --------------------------------------------------------------------

    async def _publish(
        self,
        items: Sequence[tuple[bytes, str]],
        exchange: str,
        routing_key: str | None,
        *,
        work: bool = False,
        headers: FieldTable | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish `items` on the publisher channel and wait for every confirm. Work
        messages go to one queue (`routing_key`, mandatory, persistent) with their key in
        a header; events and control messages are routed by their key."""
        if not items:
            return
        if self._publisher is None:
            raise BrokerUnavailable(f"{self!r} is not started (or closed)")
        self._connected()
        with _translated(f"publish to {exchange or routing_key}"):
            async with asyncio.timeout(self.timeout):
                channel = await self._publisher.get_underlay_channel()
                sends = [
                    channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=key if routing_key is None else routing_key,
                        mandatory=work,
                        properties=Basic.Properties(
                            delivery_mode=_PERSISTENT if work else _TRANSIENT,
                            message_id=message_id or (uuid.uuid4().hex if work else None),
                            headers={_KEY: key, **(headers or {})} if work else None,
                            timestamp=datetime.now(UTC) if work else None,
                        ),
                    )
                    for body, key in items
                ]
                if len(sends) == 1:
                    outcomes: list[object] = [await sends[0]]
                else:
                    # The channel's lock sends them in this order; then all the confirms
                    # are awaited together.
                    outcomes = await asyncio.gather(*sends, return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, asyncio.CancelledError):
                    # aiormq cancels pending confirms when the channel closes.
                    raise aiormq.exceptions.ChannelInvalidStateError("the channel closed")
                if isinstance(outcome, BaseException):
                    raise outcome

    # -- dead letters ------------------------------------------------------------------

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Store `message` in the dead letters with `reason` (confirmed), then ack it."""
        if _is_stale(message):
            # It is being delivered again; storing it now would make a duplicate.
            raise BrokerUnavailable("cannot dead-letter a delivery whose connection was lost")
        key = _key(message)
        await self._publish(
            [(message.body, key)],
            self.names.dlx,
            self.names.work,
            work=True,
            headers={_REASON: reason},
            message_id=message.message_id,
        )
        with _translated("ack a dead-lettered delivery"):
            await message.ack()
        _log.warning("dead-lettered a message with key %r: %s", key, reason)

    async def _refuse(self, message: AbstractIncomingMessage, reason: str) -> None:
        """An undecodable delivery: dead-letter it; if that fails, put it back — RabbitMQ's
        delivery limit dead-letters it in the end."""
        try:
            await self._dead_letter(message, reason)
        except BrokerUnavailable as exc:
            _log.warning("could not dead-letter an undecodable message (%s): %s", reason, exc)
            if not _is_stale(message):
                with _translated("put back an undecodable delivery"):
                    await message.nack(requeue=True)

    async def _next_dead_letter(
        self, channel: aiormq.abc.AbstractChannel
    ) -> tuple[DeliveredMessage, int] | None:
        """The next dead letter with its delivery tag (unacked: closing `channel` puts it
        back), or None when there are no more."""
        got = await channel.basic_get(self.names.dead, no_ack=False)
        if not isinstance(got.delivery, Basic.GetOk) or got.delivery.delivery_tag is None:
            return None
        return got, got.delivery.delivery_tag

    def _letter(self, got: DeliveredMessage) -> DeadLetter:
        properties = got.header.properties
        headers = properties.headers or {}
        reason = _text(headers, _REASON)
        at = properties.timestamp
        deaths = headers.get("x-death")
        if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
            death = deaths[0]  # the latest
            if reason is None:
                why = _as_text(death.get("reason"))
                reason = (
                    f"delivered {self.max_deliveries} times without an ack"
                    if why == "delivery_limit"
                    else f"dead-lettered by RabbitMQ ({why})"
                )
            died = death.get("time")
            if isinstance(died, datetime):
                at = died
        return DeadLetter(
            id=properties.message_id or "",
            body=got.body,
            key=_text(headers, _KEY) or "",
            reason=reason or "unknown",
            at=at or datetime.now(UTC),
        )

    # -- subscriptions -----------------------------------------------------------------

    @asynccontextmanager
    async def _subscribe(self, exchange: str, kind: str) -> AsyncIterator[AsyncIterator[Envelope]]:
        subscription = _Subscription(kind)
        channel = await self._open_channel()
        self._streams.add(subscription)
        try:
            with _translated(f"subscribe to {exchange}"):
                async with asyncio.timeout(self.timeout):
                    await channel.set_qos(prefetch_count=_SUBSCRIBER_PREFETCH)
                    queue = await channel.declare_queue(
                        f"{exchange}.{uuid.uuid4().hex[:12]}",
                        exclusive=True,
                        auto_delete=True,
                        arguments={"x-max-length": self.subscriber_buffer},
                    )
                    await queue.bind(exchange, routing_key="#")
                    await queue.consume(subscription.receive)
            yield subscription
        finally:
            subscription.stop()
            self._streams.discard(subscription)
            await self._close_channel(channel)


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete the queues and exchanges of `prefix`, with their messages: for test runs and
    benchmarks that use a throw-away prefix on a shared broker (subscribers' queues go by
    themselves). Missing ones are fine. Raises `BrokerUnavailable`."""
    names = _Names.of(prefix)
    with _translated(f"delete the objects of {prefix!r}"):
        connection = await aio_pika.connect(url, timeout=10)
        async with connection:
            channel = await connection.channel()
            for queue in (names.work, names.dead):
                await channel.queue_delete(queue)
            for exchange in (names.dlx, names.events, names.control):
                await channel.exchange_delete(exchange)
