"""`kafka://host:port[,host:port]` — the three roles on Apache Kafka (tests: Tansu), with
aiokafka.

Topics, created by `start()` when missing (an existing topic is used as it is):

* ``{prefix}.executions`` — the work queue (`partitions`, default 6), key = execution id;
* ``{prefix}.executions.dead`` — dead letters and replay markers (1 partition);
* ``{prefix}.events`` — the event stream (`partitions`), key = execution id;
* ``{prefix}.control`` — broadcasts (`control_partitions`, default 1).

**Producing.** One producer per broker: ``acks="all"``, ``max_request_size`` = the 256 KiB
`log.batch` cap + 64 KiB for key, headers and batch overhead, a small linger.
Idempotence is the `idempotent` setting, off by default (Tansu lacks it). `publish`
returns once the broker has the record; `publish_batch` sends every record, then waits
for all. aiokafka keeps one request in flight per partition, so a key's records keep
their order even through retries.

**The work queue** is consumer group ``{prefix}.workers`` with manual commits. A record
is committed once it and every record before it in its partition are *settled* (acked,
dead-lettered or requeued): the committed offset is the highest contiguous settled offset
+ 1, so acks may come in any order. `ack()` returns at once; a background task commits
within about 50 ms (the acks of that window share one commit), and leaving the block
commits what is settled. A crash before a commit means a redelivery, never a loss.

Kafka has no redelivery counter, so the count travels with the message, in header
``x-loom-deliveries`` (deliveries so far):

* A delivery given back unacked — its consumer leaves the `consume` block, its broker is
  closed, or its partition moves to another consumer in a rebalance (pending acks get a
  grace of a quarter of the session timeout first) — is *requeued*: published again
  (same key, so the same partition, at its end) with the count + 1, confirmed, and only
  then committed past; or, once it has been delivered `max_deliveries` times, sent to
  the dead letters with the reason ``delivered N times without an ack``. Exact.
* A process killed abruptly cannot requeue. So before handing out a fetched batch the
  consumer records "handed out up to offset X" as the committed offset of a second
  group, ``{prefix}.workers.delivered`` (one commit per fetched batch; no member ever
  joins it). The partition's next owner reads that mark: a record below it that is read
  again was handed out by a consumer that died before settling it, so it is requeued
  with the count + 1 (or dead-lettered) instead of being delivered as new. Approximate:
  records of the dead consumer's last fetched batch that it had not handed out yet, and
  records acked but not yet committed, count one delivery too.

At-least-once holds in every case: nothing is committed before it is settled, and a
requeued message only after its copy is confirmed. The queue keeps no order (a requeued
message goes to the end of its partition). A body that does not decode goes to the dead
letters at once with `decode`'s reason, then is committed past.

**Dead letters** are records of ``{prefix}.executions.dead``: the original body and key,
the reason in header ``x-loom-reason``; a dead letter's id is ``partition:offset``.
`dead_letters()` reads the topic from its beginning to its end offsets with a group-less
consumer (cost: the size of the dead topic, bounded by its retention). `replay(id)`
publishes the body to the work queue (delivery count 1), then appends a marker record
(empty body, header ``x-loom-replayed: <id>``) to the dead topic; listings leave marked
letters out. A crash between the two lists the letter again (a second replay would
deliver it twice; workers deduplicate by execution id).

**Events and control**: each subscription is its own group-less consumer, assigned every
partition of the topic and positioned at its end before `subscribe()`'s ``async with``
returns — every subscriber gets every message published from then on. Per-key order
holds (one key, one partition). Undecodable messages are skipped with a warning.

**Group timing.** `session_timeout_ms` (default 6000, the smallest Kafka accepts by
default) and `heartbeat_interval_ms` (1000) govern how fast a consumer joins and how
fast a dead one is noticed; `request_timeout_ms` (30 s) must exceed the session timeout,
as aiokafka bounds a JoinGroup by it. Tansu takes about half the session timeout to let
a consumer join, so tests that make many consumers pass smaller values (1000 / 200).
A new work group (or one whose commits expired) starts at the earliest offset: workers
deduplicate by execution id.

aiokafka 0.14 internals used, each in one place: the group coordinator's generation and
member id (`_WorkConsumer._stop_and_leave`), the admin client's `_send_request`, and the
fetcher's pending tasks (`_stop`, working around aio-libs/aiokafka#647).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from aiokafka import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerStoppedError,
    TopicPartition,
)
from aiokafka.admin import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaAdminClient,
    NewTopic,
)
from aiokafka.errors import (  # type: ignore[import-untyped, unused-ignore]
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
)
from aiokafka.protocol.group import (  # type: ignore[import-untyped, unused-ignore]
    LeaveGroupRequest,
)

from loom_messaging.abc import (
    DEFAULT_MAX_DELIVERIES,
    Broker,
    Control,
    DeadLetter,
    Delivery,
    EventStream,
    WorkQueue,
)
from loom_messaging.envelope import LOG_BATCH_MAX_BYTES, Envelope, decode
from loom_messaging.errors import BrokerUnavailable, InvalidMessage, MessagingError, UnsupportedURL

__all__ = [
    "DELIVERIES_HEADER",
    "MAX_REQUEST_BYTES",
    "REASON_HEADER",
    "REPLAYED_HEADER",
    "KafkaBroker",
    "bootstrap_servers",
]

_log = logging.getLogger("loom.messaging.kafka")

MAX_REQUEST_BYTES = LOG_BATCH_MAX_BYTES + 64 * 1024
"""The producer's `max_request_size`: the largest message (a 256 KiB `log.batch`) plus
room for its key, headers and the record batch around it."""

DELIVERIES_HEADER = "x-loom-deliveries"
REASON_HEADER = "x-loom-reason"
REPLAYED_HEADER = "x-loom-replayed"

_TOPIC_EXISTS = 36  # Kafka's TOPIC_ALREADY_EXISTS error code
_POLL_MS = 500  # how long one fetch waits for records before checking for shutdown
_FETCH_RECORDS = 100  # records per fetched work batch: one delivery mark per batch
_COMMIT_DELAY = 0.05  # acks of this window share a commit: a crash redelivers them
_PING_TIMEOUT = 5.0


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


def _deliveries(record: Any) -> int:
    """Deliveries a work record has had before this one (its `x-loom-deliveries`)."""
    for name, value in record.headers or ():
        if name == DELIVERIES_HEADER:
            with contextlib.suppress(ValueError):
                return max(0, int(value))
    return 0


def _key(record: Any) -> str:
    return record.key.decode("utf-8", "replace") if record.key else ""


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a send's outcome as seen: when one send of a batch fails, its first error is
    raised and the others' need no "exception was never retrieved" report."""
    if not future.cancelled():
        future.exception()


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


class KafkaBroker(Broker):
    """The Kafka backend: see the module docstring for topics, settings and guarantees.

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
        producer = self._live_producer()
        futures: list[asyncio.Future[Any]] = []
        with _translated(f"publishing to {topic}"):
            for value, key, headers, partition in records:
                future = await producer.send(
                    topic, value, key=key, headers=headers, partition=partition
                )
                future.add_done_callback(_retrieve)
                futures.append(future)
            for future in futures:
                await future

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


# -- the work queue --------------------------------------------------------------------


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


@dataclass(eq=False, slots=True)
class _Entry:
    """A record taken from a partition and not committed past yet."""

    record: Any
    deliveries: int
    handed: bool = False  # given to the consumer as a Delivery (counts against prefetch)
    settled: bool = False


@dataclass(eq=False, slots=True)
class _Partition:
    """What one consume block knows of one partition it owns."""

    tp: Any
    abandoned_below: int
    """Its delivery mark when we got it: records below were handed out before us."""
    mark: int
    """Our delivery mark, as committed in the marks group."""
    pending: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)  # offset order
    unsettled: int = 0
    taken_to: int = 0  # one past the last record taken
    position: int | None = None  # the offset to commit: everything before it is settled
    committed: int | None = None
    revoked: bool = False


class _KafkaDelivery(Delivery):
    def __init__(
        self,
        consumer: _WorkConsumer,
        partition: _Partition,
        offset: int,
        envelope: Envelope,
        deliveries: int,
    ) -> None:
        self.envelope = envelope
        self.key = _key(partition.pending[offset].record)
        self.delivery_count = deliveries
        self._consumer = consumer
        self._partition = partition
        self._offset = offset

    async def ack(self) -> None:
        """Returns at once; the commit follows within a round trip. Acking twice, or
        after the consumer gave the message back (it is being delivered again), does
        nothing."""
        self._consumer._settle(self._partition, self._offset)

    async def dead_letter(self, reason: str) -> None:
        await self._consumer._dead_letter(self._partition, self._offset, reason)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, consumer: _WorkConsumer) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        await self._consumer._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any]) -> None:
        """Nothing to do: a partition's state is made when its first record arrives."""


class _WorkConsumer:
    """One `consume` block: a member of the work group, handing out deliveries while
    fewer than `prefetch` are unsettled.

    Cancel-safe: fetched records enter the buffer before any other await, and leave it
    only once taken; publishing and settling a taken record is shielded. So a cancelled
    `anext()` never lets a commit pass a record that was not settled.
    """

    def __init__(self, broker: KafkaBroker, prefetch: int) -> None:
        self._broker = broker
        self._queue = broker.queue
        self._prefetch = prefetch
        self._consumer: Any = None
        self._partitions: dict[Any, _Partition] = {}
        # (generation, record): a rebalance bumps the generation, and as aiokafka's
        # rebalances are eager (every partition revoked, positions reset to the commits),
        # older records are simply dropped: they will be fetched again.
        self._buffer: deque[tuple[int, Any]] = deque()
        self._generation = 0
        self._outstanding = 0
        self._room = asyncio.Event()  # set when a delivery settles
        self._settled = asyncio.Event()
        self._step = asyncio.Lock()  # one record at a time is taken, requeued, given back
        self._fetching = asyncio.Lock()  # one fetch at a time keeps each partition in order
        self._commit_lock = asyncio.Lock()
        self._commit_wanted = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False

    async def start(self) -> None:
        broker = self._broker
        await self._queue._marks_consumer()
        consumer = AIOKafkaConsumer(
            **broker._consumer_config(),
            group_id=broker.work_group,
            auto_offset_reset="earliest",
            session_timeout_ms=broker.session_timeout_ms,
            heartbeat_interval_ms=broker.heartbeat_interval_ms,
        )
        consumer.subscribe([broker.work_topic], listener=_Rebalance(self))
        try:
            with _translated(f"joining consumer group {broker.work_group}"):
                await consumer.start()  # returns once the group has given us partitions
        except BaseException:
            await _stop(consumer)
            raise
        self._consumer = consumer
        self._committer = asyncio.create_task(self._commit_loop())
        broker._open.add(self)

    async def close(self) -> None:
        """Gives back every unsettled delivery, commits, leaves the group. Idempotent."""
        if self._closed:
            return
        self._closed = self._stopping = True
        self._generation += 1
        self._room.set()
        self._broker._open.discard(self)
        try:
            async with self._step:
                await self._give_back(list(self._partitions.values()))
        finally:
            if self._committer is not None:
                self._committer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._committer
            await self._stop_and_leave()

    async def _stop_and_leave(self) -> None:
        """Stops the consumer, leaving the group. aiokafka sends LeaveGroup only for a
        generation above 0, and a broker that numbers the first generation 0 (Tansu)
        would then hold the next member's join until this one's session times out; so
        in that case we send it. Best effort, as aiokafka's own: a failure is logged."""
        coordinator = self._consumer._coordinator  # aiokafka 0.14 internals, read only
        generation, member_id = coordinator.generation, coordinator.member_id
        node_id = coordinator.coordinator_id
        await _stop(self._consumer)
        admin = self._broker._admin
        if generation == 0 and member_id and node_id is not None and admin is not None:
            try:
                with _translated("leaving the consumer group"):
                    async with self._broker._deadline():
                        request = LeaveGroupRequest(self._broker.work_group, member_id)
                        await admin._send_request(request, node_id)
            except BrokerUnavailable as exc:
                _log.info("could not leave %s: %s", self._broker.work_group, exc)

    def __aiter__(self) -> _WorkConsumer:
        return self

    async def __anext__(self) -> Delivery:
        while True:
            if self._stopping:
                raise StopAsyncIteration
            if self._outstanding >= self._prefetch:
                self._room.clear()
                await self._room.wait()
                continue
            while self._buffer and self._buffer[0][0] != self._generation:
                self._buffer.popleft()
            if not self._buffer:
                await self._fetch()
                continue
            async with self._step:
                if self._stopping or not self._buffer:
                    continue
                item = self._buffer[0]
                partition = await self._ready(item)
                if partition is None or not self._buffer or self._buffer[0] is not item:
                    continue  # a rebalance came while we waited
                self._buffer.popleft()
                delivery = await self._take(partition, item[1])
            if delivery is not None:
                return delivery

    async def _fetch(self) -> None:
        async with self._fetching:
            if self._buffer:
                return  # another task iterating this block fetched meanwhile
            generation = self._generation
            try:
                with _translated("consuming the work queue"):
                    batch = await self._consumer.getmany(
                        timeout_ms=_POLL_MS, max_records=_FETCH_RECORDS
                    )
            except ConsumerStoppedError:
                raise StopAsyncIteration from None
            if generation == self._generation:  # no await between: nothing fetched is lost
                for records in batch.values():
                    self._buffer.extend((generation, record) for record in records)

    async def _ready(self, item: tuple[int, Any]) -> _Partition | None:
        """The state of the record's partition, with a delivery mark past the record
        (written before the record is handed out, so that a crash is counted). None if
        a rebalance made the record stale meanwhile."""
        generation, record = item
        tp = TopicPartition(record.topic, record.partition)
        partition = self._partitions.get(tp)
        if partition is None:
            mark = await self._queue._read_mark(tp)
            if generation != self._generation:
                return None
            partition = self._partitions[tp] = _Partition(tp, mark, mark)
        if record.offset >= partition.mark:
            # One commit marks everything buffered, for every partition met so far.
            ends: dict[Any, int] = {}
            for _, buffered in self._buffer:
                key = TopicPartition(buffered.topic, buffered.partition)
                ends[key] = max(ends.get(key, 0), buffered.offset + 1)
            marks = {
                key: end
                for key, end in ends.items()
                if key in self._partitions and end > self._partitions[key].mark
            }
            await self._queue._write_marks(marks)
            for key, end in marks.items():
                self._partitions[key].mark = max(self._partitions[key].mark, end)
        return None if generation != self._generation else partition

    async def _take(self, partition: _Partition, record: Any) -> Delivery | None:
        """The delivery for `record`, or None when it was requeued or dead-lettered."""
        offset, deliveries = record.offset, _deliveries(record) + 1
        partition.pending[offset] = _Entry(record, deliveries)
        partition.unsettled += 1
        partition.taken_to = offset + 1
        if offset < partition.abandoned_below:
            # Handed out before by a consumer that died without settling it: that was a
            # delivery, so it goes back with its count (or to the dead letters).
            await asyncio.shield(self._resolve(partition, offset, None))
            return None
        try:
            envelope = decode(record.value or b"")
        except InvalidMessage as exc:
            await asyncio.shield(self._resolve(partition, offset, str(exc)))
            return None
        partition.pending[offset].handed = True
        self._outstanding += 1
        return _KafkaDelivery(self, partition, offset, envelope, deliveries)

    async def _resolve(self, partition: _Partition, offset: int, reason: str | None) -> None:
        """Dead-letters a taken record with `reason`, or gives it back (reason None),
        then settles it."""
        entry = partition.pending[offset]
        if reason is None:
            await self._queue._give_back(entry.record, entry.deliveries)
        else:
            await self._queue._dead_letter(entry.record, reason, entry.deliveries)
        self._settle(partition, offset)

    def _settle(self, partition: _Partition, offset: int) -> bool:
        """Marks a taken record settled and moves the partition's commit position over
        every settled record at its head. False if it was settled already."""
        entry = partition.pending.get(offset)
        if entry is None or entry.settled:
            return False
        entry.settled = True
        partition.unsettled -= 1
        if entry.handed:
            self._outstanding -= 1
            self._room.set()
        pending = partition.pending
        while pending:
            first = next(iter(pending))  # O(1) on an OrderedDict, even after many pops
            if not pending[first].settled:
                break
            del pending[first]
            partition.position = first + 1
        self._settled.set()
        self._commit_wanted.set()
        return True

    async def _dead_letter(self, partition: _Partition, offset: int, reason: str) -> None:
        async with self._step:  # not given back by a rebalance while it is dead-lettered
            entry = partition.pending.get(offset)
            if entry is None or entry.settled or partition.revoked:
                _log.info("dead_letter after the message was given back: ignored")
                return
            await asyncio.shield(self._resolve(partition, offset, reason))

    async def _revoked(self, revoked: set[Any]) -> None:
        """A rebalance takes `revoked` away: wait up to a grace for the pending acks,
        give back the rest, commit, and forget those partitions."""
        self._generation += 1
        grace = self._broker.session_timeout_ms / 4000
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while any(p.unsettled for tp, p in self._partitions.items() if tp in revoked):
                    self._settled.clear()
                    await self._settled.wait()
        async with self._step:
            partitions = [p for tp, p in self._partitions.items() if tp in revoked]
            try:
                await self._give_back(partitions)
            finally:
                for partition in partitions:
                    del self._partitions[partition.tp]
                    partition.revoked = True
                    for entry in partition.pending.values():  # left for the next owner
                        if entry.handed and not entry.settled:
                            self._outstanding -= 1
                    partition.pending.clear()
                self._room.set()

    async def _give_back(self, partitions: list[_Partition]) -> None:
        """With `_step` held: requeues (or dead-letters) every unsettled record of
        `partitions`, commits, and lowers the delivery marks to what was taken. A broker
        failure is logged: those records stay uncommitted, and their next owner counts
        them by the marks."""
        try:
            for partition in partitions:
                for offset, entry in list(partition.pending.items()):
                    if not entry.settled:
                        await self._resolve(partition, offset, None)
            await self._commit(partitions)
            await self._queue._write_marks(
                {
                    p.tp: max(p.taken_to, p.abandoned_below)
                    for p in partitions
                    if p.mark > max(p.taken_to, p.abandoned_below)
                }
            )
        except BrokerUnavailable as exc:
            _log.warning("could not give back unacked work messages: %s", exc)

    async def _commit(self, partitions: Iterable[_Partition]) -> None:
        async with self._commit_lock:
            offsets = {
                p.tp: p.position
                for p in partitions
                if not p.revoked and p.position is not None and p.position != p.committed
            }
            if not offsets:
                return
            with _translated("committing acked work messages"):
                try:
                    async with self._broker._deadline():
                        await self._consumer.commit(offsets)
                except (CommitFailedError, IllegalStateError) as exc:
                    _log.info("commit refused after a rebalance (redelivery follows): %s", exc)
                    return
            for partition in partitions:
                if partition.tp in offsets:
                    partition.committed = offsets[partition.tp]

    async def _commit_loop(self) -> None:
        """Commits settled offsets shortly after they settle: the acks of a short window
        (`_COMMIT_DELAY`) and those made during a commit share one commit."""
        while True:
            await self._commit_wanted.wait()
            await asyncio.sleep(_COMMIT_DELAY)
            self._commit_wanted.clear()
            try:
                await self._commit(list(self._partitions.values()))
            except BrokerUnavailable as exc:
                _log.warning("committing acked work messages failed, retrying: %s", exc)
                await asyncio.sleep(1)
                self._commit_wanted.set()


# -- events and control ----------------------------------------------------------------


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
        consumer = AIOKafkaConsumer(**broker._consumer_config(), auto_offset_reset="latest")
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
