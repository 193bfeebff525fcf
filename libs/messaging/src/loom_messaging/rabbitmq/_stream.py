"""The event stream and the control broadcasts: each subscriber its own exclusive queue,
read by a `_Subscription` that acks in batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractIncomingMessage

from loom_messaging.abc import Control, EventStream
from loom_messaging.envelope import Envelope, decode
from loom_messaging.errors import InvalidMessage
from loom_messaging.rabbitmq._common import _is_stale, _log, _translated

if TYPE_CHECKING:
    from loom_messaging.rabbitmq._broker import RabbitBroker

_SUBSCRIBER_ACK_EVERY = 100


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
