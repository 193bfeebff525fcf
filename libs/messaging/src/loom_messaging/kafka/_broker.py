"""`KafkaBroker`: its settings, the producer, topic creation, `ping` and `close`, and the
reads the roles share (a topic's partitions, a whole topic).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from aiokafka import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.admin import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaAdminClient,
    NewTopic,
)

from loom_messaging.abc import DEFAULT_MAX_DELIVERIES, Broker
from loom_messaging.envelope import LOG_BATCH_MAX_BYTES
from loom_messaging.errors import BrokerUnavailable, MessagingError
from loom_messaging.kafka._common import _POLL_MS, _stop, _translated, bootstrap_servers
from loom_messaging.kafka._queue import _Queue
from loom_messaging.kafka._stream import _Control, _Events

if TYPE_CHECKING:
    from loom_messaging.kafka._consumer import _WorkConsumer
    from loom_messaging.kafka._stream import _Subscription

MAX_REQUEST_BYTES = LOG_BATCH_MAX_BYTES + 64 * 1024
"""The producer's `max_request_size`: the largest message (a 256 KiB `log.batch`) plus
room for its key, headers and the record batch around it."""

_TOPIC_EXISTS = 36  # Kafka's TOPIC_ALREADY_EXISTS error code
_PING_TIMEOUT = 5.0


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a send's outcome as seen: when one send of a batch fails, its first error is
    raised and the others' need no "exception was never retrieved" report."""
    if not future.cancelled():
        future.exception()


class KafkaBroker(Broker):
    """The Kafka backend: see the package docstring for topics, settings and guarantees.

    `start()` raises `BrokerUnavailable` when no bootstrap server answers, and
    `MessagingError` when a topic can be neither created nor found. Publishing raises
    `BrokerUnavailable`, or `InvalidMessage` for a message over `MAX_REQUEST_BYTES`.
    """

    queue: _Queue

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "loom",
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        partitions: int = 6,
        control_partitions: int = 1,
        replication_factor: int = 1,
        idempotent: bool = False,
        linger_ms: int = 1,
        session_timeout_ms: int = 6000,
        heartbeat_interval_ms: int = 1000,
        request_timeout_ms: int = 30_000,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1, not {max_deliveries}")
        if min(partitions, control_partitions, replication_factor) < 1:
            raise ValueError("partitions, control_partitions and replication_factor must be >= 1")
        if not 0 < heartbeat_interval_ms < session_timeout_ms < request_timeout_ms:
            # aiokafka bounds a JoinGroup by the request timeout, and a coordinator may
            # hold it for the rebalance timeout (= the session timeout): joins would fail.
            raise ValueError(
                "need 0 < heartbeat_interval_ms < session_timeout_ms < request_timeout_ms"
            )
        self.url = url
        self.bootstrap = bootstrap_servers(url)
        self.prefix = prefix
        self.max_deliveries = max_deliveries
        self.partitions = partitions
        self.control_partitions = control_partitions
        self.replication_factor = replication_factor
        self.idempotent = idempotent
        self.linger_ms = linger_ms
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.request_timeout_ms = request_timeout_ms
        self.work_topic = f"{prefix}.executions"
        self.dead_topic = f"{prefix}.executions.dead"
        self.events_topic = f"{prefix}.events"
        self.control_topic = f"{prefix}.control"
        self.work_group = f"{prefix}.workers"
        self.marks_group = f"{prefix}.workers.delivered"
        self.queue = _Queue(self)
        self.events = _Events(self)
        self.control = _Control(self)
        self._producer: Any = None
        self._admin: Any = None
        self._closed = False
        self._open: set[_WorkConsumer | _Subscription] = set()

    def topic_partitions(self) -> dict[str, int]:
        """The topics `start()` creates when missing, with their partition counts."""
        return {
            self.work_topic: self.partitions,
            self.dead_topic: 1,
            self.events_topic: self.partitions,
            self.control_topic: self.control_partitions,
        }

    def producer_config(self) -> dict[str, Any]:
        """The keyword arguments the broker's `AIOKafkaProducer` is made with."""
        return {
            "bootstrap_servers": self.bootstrap,
            "acks": "all",
            "enable_idempotence": self.idempotent,
            "max_request_size": MAX_REQUEST_BYTES,
            "max_batch_size": 64 * 1024,
            "linger_ms": self.linger_ms,
            "request_timeout_ms": self.request_timeout_ms,
        }

    def _consumer_config(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap,
            "request_timeout_ms": self.request_timeout_ms,
            "enable_auto_commit": False,
        }

    async def start(self) -> None:
        if self._closed:
            raise BrokerUnavailable(f"kafka broker {self.url} ({self.prefix}) is closed")
        if self._producer is not None:
            return
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap, request_timeout_ms=self.request_timeout_ms
        )
        producer = AIOKafkaProducer(**self.producer_config())
        try:
            with _translated(f"connecting to {self.url}"):
                await admin.start()
                await self._create_topics(admin)
                await producer.start()
        except BaseException:
            await producer.stop()
            await admin.close()
            raise
        self._admin, self._producer = admin, producer

    async def _create_topics(self, admin: Any) -> None:
        wanted = self.topic_partitions()
        response = await admin.create_topics(
            [NewTopic(name, count, self.replication_factor) for name, count in wanted.items()]
        )
        failed = {
            entry[0]: f"error {entry[1]}" + (f": {entry[2]}" if len(entry) > 2 else "")
            for entry in response.topic_errors
            if entry[1] not in (0, _TOPIC_EXISTS)
        }
        if failed:  # not allowed to create topics, perhaps: fine if they exist already
            missing = set(failed) - set(await admin.list_topics())
            if missing:
                raise MessagingError(
                    "cannot create topics: " + "; ".join(f"{t}: {failed[t]}" for t in missing)
                )

    async def close(self) -> None:
        """Ends every open `consume` block (its unacked deliveries are requeued) and
        subscription, then the producer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        async with AsyncExitStack() as stack:  # every step runs even if one fails
            if self._admin is not None:
                stack.push_async_callback(self._admin.close)
            if self._producer is not None:
                stack.push_async_callback(self._producer.stop)
            stack.push_async_callback(self.queue._close)
            for opened in list(self._open):
                stack.push_async_callback(opened.close)

    async def ping(self) -> None:
        if self._admin is None or self._closed:
            raise BrokerUnavailable(f"kafka broker {self.url} ({self.prefix}) is not started")
        with _translated(f"pinging {self.url}"):
            async with asyncio.timeout(_PING_TIMEOUT):
                await self._admin.describe_cluster()

    def _deadline(self) -> asyncio.Timeout:
        """Bounds a request that aiokafka would otherwise retry for as long as the
        broker is away (finding a group coordinator, say)."""
        return asyncio.timeout(self.request_timeout_ms / 1000)

    def _live_producer(self) -> Any:
        if self._producer is None or self._closed:
            raise BrokerUnavailable(f"kafka broker {self.url} ({self.prefix}) is not started")
        return self._producer

    async def _produce(
        self,
        topic: str,
        records: Iterable[tuple[bytes, bytes | None, list[tuple[str, bytes]] | None, int | None]],
    ) -> None:
        """Sends (value, key, headers, partition) records, then waits until the broker
        has every one of them."""
        send = self._live_producer().send
        futures: list[asyncio.Future[Any]] = []
        try:
            with _translated(f"publishing to {topic}"):
                for value, key, headers, partition in records:
                    futures.append(
                        await send(topic, value, key=key, headers=headers, partition=partition)
                    )
                for future in futures:
                    await future
        except BaseException:
            for future in futures:  # only on failure: a callback per send costs
                future.add_done_callback(_retrieve)
            raise

    async def _partitions(self, topic: str) -> list[Any]:
        producer = self._live_producer()
        with _translated(f"reading the partitions of {topic}"):
            numbers = await producer.partitions_for(topic)
        return [TopicPartition(topic, number) for number in sorted(numbers)]

    async def _read_all(self, topic: str) -> list[Any]:
        """Every record of `topic` from its beginning up to its end offsets now, read by
        a throwaway group-less consumer."""
        partitions = await self._partitions(topic)
        consumer = AIOKafkaConsumer(**self._consumer_config(), auto_offset_reset="earliest")
        consumer.assign(partitions)
        records: list[Any] = []
        try:
            with _translated(f"reading {topic}"):
                async with self._deadline():
                    await consumer.start()
                    ends = await consumer.end_offsets(partitions)
                    starts = await consumer.beginning_offsets(partitions)
                    todo = {tp for tp in partitions if ends[tp] > starts[tp]}
                    for tp in todo:
                        consumer.seek(tp, starts[tp])
                    while todo:
                        batch = await consumer.getmany(*todo, timeout_ms=_POLL_MS)
                        for tp, fetched in batch.items():
                            records.extend(r for r in fetched if r.offset < ends[tp])
                        for tp in list(todo):
                            if await consumer.position(tp) >= ends[tp]:
                                todo.discard(tp)
        finally:
            await _stop(consumer)
        return records
