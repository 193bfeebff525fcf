"""One `consume` block of the work queue: a work-group member that hands out deliveries,
settles acks in any order, commits the contiguous settled offsets, and gives back what is
left unsettled on close or rebalance.

Delivery marks are pipelined. A background reader fetches up to `_FETCH_RECORDS` records
into the buffer and commits, in one request, the marks past everything buffered; the
next reader starts as soon as fewer than `_FETCH_RECORDS` records are left, so its marks
are written while the records before them are handed out. No record is handed out
before a committed mark covers it, and the buffer never holds more than
``2 * _FETCH_RECORDS - 1`` records. Accuracy after a crash: the records fetched but not
handed out yet, at most ``2 * _FETCH_RECORDS - 1`` (499) per consume block, count one
delivery too many (beside the acked records whose commit had not gone out yet). That is
RabbitMQ's rule: a quorum queue counts every message pushed into a dead consumer's
prefetch buffer as delivered, whether or not the application had taken it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any

from aiokafka import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    ConsumerStoppedError,
)
from aiokafka.errors import (  # type: ignore[import-untyped, unused-ignore]
    CommitFailedError,
    IllegalStateError,
)
from aiokafka.protocol.group import LeaveGroupRequest  # type: ignore[import-untyped, unused-ignore]

from loom_messaging.abc import Delivery
from loom_messaging.envelope import Envelope, decode
from loom_messaging.errors import BrokerUnavailable, InvalidMessage
from loom_messaging.kafka._common import _POLL_MS, DELIVERIES_HEADER, _log, _stop, _translated

if TYPE_CHECKING:
    from loom_messaging.kafka._broker import KafkaBroker

_FETCH_RECORDS = 250  # records per fetch, one marks commit each (a crash window of < 2x)
_COMMIT_DELAY = 0.05  # acks of this window share a commit: a crash redelivers them


def _deliveries(headers: Any) -> int:
    """Deliveries a work record has had before this one (its `x-loom-deliveries`)."""
    for name, value in headers:
        if name == DELIVERIES_HEADER:
            with contextlib.suppress(ValueError):
                return max(0, int(value))
    return 0


class _Entry:
    """A record taken from a partition and not committed past yet."""

    __slots__ = ("delivery_count", "handed", "offset", "partition", "record", "settled")
    partition: _Partition
    record: Any
    offset: int
    delivery_count: int
    handed: bool  # given to the consumer as a Delivery (counts against prefetch)
    settled: bool

    def __init__(self, partition: _Partition, record: Any, delivery_count: int) -> None:
        self.partition, self.record, self.offset = partition, record, record.offset
        self.delivery_count = delivery_count
        self.handed = self.settled = False


@dataclass(eq=False, slots=True)
class _Partition:
    """What one consume block knows of one partition it owns."""

    tp: Any
    abandoned_below: int
    """Its delivery mark when we got it: records below were handed out before us."""
    mark: int
    """Our delivery mark, as committed in the marks group."""
    pending: deque[_Entry] = field(default_factory=deque)  # taken, in offset order
    unsettled: int = 0
    taken_to: int = 0  # one past the last record taken
    position: int | None = None  # the offset to commit: everything before it is settled
    committed: int | None = None
    revoked: bool = False


class _KafkaDelivery(_Entry, Delivery):
    """A record handed out: the delivery is its own entry (one object per message)."""

    __slots__ = ("_consumer", "envelope", "key")

    def __init__(
        self,
        consumer: _WorkConsumer,
        partition: _Partition,
        record: Any,
        delivery_count: int,
        envelope: Envelope,
    ) -> None:
        self.partition, self.record, self.offset = partition, record, record.offset
        self.delivery_count = delivery_count
        self.handed, self.settled = True, False
        self.envelope = envelope
        key = record.key
        self.key = key.decode("utf-8", "replace") if key else ""
        self._consumer = consumer

    async def ack(self) -> None:
        """Returns at once; the commit follows within a round trip. Acking twice, or
        after the consumer gave the message back (it is being delivered again), does
        nothing."""
        self._consumer._settle(self)

    async def dead_letter(self, reason: str) -> None:
        await self._consumer._dead_letter(self, reason)


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

    Fetching and marking run in one background reader at a time (`_read`): it fetches up
    to `_FETCH_RECORDS` records into the buffer, then commits the delivery marks past
    everything buffered. `anext()` starts the next reader as soon as fewer than
    `_FETCH_RECORDS` records are left, so the next batch's marks are written while the
    current batch is handed out; it hands out only a record below its partition's
    committed mark, and waits for the reader otherwise (raising what the reader raised).

    Cancel-safe: fetched records enter the buffer before any other await (in the
    reader, which a cancelled `anext()` does not cancel), and leave it only once taken;
    publishing and settling a taken record is shielded. So a cancelled `anext()` never
    lets a commit pass a record that was not settled.
    """

    def __init__(self, broker: KafkaBroker, prefetch: int) -> None:
        self._broker = broker
        self._queue = broker.queue
        self._prefetch = prefetch
        self._consumer: Any = None
        self._partitions: dict[Any, _Partition] = {}
        # (generation, topic partition, record): a rebalance bumps the generation, and as
        # aiokafka's rebalances are eager (every partition revoked, positions reset to the
        # commits), older records are simply dropped: they will be fetched again.
        self._buffer: deque[tuple[int, Any, Any]] = deque()
        self._fetched_to: dict[Any, int] = {}  # this generation: one past the last buffered
        self._generation = 0
        self._reader: asyncio.Task[None] | None = None  # left here when it failed
        self._marking: asyncio.Task[None] | None = None  # the reader's marks, in flight
        self._outstanding = 0
        self._room = asyncio.Event()  # set when a delivery settles
        self._settled = asyncio.Event()  # set on a settle while `_revoking`
        self._revoking = False
        self._step = asyncio.Lock()  # one record at a time is taken, requeued, given back
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
        self._new_generation()
        self._room.set()
        self._broker._open.discard(self)
        try:
            async with self._step:
                await self._give_back(list(self._partitions.values()))
        finally:
            for task in (self._committer, self._reader):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
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
        buffer = self._buffer
        while True:
            if self._stopping:
                raise StopAsyncIteration
            if self._outstanding >= self._prefetch:
                self._room.clear()
                await self._room.wait()
                continue
            generation = self._generation
            while buffer and buffer[0][0] != generation:
                buffer.popleft()
            if not buffer:
                await self._wait_for_reader()
                continue
            _, tp, record = buffer[0]
            partition = self._partitions.get(tp)
            if partition is None or record.offset >= partition.mark:
                await self._wait_for_reader()  # it is writing the mark past the record
                continue
            if not self._step.locked() and record.offset >= partition.abandoned_below:
                # The common case, with no await from the checks to the hand-out, so
                # nothing that takes `_step` (a rebalance, close) can come in between.
                try:
                    envelope = decode(record.value or b"")
                except InvalidMessage:
                    pass  # dead-lettered below, under `_step`
                else:
                    buffer.popleft()
                    if self._reader is None and len(buffer) < _FETCH_RECORDS:
                        self._read_ahead()  # its marks are written while we hand out
                    return self._hand_out(partition, record, envelope)
            async with self._step:
                if self._stopping or not buffer or buffer[0][2] is not record:
                    continue  # things moved while we waited for the lock
                if record.offset >= partition.mark or generation != self._generation:
                    continue
                buffer.popleft()
                if self._reader is None and len(buffer) < _FETCH_RECORDS:
                    self._read_ahead()
                delivery = await self._take(partition, record)
            if delivery is not None:
                return delivery

    def _read_ahead(self) -> asyncio.Task[None]:
        reader = self._reader = asyncio.create_task(self._read())
        return reader

    async def _wait_for_reader(self) -> None:
        """Waits for the reader (starting one if none runs) to fetch and mark more
        records. Raises what it raised; our cancellation leaves it running."""
        reader = self._reader or self._read_ahead()
        await asyncio.wait((reader,))
        if self._reader is reader:
            self._reader = None  # a failed reader is replaced by the next wait
        if not reader.cancelled() and (exc := reader.exception()) is not None:
            raise exc

    async def _read(self) -> None:
        """The reader: fetches up to `_FETCH_RECORDS` records into the buffer (waiting up
        to a poll for some) unless it holds that many already, then commits delivery
        marks past everything buffered, for every partition met so far (reading first
        the mark of a partition met for the first time). So the buffer never holds more
        than ``2 * _FETCH_RECORDS - 1`` records. Clears `_reader` when it succeeds; a
        failure stays for a waiter to raise."""
        batch: dict[Any, list[Any]] = {}
        if len(self._buffer) < _FETCH_RECORDS:
            try:
                with _translated("consuming the work queue"):
                    batch = await self._consumer.getmany(
                        timeout_ms=_POLL_MS, max_records=_FETCH_RECORDS
                    )
            except ConsumerStoppedError:
                self._stopping = True
                self._room.set()
        # aiokafka returns only records of the assignment active now (waiting while a
        # rebalance is under way), and a rebalance bumps the generation before it
        # assigns: so they belong to the current generation, even when the fetch began
        # before a rebalance (dropping them would skip them: the position has moved past
        # them). No await from here to the buffer: nothing fetched is lost.
        generation = self._generation
        if not self._stopping:
            buffer, fetched_to = self._buffer, self._fetched_to
            for tp, records in batch.items():
                buffer.extend(zip(repeat(generation), repeat(tp), records))
                fetched_to[tp] = records[-1].offset + 1
            self._marking = asyncio.ensure_future(self._mark(generation))
            await self._marking
        if self._reader is asyncio.current_task():
            self._reader = None

    async def _mark(self, generation: int) -> None:
        """Commits, in one request, a delivery mark past every buffered record of this
        generation, so that a crash is counted. The marks are raised only once committed:
        no record is handed out before its mark is."""
        partitions = self._partitions
        for tp in [tp for tp in self._fetched_to if tp not in partitions]:
            mark = await self._queue._read_mark(tp)
            if generation != self._generation:
                return
            partitions[tp] = _Partition(tp, mark, mark)
        if generation != self._generation:
            return
        marks = {
            partitions[tp]: end
            for tp, end in self._fetched_to.items()
            if tp in partitions and end > partitions[tp].mark
        }
        if marks:
            await self._queue._write_marks({p.tp: end for p, end in marks.items()})
            for partition, end in marks.items():
                partition.mark = max(partition.mark, end)

    def _new_generation(self) -> None:
        """Makes everything fetched so far stale (a rebalance or close)."""
        self._generation += 1
        self._fetched_to.clear()

    def _hand_out(self, partition: _Partition, record: Any, envelope: Envelope) -> Delivery:
        """The delivery of a taken record that decoded, counted against the prefetch."""
        headers = record.headers
        count = _deliveries(headers) + 1 if headers else 1
        delivery = _KafkaDelivery(self, partition, record, count, envelope)
        partition.pending.append(delivery)
        partition.unsettled += 1
        partition.taken_to = delivery.offset + 1
        self._outstanding += 1
        return delivery

    async def _take(self, partition: _Partition, record: Any) -> Delivery | None:
        """With `_step` held: the delivery for `record`, or None when it was requeued
        (handed out before us) or dead-lettered (it does not decode)."""
        if record.offset >= partition.abandoned_below:
            try:
                envelope = decode(record.value or b"")
            except InvalidMessage as exc:
                reason: str | None = str(exc)
            else:
                return self._hand_out(partition, record, envelope)
        else:
            # Handed out before by a consumer that died without settling it: that was a
            # delivery, so it goes back with its count (or to the dead letters).
            reason = None
        entry = _Entry(partition, record, _deliveries(record.headers or ()) + 1)
        partition.pending.append(entry)
        partition.unsettled += 1
        partition.taken_to = entry.offset + 1
        await asyncio.shield(self._resolve(entry, reason))
        return None

    async def _resolve(self, entry: _Entry, reason: str | None) -> None:
        """Dead-letters a taken record with `reason`, or gives it back (reason None),
        then settles it."""
        if reason is None:
            await self._queue._give_back(entry.record, entry.delivery_count)
        else:
            await self._queue._dead_letter(entry.record, reason, entry.delivery_count)
        self._settle(entry)

    def _settle(self, entry: _Entry) -> bool:
        """Marks a taken record settled and moves its partition's commit position over
        every settled record at its head. False if it was settled already, or given back
        in a rebalance."""
        partition = entry.partition
        if entry.settled or partition.revoked:
            return False
        entry.settled = True
        partition.unsettled -= 1
        if entry.handed:
            self._outstanding -= 1
            self._room.set()
        pending = partition.pending
        while pending and pending[0].settled:
            partition.position = pending.popleft().offset + 1
        if self._revoking:
            self._settled.set()
        self._commit_wanted.set()
        return True

    async def _dead_letter(self, entry: _Entry, reason: str) -> None:
        async with self._step:  # not given back by a rebalance while it is dead-lettered
            if entry.settled or entry.partition.revoked:
                _log.info("dead_letter after the message was given back: ignored")
                return
            await asyncio.shield(self._resolve(entry, reason))

    async def _revoked(self, revoked: set[Any]) -> None:
        """A rebalance takes `revoked` away: wait up to a grace for the pending acks,
        give back the rest, commit, and forget those partitions."""
        self._new_generation()
        grace = self._broker.session_timeout_ms / 4000
        self._revoking = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    while any(p.unsettled for tp, p in self._partitions.items() if tp in revoked):
                        self._settled.clear()
                        await self._settled.wait()
        finally:
            self._revoking = False
        async with self._step:
            partitions = [p for tp, p in self._partitions.items() if tp in revoked]
            try:
                await self._give_back(partitions)
            finally:
                for partition in partitions:
                    del self._partitions[partition.tp]
                    partition.revoked = True
                    for entry in partition.pending:  # left for the next owner
                        if entry.handed and not entry.settled:
                            self._outstanding -= 1
                    partition.pending.clear()
                self._room.set()

    async def _give_back(self, partitions: list[_Partition]) -> None:
        """With `_step` held: requeues (or dead-letters) every unsettled record of
        `partitions`, commits, and lowers the delivery marks to what was taken. A broker
        failure is logged: those records stay uncommitted, and their next owner counts
        them by the marks."""
        marking = self._marking
        if marking is not None:  # its commit must not land after ours, raising them again
            await asyncio.wait((marking,))
        try:
            for partition in partitions:
                for entry in list(partition.pending):
                    if not entry.settled:
                        await self._resolve(entry, None)
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
