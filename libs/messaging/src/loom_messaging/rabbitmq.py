"""`amqp://` — the three roles on RabbitMQ, with aio-pika.

Topology (every name carries the prefix `p`)::

    p.executions       durable quorum queue, the work queue; x-delivery-limit, dead-letter
                       exchange p.dlx with the at-least-once strategy
    p.dlx              durable fanout exchange -> p.executions.dead
    p.executions.dead  durable classic queue: the dead letters, oldest first
    p.events           durable topic exchange, routing key = the event key; each subscriber
                       an exclusive auto-delete queue bound with '#'
    p.control          durable fanout exchange; each subscriber an exclusive auto-delete queue

Delivery limit: a quorum queue dead-letters a message once it has been *returned* more
than `x-delivery-limit` times, so the limit is `max_deliveries - 1` and a message is
delivered `max_deliveries` times. RabbitMQ marks such a message with `x-death`
(reason `delivery_limit`); `dead_letters()` reports it as "delivered N times without an
ack". The queue's arguments must match on every declaration, so N is this broker's
`max_deliveries`. Bodies that do not decode, and `Delivery.dead_letter(reason)`, are
published by the consumer to p.dlx with an `x-loom-reason` header (confirmed), then acked.
Checked on RabbitMQ 3.10. From 4.3 on, RabbitMQ counts only `basic.reject` toward the
delivery limit, not a consumer that dies holding a message: revisit this there.

Connection: one robust connection per broker. It reconnects every `reconnect_interval`
and restores the channels with their prefetch, declarations, bindings and consumers, so
a `consume` or `subscribe` block resumes by itself after a broker restart. While it is
disconnected, operations fail at once with `BrokerUnavailable` instead of waiting for the
reconnect: the outbox relay retries on its own, and a worker publishing news must not
stall. A peer that vanishes without closing its TCP connection is noticed by AMQP
heartbeats (aiormq asks for 60 s; `?heartbeat=N` in the URL changes it). Driver
errors become `BrokerUnavailable` in one place, `_translated`.

Order: one publisher channel (with confirms) carries every publish, and each subscriber
has one queue and one channel, so the events of one key arrive in the order published.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pamqp.exceptions
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.common import FieldTable

from loom_messaging.abc import Broker, Control, DeadLetter, Delivery, EventStream, WorkQueue
from loom_messaging.envelope import Envelope, decode
from loom_messaging.errors import BrokerUnavailable, InvalidMessage, MessagingError

__all__ = ["SUBSCRIBER_BUFFER", "RabbitBroker", "delete_prefix"]

_log = logging.getLogger("loom.messaging.rabbitmq")

SUBSCRIBER_BUFFER = 10_000
"""Events or control messages a subscriber's queue holds before RabbitMQ drops the oldest."""

_SUBSCRIBER_PREFETCH = 1_000
_SUBSCRIBER_ACK_EVERY = 100
_KEY = "x-loom-key"
_REASON = "x-loom-reason"
_PERSISTENT = 2
_TRANSIENT = 1


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


def _as_text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _text(headers: FieldTable | None, name: str) -> str | None:
    return _as_text((headers or {}).get(name))


def _key(message: AbstractIncomingMessage) -> str:
    return _text(message.headers, _KEY) or ""


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """The quorum queue's `x-delivery-count` counts earlier deliveries that were not
    acked; absent (or 0) on the first one."""
    returned = message.headers.get("x-delivery-count")
    return returned + 1 if isinstance(returned, int) else 1


def _is_stale(message: AbstractIncomingMessage) -> bool:
    """True when the channel that carried `message` is gone (the connection was lost):
    RabbitMQ has put it back, and its delivery tag means nothing on the new channel."""
    try:
        message.channel  # noqa: B018 - the property raises for a closed channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return True
    return False


class _RabbitDelivery(Delivery):
    def __init__(
        self, stream: _Deliveries, message: AbstractIncomingMessage, envelope: Envelope
    ) -> None:
        self.envelope = envelope
        self.key = _key(message)
        self.delivery_count = _delivery_count(message)
        self._stream = stream
        self._message = message
        self._settled = False

    async def ack(self) -> None:
        """Acking twice, or after leaving the `consume` block (RabbitMQ has put the message
        back), does nothing. Raises `BrokerUnavailable` when the connection was lost since
        the delivery: RabbitMQ delivers the message again."""
        if self._settled or self._stream.stopped:
            return
        self._settled = True
        with _translated("ack a delivery"):
            await self._message.ack()

    async def dead_letter(self, reason: str) -> None:
        """Raises `BrokerUnavailable` when the dead letter could not be stored; the message
        then stays unacked and is delivered again."""
        if self._settled or self._stream.stopped:
            return
        await self._stream.broker._dead_letter(self._message, reason)
        self._settled = True


class _Deliveries:
    """The iterator of one `consume` block, fed by the consumer callback of its channel."""

    def __init__(self, broker: RabbitBroker) -> None:
        self.broker = broker
        self.stopped = False
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()

    async def receive(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    def stop(self) -> None:
        self.stopped = True
        self._buffer.put_nowait(None)

    def __aiter__(self) -> _Deliveries:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            if self.stopped:
                raise StopAsyncIteration
            message = await self._buffer.get()
            if message is None or self.stopped:
                raise StopAsyncIteration
            if _is_stale(message):
                continue
            try:
                envelope = decode(message.body)
            except InvalidMessage as exc:
                await self.broker._refuse(message, str(exc))
                continue
            return _RabbitDelivery(self, message, envelope)


class _Subscription:
    """The iterator of one event or control subscription. Acks go in batches (the
    subscriber's queue is its own, so an ack only frees prefetch room)."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._unacked = 0
        self._stopped = False

    async def receive(self, message: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(message)

    def stop(self) -> None:
        self._stopped = True
        self._buffer.put_nowait(None)

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Envelope:
        while True:
            message = None if self._stopped else await self._buffer.get()
            if message is None or self._stopped:
                raise StopAsyncIteration
            await self._settle(message)
            try:
                return decode(message.body)
            except InvalidMessage as exc:
                _log.warning(
                    "skipped an undecodable %s message with key %r: %s",
                    self.channel,
                    message.routing_key,
                    exc,
                )

    async def _settle(self, message: AbstractIncomingMessage) -> None:
        self._unacked += 1
        if self._unacked < _SUBSCRIBER_ACK_EVERY and not self._buffer.empty():
            return
        self._unacked = 0
        if _is_stale(message):
            return  # its queue went with the old connection: nothing to ack
        with _translated(f"ack {self.channel} messages"):
            await message.ack(multiple=True)


class _Queue(WorkQueue):
    def __init__(self, broker: RabbitBroker) -> None:
        self._broker = broker

    async def publish(self, body: bytes, key: str) -> None:
        """Returns once RabbitMQ has confirmed the message (persistent, in a quorum queue).
        Raises `BrokerUnavailable` (it may then have been stored anyway: retrying can
        duplicate, which at-least-once allows)."""
        broker = self._broker
        await broker._publish([(body, key)], "", broker.names.work, work=True)

    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None:
        """Publishes all, then waits for all the confirms; raises `BrokerUnavailable` when
        any is not confirmed (some may have been stored)."""
        broker = self._broker
        await broker._publish(items, "", broker.names.work, work=True)

    def consume(
        self, *, prefetch: int = 10
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """Raises `BrokerUnavailable` on entry when RabbitMQ cannot be reached; once in,
        the block outlives broker restarts (deliveries pause and resume)."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        return self._consume(prefetch)

    @asynccontextmanager
    async def _consume(self, prefetch: int) -> AsyncIterator[AsyncIterator[Delivery]]:
        broker = self._broker
        deliveries = _Deliveries(broker)
        channel = await broker._open_channel()
        broker._streams.add(deliveries)
        try:
            with _translated("start consuming"):
                async with asyncio.timeout(broker.timeout):
                    await channel.set_qos(prefetch_count=prefetch)
                    queue = await broker._declare_work_queue(channel)
                    await queue.consume(deliveries.receive)
            yield deliveries
        finally:
            deliveries.stop()
            broker._streams.discard(deliveries)
            # Closing the channel is what puts its unacked deliveries back.
            await broker._close_channel(channel)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest `limit` dead letters. They are read with basic.get and put back by
        closing the channel, so a concurrent `dead_letters` in another process may
        briefly see fewer (within this broker a lock orders them)."""
        broker = self._broker
        letters: list[DeadLetter] = []
        async with broker._dead_lock:
            with _translated("read the dead letters"):
                async with asyncio.timeout(broker.timeout):
                    channel = await broker._raw_channel()
                    try:
                        while len(letters) < limit:
                            got = await broker._next_dead_letter(channel)
                            if got is None:
                                break
                            letters.append(broker._letter(got[0]))
                    finally:
                        await channel.close()
        return letters

    async def replay(self, dead_letter_id: str) -> None:
        """Publishes the dead letter to the work queue as a new message (first delivery)
        and then removes it from the dead letters. Raises `LookupError` for an unknown id,
        `BrokerUnavailable` when RabbitMQ cannot be reached."""
        broker = self._broker
        async with broker._dead_lock:
            with _translated("replay a dead letter"):
                async with asyncio.timeout(broker.timeout):
                    channel = await broker._raw_channel()
                    try:
                        while True:
                            got = await broker._next_dead_letter(channel)
                            if got is None:
                                raise LookupError(f"no dead letter {dead_letter_id!r}")
                            message, tag = got
                            if message.header.properties.message_id != dead_letter_id:
                                continue
                            key = _text(message.header.properties.headers, _KEY) or ""
                            await broker._publish(
                                [(message.body, key)], "", broker.names.work, work=True
                            )
                            await channel.basic_ack(tag)
                            _log.info("replayed dead letter %s with key %r", dead_letter_id, key)
                            return
                    finally:
                        await channel.close()


class _Events(EventStream):
    def __init__(self, broker: RabbitBroker) -> None:
        self._broker = broker

    async def publish(self, body: bytes, key: str) -> None:
        await self._broker._publish([(body, key)], self._broker.names.events, None)

    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None:
        await self._broker._publish(items, self._broker.names.events, None)

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        return self._broker._subscribe(self._broker.names.events, "event")


class _Control(Control):
    def __init__(self, broker: RabbitBroker) -> None:
        self._broker = broker

    async def broadcast(self, body: bytes, key: str = "") -> None:
        await self._broker._publish([(body, key)], self._broker.names.control, None)

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        return self._broker._subscribe(self._broker.names.control, "control")


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
