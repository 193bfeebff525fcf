"""The three roles of DESIGN §1, each with its guarantees. Every backend (memory,
RabbitMQ, Kafka) implements all three, and one contract suite tests them alike.

Names: every broker object (queue, exchange, topic, consumer group) carries the prefix
given to `open_broker` (`LOOM_BROKER_PREFIX`), so installations and test runs sharing a
broker never see each other's messages.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime

from loom_messaging.envelope import Envelope

__all__ = ["Broker", "Control", "DeadLetter", "Delivery", "EventStream", "WorkQueue"]

DEFAULT_MAX_DELIVERIES = 5


class Delivery(abc.ABC):
    """One work-queue message handed to a consumer."""

    envelope: Envelope
    key: str
    delivery_count: int
    """1 on the first delivery, 2 on the first redelivery, ..."""

    @abc.abstractmethod
    async def ack(self) -> None:
        """The consumer owns the work now (for executions: after the database claim);
        the message is never delivered again."""

    @abc.abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Give up on this message: it goes to the dead-letter queue with `reason`."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    """Opaque; what `WorkQueue.replay` takes."""
    body: bytes
    key: str
    reason: str
    at: datetime


class WorkQueue(abc.ABC):
    """`loom.executions`: at-least-once delivery of work to ONE of the consumers.

    Guarantees:
    * `publish` returns once the broker has the message (confirmed, durable);
      `publish_batch` pipelines the confirms and returns when all are confirmed.
    * A delivery that is not acked (its consumer died, or left the `consume` block) is
      delivered again, possibly to another consumer.
    * After `max_deliveries` (default 5) deliveries without an ack, or at once when its
      body cannot be decoded (`InvalidMessage`), a message goes to the dead-letter queue
      with the reason; `dead_letters()` lists them and `replay(id)` publishes one again.
    """

    @abc.abstractmethod
    async def publish(self, body: bytes, key: str) -> None: ...

    @abc.abstractmethod
    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None: ...

    @abc.abstractmethod
    def consume(
        self, *, prefetch: int = 10
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        """`async with queue.consume() as deliveries: async for d in deliveries: ...`.
        Leaving the block stops consuming; unacked deliveries are redelivered."""

    @abc.abstractmethod
    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    @abc.abstractmethod
    async def replay(self, dead_letter_id: str) -> None:
        """Publish a dead-lettered message again and remove it from the dead letters.
        Raises `LookupError` for an unknown id."""


class EventStream(abc.ABC):
    """`loom.events`: news (execution status, node status, log batches) for every
    subscriber. Subscribing starts from now (no history: the database has it). Events of
    one key (the execution id) arrive in the order they were published. Undecodable
    events are skipped (and logged), never delivered."""

    @abc.abstractmethod
    async def publish(self, body: bytes, key: str) -> None: ...

    @abc.abstractmethod
    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None: ...

    @abc.abstractmethod
    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        """Events published after the subscription is ready (the `async with` entered)."""


class Control(abc.ABC):
    """`loom.control`: broadcast. Every live subscriber gets every message
    (`execution.cancel`, `graph.changed`); a subscriber that was not live misses it (the
    database is the truth; control messages are hints)."""

    @abc.abstractmethod
    async def broadcast(self, body: bytes, key: str = "") -> None: ...

    @abc.abstractmethod
    def subscribe(self) -> AbstractAsyncContextManager[AsyncIterator[Envelope]]: ...


class Broker(abc.ABC):
    """One backend connection with its three roles. Made by `open_broker(url, prefix)`;
    `start()` connects (raising `BrokerUnavailable`), `close()` releases everything."""

    queue: WorkQueue
    events: EventStream
    control: Control

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """A cheap reachability check for `/readyz`; raises `BrokerUnavailable`."""

    def publishers(
        self,
    ) -> dict[str, Callable[[Sequence[tuple[bytes, str]]], Awaitable[None]]]:
        """One batch publisher per outbox channel (`queue`, `events`, `control`): what the
        outbox relay of loom_db is handed, so that neither lib imports the other."""

        async def broadcast(items: Sequence[tuple[bytes, str]]) -> None:
            for body, key in items:
                await self.control.broadcast(body, key)

        return {
            "queue": self.queue.publish_batch,
            "events": self.events.publish_batch,
            "control": broadcast,
        }

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
