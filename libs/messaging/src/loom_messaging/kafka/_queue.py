"""The work queue's publishing side and its records: publishing, dead letters and replay,
requeueing with the delivery count, and the delivery marks of the second group.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from itertools import islice
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped, unused-ignore]

from loom_messaging.abc import DeadLetter, Delivery, WorkQueue
from loom_messaging.kafka._common import (
    DELIVERIES_HEADER,
    REASON_HEADER,
    REPLAYED_HEADER,
    _key,
    _log,
    _stop,
    _translated,
)
from loom_messaging.kafka._consumer import _WorkConsumer

if TYPE_CHECKING:
    from loom_messaging.kafka._broker import KafkaBroker


class _Queue(WorkQueue):
    def __init__(self, broker: KafkaBroker) -> None:
        self._broker = broker
        self._marks: Any = None  # the consumer that commits for the marks group
        self._marks_lock = asyncio.Lock()

    async def publish(self, body: bytes, key: str) -> None:
        await self._broker._produce(self._broker.work_topic, [(body, key.encode(), None, None)])

    async def publish_batch(self, items: Sequence[tuple[bytes, str]]) -> None:
        await self._broker._produce(
            self._broker.work_topic, ((body, key.encode(), None, None) for body, key in items)
        )

    def consume(
        self, *, prefetch: int = 10
    ) -> AbstractAsyncContextManager[AsyncIterator[Delivery]]:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        return self._consume(prefetch)

    @asynccontextmanager
    async def _consume(self, prefetch: int) -> AsyncIterator[AsyncIterator[Delivery]]:
        consumer = _WorkConsumer(self._broker, prefetch)
        await consumer.start()
        try:
            yield consumer
        finally:
            await consumer.close()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        letters = await self._read_dead()
        return [letter for letter, _ in islice(letters.values(), limit)]

    async def replay(self, dead_letter_id: str) -> None:
        found = (await self._read_dead()).get(dead_letter_id)
        if found is None:
            raise LookupError(f"no dead letter {dead_letter_id!r}")
        _, record = found
        broker = self._broker
        await broker._produce(broker.work_topic, [(record.value or b"", record.key, None, None)])
        marker = [(REPLAYED_HEADER, dead_letter_id.encode())]
        await broker._produce(broker.dead_topic, [(b"", record.key, marker, record.partition)])

    async def _read_dead(self) -> dict[str, tuple[DeadLetter, Any]]:
        """The dead letters not replayed yet, oldest first, with their records."""
        letters: dict[str, tuple[DeadLetter, Any]] = {}
        replayed: set[str] = set()
        records = await self._broker._read_all(self._broker.dead_topic)
        for record in sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset)):
            headers = dict(record.headers or ())
            if REPLAYED_HEADER in headers:
                replayed.add(headers[REPLAYED_HEADER].decode("utf-8", "replace"))
                continue
            letter = DeadLetter(
                id=f"{record.partition}:{record.offset}",
                body=record.value or b"",
                key=_key(record),
                reason=headers.get(REASON_HEADER, b"").decode("utf-8", "replace"),
                at=datetime.fromtimestamp(record.timestamp / 1000, UTC),
            )
            letters[letter.id] = (letter, record)
        for letter_id in replayed:
            letters.pop(letter_id, None)
        return letters

    async def _dead_letter(self, record: Any, reason: str, deliveries: int) -> None:
        headers = [(REASON_HEADER, reason.encode()), (DELIVERIES_HEADER, b"%d" % deliveries)]
        await self._broker._produce(
            self._broker.dead_topic, [(record.value or b"", record.key, headers, None)]
        )
        _log.warning("dead-lettered a message with key %r: %s", _key(record), reason)

    async def _give_back(self, record: Any, deliveries: int) -> None:
        """A record delivered `deliveries` times and never settled: to the dead letters
        once that reaches the limit, else back on the queue with its count."""
        if deliveries >= self._broker.max_deliveries:
            reason = f"delivered {deliveries} times without an ack"
            await self._dead_letter(record, reason, deliveries)
        else:
            headers = [(DELIVERIES_HEADER, b"%d" % deliveries)]
            await self._broker._produce(
                self._broker.work_topic, [(record.value or b"", record.key, headers, None)]
            )

    async def _marks_consumer(self) -> Any:
        """A consumer of the marks group: assigned every work partition, paused (it never
        fetches), used only to commit and read marks."""
        async with self._marks_lock:
            if self._marks is None:
                broker = self._broker
                partitions = await broker._partitions(broker.work_topic)
                consumer = AIOKafkaConsumer(
                    **broker._consumer_config(), group_id=broker.marks_group
                )
                consumer.assign(partitions)
                consumer.pause(*partitions)
                try:
                    with _translated("starting the delivery marks"):
                        await consumer.start()
                except BaseException:
                    await _stop(consumer)
                    raise
                self._marks = consumer
            return self._marks

    async def _read_mark(self, tp: Any) -> int:
        consumer = await self._marks_consumer()
        with _translated("reading a delivery mark"):
            async with self._broker._deadline():
                return int(await consumer.committed(tp) or 0)

    async def _write_marks(self, marks: dict[Any, int]) -> None:
        if marks:
            consumer = await self._marks_consumer()
            with _translated("recording deliveries"):
                async with self._broker._deadline():
                    await consumer.commit(marks)

    async def _close(self) -> None:
        if self._marks is not None:
            await _stop(self._marks)
