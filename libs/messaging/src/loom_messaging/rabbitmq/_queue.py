"""The work queue: publishing to the quorum queue, `consume` blocks and their deliveries
(ack, dead letter, delivery count), listing and replaying dead letters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractIncomingMessage

from loom_messaging.abc import DeadLetter, Delivery, WorkQueue
from loom_messaging.envelope import Envelope, decode
from loom_messaging.errors import InvalidMessage
from loom_messaging.rabbitmq._common import _KEY, _is_stale, _key, _log, _text, _translated

if TYPE_CHECKING:
    from loom_messaging.rabbitmq._broker import RabbitBroker


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """The quorum queue's `x-delivery-count` counts earlier deliveries that were not
    acked; absent (or 0) on the first one."""
    returned = message.headers.get("x-delivery-count")
    return returned + 1 if isinstance(returned, int) else 1


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
