"""`memory://` — the three roles inside one process, for `loom up` and fast tests.

The same URL in one process is the same broker: a module-level registry keeps one state
per (URL, prefix) for the life of the process, so every `MemoryBroker` opened on that
URL and prefix shares its queue, dead letters and subscribers, and two prefixes on one
URL never see each other. A `MemoryBroker` object is one "connection": closing it is its
process dying — its consumers stop and their unacked deliveries are delivered again.

Everything runs on one event loop (the state is not thread-safe); waiters are futures of
the loop that waits, so the registry itself is not bound to a loop.

Backpressure: each event or control subscriber has a bounded buffer (`subscriber_buffer`,
10,000 by default); when a slow subscriber's buffer is full the oldest item is dropped
and a warning logged. Events and control messages are news and hints — the database is
the truth — so dropping beats growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice

from loom_messaging.abc import Broker, Control, DeadLetter, Delivery, EventStream, WorkQueue
from loom_messaging.envelope import Envelope, decode
from loom_messaging.errors import BrokerUnavailable, InvalidMessage

__all__ = ["SUBSCRIBER_BUFFER", "MemoryBroker"]

_log = logging.getLogger("loom.messaging.memory")

SUBSCRIBER_BUFFER = 10_000
"""Items an event or control subscriber may fall behind by before the oldest is dropped."""


class _Waker:
    """Lets one coroutine wait until `wake()`; a wake with nobody waiting is not lost
    (the next `wait()` returns at once), so check-then-wait never misses a wake-up."""

    __slots__ = ("_future", "_pending")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._pending = False

    def wake(self) -> None:
        self._pending = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        if not self._pending:
            self._future = asyncio.get_running_loop().create_future()
            try:
                await self._future
            finally:
                self._future = None
        self._pending = False


@dataclass(eq=False, slots=True)
class _Message:
    body: bytes
    key: str
    deliveries: int = 0


@dataclass(eq=False)
class _State:
    """One prefix on one URL: what a real broker keeps on its server."""

    ready: deque[_Message] = field(default_factory=deque)
    consumers: set[_Consumer] = field(default_factory=set)
    dead: dict[str, DeadLetter] = field(default_factory=dict)
    """Oldest first (insertion order)."""
    event_subscribers: set[_Subscription] = field(default_factory=set)
    control_subscribers: set[_Subscription] = field(default_factory=set)

    def enqueue(self, message: _Message) -> None:
        self.ready.append(message)
        self.wake_consumers()

    def enqueue_many(self, messages: Iterable[_Message]) -> None:
        """`enqueue` each of `messages`, waking the consumers once."""
        self.ready.extend(messages)
        self.wake_consumers()

    def wake_consumers(self) -> None:
        for consumer in self.consumers:
            consumer.waker.wake()

    def dead_letter(self, message: _Message, reason: str) -> None:
        letter = DeadLetter(
            id=uuid.uuid4().hex,
            body=message.body,
            key=message.key,
            reason=reason,
            at=datetime.now(UTC),
        )
        self.dead[letter.id] = letter
        _log.warning("dead-lettered a message with key %r: %s", message.key, reason)


_REGISTRY: dict[tuple[str, str], _State] = {}


class _MemoryDelivery(Delivery):
    def __init__(self, consumer: _Consumer, message: _Message, envelope: Envelope) -> None:
        self.envelope = envelope
        self.key = message.key
        self.delivery_count = message.deliveries
        self._consumer = consumer
        self._message = message

    async def ack(self) -> None:
        """Acking twice, or after the consumer left (the message is then being delivered
        again), does nothing."""
        self._consumer.settle(self._message)

    async def dead_letter(self, reason: str) -> None:
        if self._consumer.settle(self._message):
            self._consumer.state.dead_letter(self._message, reason)


class _Consumer:
    """One `consume` block: takes ready messages while it holds fewer than `prefetch`."""

    def __init__(self, state: _State, prefetch: int, max_deliveries: int) -> None:
        self.state = state
        self.prefetch = prefetch
        self.max_deliveries = max_deliveries
        self.unacked: dict[int, _Message] = {}
        self.waker = _Waker()
        self.stopped = False

    def __aiter__(self) -> _Consumer:
        return self

    async def __anext__(self) -> Delivery:
        ready, unacked = self.state.ready, self.unacked
        while True:
            if self.stopped:
                raise StopAsyncIteration
            if ready and len(unacked) < self.prefetch:
                message = ready.popleft()
                message.deliveries += 1
                try:
                    envelope = decode(message.body)
                except InvalidMessage as exc:
                    self.state.dead_letter(message, str(exc))
                    continue
                unacked[id(message)] = message
                return _MemoryDelivery(self, message, envelope)
            await self.waker.wait()

    def settle(self, message: _Message) -> bool:
        """Forget an acked or dead-lettered delivery; False if it was not held."""
        unacked = self.unacked
        if unacked.pop(id(message), None) is None:
            return False
        if len(unacked) == self.prefetch - 1:
            # It was full, so may be waiting for this free slot; when it was not full, it
            # waits only for ready messages, and `enqueue` wakes it for those.
            self.waker.wake()
        return True

    def stop(self) -> None:
        """Leave: every unacked delivery goes back to the head of the queue in order, or
        to the dead letters once it has been delivered `max_deliveries` times."""
        self.stopped = True
        self.waker.wake()
        self.state.consumers.discard(self)
        for message in reversed(list(self.unacked.values())):
            if message.deliveries >= self.max_deliveries:
                reason = f"delivered {message.deliveries} times without an ack"
                self.state.dead_letter(message, reason)
            else:
                self.state.ready.appendleft(message)
        if self.unacked:
            self.unacked.clear()
            self.state.wake_consumers()


class _Subscription:
    """One `subscribe` block of the event stream or the control channel."""

    def __init__(self, capacity: int, channel: str) -> None:
        self.items: deque[Envelope] = deque()
        self.capacity = capacity
        self.channel = channel
        self.dropped = 0
        self.overflowing = False
        self.waker = _Waker()
        self.stopped = False

    def put(self, envelope: Envelope) -> None:
        if len(self.items) >= self.capacity:
            self.items.popleft()
            self.dropped += 1
            if not self.overflowing:  # one warning per episode of falling behind
                self.overflowing = True
                _log.warning(
                    "a %s subscriber is %d messages behind: dropping the oldest "
                    "(%d dropped so far)",
                    self.channel,
                    self.capacity,
                    self.dropped,
                )
        self.items.append(envelope)
        self.waker.wake()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> Envelope:
        while True:
            if self.stopped:
                raise StopAsyncIteration
            if self.items:
                envelope = self.items.popleft()
                if not self.items:
                    self.overflowing = False  # caught up
                return envelope
            await self.waker.wait()

    def stop(self) -> None:
        self.stopped = True
        self.waker.wake()


def _fan_out(subscribers: set[_Subscription], body: bytes, key: str, channel: str) -> None:
    try:
        envelope = decode(body)
    except InvalidMessage as exc:
        _log.warning("skipped an undecodable %s message with key %r: %s", channel, key, exc)
        return
    for subscription in subscribers:
        subscription.put(envelope)


class _Queue(WorkQueue):
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    async def publish(self, body: bytes, key: str) -> None:
        self._broker._state().enqueue(_Message(body, key))
        await asyncio.sleep(0)  # like real I/O: let consumers run between publishes

    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None:
        state = self._broker._state()
        state.enqueue_many([_Message(body, key) for body, key in items])
        await asyncio.sleep(0)

    def consume(
        self, *, prefetch: int = 10
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        return self._consume(prefetch)

    @asynccontextmanager
    async def _consume(self, prefetch: int) -> AsyncIterator[AsyncIterator[Delivery]]:
        broker = self._broker
        state = broker._state()
        consumer = _Consumer(state, prefetch, broker.max_deliveries)
        state.consumers.add(consumer)
        broker._consumers.add(consumer)
        try:
            yield consumer
        finally:
            broker._consumers.discard(consumer)
            consumer.stop()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return list(islice(self._broker._state().dead.values(), limit))

    async def replay(self, dead_letter_id: str) -> None:
        state = self._broker._state()
        letter = state.dead.pop(dead_letter_id, None)
        if letter is None:
            raise LookupError(f"no dead letter {dead_letter_id!r}")
        state.enqueue(_Message(letter.body, letter.key))
        await asyncio.sleep(0)


class _Events(EventStream):
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    async def publish(self, body: bytes, key: str) -> None:
        _fan_out(self._broker._state().event_subscribers, body, key, "event")
        await asyncio.sleep(0)

    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None:
        subscribers = self._broker._state().event_subscribers
        for body, key in items:
            _fan_out(subscribers, body, key, "event")
        await asyncio.sleep(0)

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        return self._broker._subscribe("event")


class _Control(Control):
    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    async def broadcast(self, body: bytes, key: str = "") -> None:
        _fan_out(self._broker._state().control_subscribers, body, key, "control")
        await asyncio.sleep(0)

    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        return self._broker._subscribe("control")


class MemoryBroker(Broker):
    """The in-process broker named by `url` (`memory://<name>`), under `prefix`.

    Operations on a broker that is not started (or is closed) raise `BrokerUnavailable`.
    `close()` ends the iteration of its open `consume` and `subscribe` blocks and puts
    their unacked deliveries back on the queue.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        max_deliveries: int,
        subscriber_buffer: int = SUBSCRIBER_BUFFER,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, not {max_deliveries}")
        if subscriber_buffer < 1:
            raise ValueError(f"subscriber_buffer must be at least 1, not {subscriber_buffer}")
        self.url = url
        self.prefix = prefix
        self.max_deliveries = max_deliveries
        self.subscriber_buffer = subscriber_buffer
        self.queue = _Queue(self)
        self.events = _Events(self)
        self.control = _Control(self)
        self._started: _State | None = None
        self._consumers: set[_Consumer] = set()
        self._subscriptions: set[_Subscription] = set()

    def _state(self) -> _State:
        if self._started is None:
            raise BrokerUnavailable(f"memory broker {self.url} ({self.prefix}) is not started")
        return self._started

    async def start(self) -> None:
        self._started = _REGISTRY.setdefault((self.url, self.prefix), _State())

    async def close(self) -> None:
        for consumer in list(self._consumers):
            consumer.stop()
        for subscription in list(self._subscriptions):
            self._end(subscription)
        self._consumers.clear()
        self._started = None

    async def ping(self) -> None:
        self._state()

    @asynccontextmanager
    async def _subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[Envelope]]:
        state = self._state()
        subscription = _Subscription(self.subscriber_buffer, channel)
        subscribers = state.event_subscribers if channel == "event" else state.control_subscribers
        subscribers.add(subscription)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._end(subscription)

    def _end(self, subscription: _Subscription) -> None:
        subscription.stop()
        self._subscriptions.discard(subscription)
        if self._started is not None:
            self._started.event_subscribers.discard(subscription)
            self._started.control_subscribers.discard(subscription)
