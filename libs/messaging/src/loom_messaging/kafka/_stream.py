"""The event stream and the control broadcasts: each subscription a group-less consumer of
every partition, placed at the end, so every subscriber gets everything published after.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from aiokafka import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaConsumer,
    ConsumerStoppedError,
)

from loom_messaging.abc import Control, EventStream
from loom_messaging.envelope import Envelope, decode
from loom_messaging.errors import InvalidMessage
from loom_messaging.kafka._common import _POLL_MS, _key, _log, _stop, _translated

if TYPE_CHECKING:
    from loom_messaging.kafka._broker import KafkaBroker


FETCH_WAIT_MS = 50
"""The longest a subscriber's fetch waits at the broker for news."""


class _Subscription:
    """One subscriber of a topic: a group-less consumer of all its partitions, placed at
    their ends when opened."""

    def __init__(self, broker: KafkaBroker, topic: str) -> None:
        self._broker = broker
        self._topic = topic
        self._consumer: Any = None
        self._buffer: deque[Envelope] = deque()

    async def start(self) -> None:
        broker = self._broker
        partitions = await broker._partitions(self._topic)
        consumer = AIOKafkaConsumer(
            **broker._consumer_config(),
            auto_offset_reset="latest",
            # News is read as it comes: a broker that does not answer a fetch as soon as
            # data arrives (Tansu waits out the whole wait) would add up to 500 ms.
            fetch_max_wait_ms=FETCH_WAIT_MS,
        )
        consumer.assign(partitions)
        try:
            with _translated(f"subscribing to {self._topic}"):
                await consumer.start()
                await consumer.seek_to_end(*partitions)
                for tp in partitions:  # resolved now: "from now" means from here
                    await consumer.position(tp)
        except BaseException:
            await _stop(consumer)
            raise
        self._consumer = consumer
        broker._open.add(self)

    async def close(self) -> None:
        self._broker._open.discard(self)
        await _stop(self._consumer)

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Envelope:
        while not self._buffer:
            try:
                with _translated(f"consuming {self._topic}"):
                    batch = await self._consumer.getmany(timeout_ms=_POLL_MS)
            except ConsumerStoppedError:
                raise StopAsyncIteration from None
            for records in batch.values():
                for record in records:
                    try:
                        self._buffer.append(decode(record.value or b""))
                    except InvalidMessage as exc:
                        _log.warning(
                            "skipped an undecodable message on %s with key %r: %s",
                            self._topic,
                            _key(record),
                            exc,
                        )
        return self._buffer.popleft()


@asynccontextmanager
async def _subscribe(broker: KafkaBroker, topic: str) -> AsyncIterator[AsyncIterator[Envelope]]:
    subscription = _Subscription(broker, topic)
    await subscription.start()
    try:
        yield subscription
    finally:
        await subscription.close()


class _Events(EventStream):
    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker

    async def publish(self, body: bytes, key: str) -> None:
        await self._broker._produce(self._broker.events_topic, [(body, key.encode(), None, None)])

    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None:
        await self._broker._produce(
            self._broker.events_topic, ((body, key.encode(), None, None) for body, key in items)
        )

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        return _subscribe(self._broker, self._broker.events_topic)


class _Control(Control):
    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker

    async def broadcast(self, body: bytes, key: str = "") -> None:
        await self._broker._produce(
            self._broker.control_topic, [(body, key.encode() or None, None, None)]
        )

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        return _subscribe(self._broker, self._broker.control_topic)
