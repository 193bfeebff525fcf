"""The contract suite: every test runs against every backend (memory, RabbitMQ, Kafka)
through the `broker` / `broker_factory` fixtures, each with its own prefix.

Rules for these tests, so they hold on real brokers: timeouts are generous, nothing is
asserted after a sleep (we wait for conditions), and a subscription counts as ready once
its `async with` block has been entered — the backends make that true.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import orjson
import pytest

from loom_messaging import (
    Broker,
    BrokerUnavailable,
    DeadLetter,
    Delivery,
    Envelope,
    InvalidMessage,
    decode,
    encode,
)

BrokerFactory = Callable[[], Awaitable[Broker]]

TIMEOUT = 30


def requested(n: int | str) -> tuple[bytes, str]:
    """An `execution.requested` body and its key (the execution id)."""
    execution_id = f"exec-{n}"
    return encode("execution.requested", {"execution_id": execution_id, "graph": "g"}), execution_id


def node_status(execution_id: str, index: int) -> bytes:
    return encode(
        "node.status",
        {
            "execution_id": execution_id,
            "node": "build",
            "index": index,
            "status": "running",
            "attempt": 1,
            "ts": "2025-01-01T00:00:00Z",
        },
    )


def cancel(execution_id: str) -> bytes:
    return encode("execution.cancel", {"execution_id": execution_id, "by": "alice"})


def invalid_reason(body: bytes) -> str:
    """What `decode` says about a body it refuses: the dead letter's reason names it."""
    with pytest.raises(InvalidMessage) as caught:
        decode(body)
    return str(caught.value)


async def wait_for_dead_letters(broker: Broker, count: int) -> list[DeadLetter]:
    """The dead letters, once there are at least `count` of them."""
    while True:
        letters = await broker.queue.dead_letters()
        if len(letters) >= count:
            return letters
        await asyncio.sleep(0.05)


# -- round trips ---------------------------------------------------------------------


async def test_work_queue_round_trip(broker: Broker) -> None:
    body, key = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, key)
        async with broker.queue.consume() as deliveries:
            delivery = await anext(deliveries)
            assert delivery.envelope == decode(body)
            assert delivery.key == key
            assert delivery.delivery_count == 1
            await delivery.ack()


async def test_event_stream_round_trip(broker: Broker) -> None:
    body = node_status("exec-1", 0)
    async with asyncio.timeout(TIMEOUT), broker.events.subscribe() as events:
        await broker.events.publish(body, "exec-1")
        assert await anext(events) == decode(body)


async def test_control_round_trip(broker: Broker) -> None:
    body = cancel("exec-1")
    async with asyncio.timeout(TIMEOUT), broker.control.subscribe() as messages:
        await broker.control.broadcast(body, "exec-1")
        assert await anext(messages) == decode(body)


async def test_publish_batch_delivers_every_message(broker: Broker) -> None:
    batch = [requested(n) for n in range(50)]
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish_batch(batch)
        seen: dict[str, str] = {}
        async with broker.queue.consume() as deliveries:
            async for delivery in deliveries:
                seen[delivery.envelope.id] = delivery.key
                await delivery.ack()
                if len(seen) == len(batch):
                    break
    assert seen == {decode(body).id: key for body, key in batch}


# -- the work queue ------------------------------------------------------------------


async def test_acked_message_is_not_delivered_again(broker: Broker) -> None:
    first, key = requested(1)
    second = encode("execution.requested", {"execution_id": key, "graph": "g"})
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(first, key)
        async with broker.queue.consume() as deliveries:
            delivery = await anext(deliveries)
            await delivery.ack()
        # Same key, so both sit in one partition on Kafka: a redelivered `first` would
        # come before `second`.
        await broker.queue.publish(second, key)
        async with broker.queue.consume() as deliveries:
            delivery = await anext(deliveries)
            assert delivery.envelope == decode(second)
            assert delivery.delivery_count == 1
            await delivery.ack()


async def test_unacked_message_is_redelivered_when_its_consumer_dies(
    broker: Broker, broker_factory: BrokerFactory
) -> None:
    """A worker process dies (its connection closes) after receiving, before acking: another
    worker gets the message, marked as a redelivery."""
    body, key = requested(1)
    dying = await broker_factory()
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, key)
        async with dying.queue.consume() as deliveries:
            first = await anext(deliveries)
            assert first.delivery_count == 1
            await dying.close()
        async with broker.queue.consume() as deliveries:
            again = await anext(deliveries)
            assert again.envelope == first.envelope
            assert again.key == key
            assert again.delivery_count == 2
            await again.ack()


async def test_unacked_message_is_redelivered_when_its_consumer_leaves(broker: Broker) -> None:
    body, key = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, key)
        async with broker.queue.consume() as deliveries:
            first = await anext(deliveries)
        async with broker.queue.consume() as deliveries:
            again = await anext(deliveries)
            assert again.envelope == first.envelope
            assert again.delivery_count == 2
            await again.ack()


async def test_competing_consumers_each_get_different_messages(
    broker: Broker, broker_factory: BrokerFactory
) -> None:
    """Two worker processes on one queue: every acked message reaches exactly one."""
    other = await broker_factory()
    batch = [requested(n) for n in range(60)]
    received: list[tuple[str, str]] = []
    everything = asyncio.Event()

    async def work(name: str, deliveries: AsyncIterator[Delivery]) -> None:
        async for delivery in deliveries:
            received.append((name, delivery.envelope.id))
            await delivery.ack()
            if len({envelope_id for _, envelope_id in received}) == len(batch):
                everything.set()

    async with asyncio.timeout(TIMEOUT), AsyncExitStack() as stack:
        # Both consumers are in place before anything is published (on Kafka: the group
        # has settled, so no rebalance happens mid-test).
        mine = await stack.enter_async_context(broker.queue.consume())
        theirs = await stack.enter_async_context(other.queue.consume())
        async with asyncio.TaskGroup() as tasks:
            workers = [tasks.create_task(work("a", mine)), tasks.create_task(work("b", theirs))]
            await broker.queue.publish_batch(batch)
            await everything.wait()
            for worker in workers:
                worker.cancel()
    ids = [envelope_id for _, envelope_id in received]
    assert len(ids) == len(set(ids)), "a message reached two consumers"
    assert set(ids) == {decode(body).id for body, _ in batch}


async def test_message_never_acked_is_dead_lettered_after_max_deliveries(broker: Broker) -> None:
    """The fixture's brokers allow 3 deliveries; the reason says what happened, and
    replay puts the message back on the queue."""
    body, key = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, key)
        for attempt in (1, 2, 3):
            async with broker.queue.consume(prefetch=1) as deliveries:
                delivery = await anext(deliveries)
                assert delivery.delivery_count == attempt
                # leaves without an ack, as a crashing worker would
        [letter] = await wait_for_dead_letters(broker, 1)
        assert letter.body == body
        assert letter.key == key
        assert "3 times without an ack" in letter.reason

        await broker.queue.replay(letter.id)
        assert letter.id not in {dead.id for dead in await broker.queue.dead_letters()}
        async with broker.queue.consume() as deliveries:
            replayed = await anext(deliveries)
            assert replayed.envelope == decode(body)
            assert replayed.key == key
            assert replayed.delivery_count == 1
            await replayed.ack()


async def test_consumer_can_dead_letter_a_delivery_with_its_reason(broker: Broker) -> None:
    body, key = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, key)
        async with broker.queue.consume() as deliveries:
            delivery = await anext(deliveries)
            await delivery.dead_letter("graph 'g' does not exist")
        [letter] = await wait_for_dead_letters(broker, 1)
    assert (letter.body, letter.key, letter.reason) == (body, key, "graph 'g' does not exist")


async def test_replay_of_an_unknown_dead_letter_is_a_lookup_error(broker: Broker) -> None:
    with pytest.raises(LookupError):
        await broker.queue.replay("no-such-dead-letter")


async def test_malformed_work_messages_are_dead_lettered_not_delivered(broker: Broker) -> None:
    """Not JSON, an unknown type, an unknown version: each goes to the dead letters with a
    reason naming the problem, and the consumer only ever sees the good message."""
    good, key = requested(1)
    malformed = {
        b"this is {not JSON": "not JSON",
        orjson.dumps(
            {"type": "no.such", "version": 1, "id": "x", "ts": "t", "trace": {}, "data": {}}
        ): "unknown message type 'no.such'",
        orjson.dumps(
            {
                "type": "execution.requested",
                "version": 99,
                "id": "y",
                "ts": "t",
                "trace": {},
                "data": {"execution_id": key, "graph": "g"},
            }
        ): "unsupported version 99",
    }
    delivered: list[Envelope] = []
    got_one = asyncio.Event()

    async def consume(deliveries: AsyncIterator[Delivery]) -> None:
        async for delivery in deliveries:
            delivered.append(delivery.envelope)
            got_one.set()
            await delivery.ack()

    async with asyncio.timeout(TIMEOUT), broker.queue.consume() as deliveries:
        await broker.queue.publish_batch([*((body, key) for body in malformed), (good, key)])
        reader = asyncio.create_task(consume(deliveries))
        try:
            letters = await wait_for_dead_letters(broker, len(malformed))
            await got_one.wait()
        finally:
            reader.cancel()
    assert delivered == [decode(good)]
    reasons = {letter.body: letter.reason for letter in letters}
    assert set(reasons) == set(malformed)
    for body, problem in malformed.items():
        assert problem in reasons[body]
        assert invalid_reason(body) in reasons[body]
    assert {letter.key for letter in letters} == {key}


# -- the event stream ----------------------------------------------------------------


async def test_events_of_one_key_arrive_in_publish_order(broker: Broker) -> None:
    """10,000 events over 10 executions, published in batches, interleaved: each
    execution's events reach the subscriber in the order they were published."""
    keys = [f"exec-{k}" for k in range(10)]
    total = 10_000
    events = [(node_status(keys[n % 10], n // 10), keys[n % 10]) for n in range(total)]
    seen: dict[str, list[int]] = defaultdict(list)

    async with asyncio.timeout(2 * TIMEOUT), broker.events.subscribe() as stream:

        async def read() -> None:
            count = 0
            async for envelope in stream:
                seen[envelope.data["execution_id"]].append(envelope.data["index"])
                count += 1
                if count == total:
                    return

        reader = asyncio.create_task(read())
        for start in range(0, total, 500):
            await broker.events.publish_batch(events[start : start + 500])
        await reader
    assert sorted(seen) == keys
    for key in keys:
        assert seen[key] == list(range(total // 10)), f"{key} out of order"


async def test_every_event_subscriber_gets_every_event(
    broker: Broker, broker_factory: BrokerFactory
) -> None:
    body = node_status("exec-1", 0)
    others = [await broker_factory() for _ in range(2)]
    async with asyncio.timeout(TIMEOUT), AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(b.events.subscribe()) for b in others]
        await broker.events.publish(body, "exec-1")
        for stream in streams:
            assert await anext(stream) == decode(body)


async def test_event_subscription_starts_from_now(broker: Broker) -> None:
    before, after = node_status("exec-1", 0), node_status("exec-1", 1)
    async with asyncio.timeout(TIMEOUT):
        await broker.events.publish(before, "exec-1")
        async with broker.events.subscribe() as stream:
            await broker.events.publish(after, "exec-1")
            assert await anext(stream) == decode(after)


async def test_malformed_events_are_skipped(broker: Broker) -> None:
    good = node_status("exec-1", 0)
    unknown = orjson.dumps(
        {"type": "no.such", "version": 1, "id": "x", "ts": "t", "trace": {}, "data": {}}
    )
    async with asyncio.timeout(TIMEOUT), broker.events.subscribe() as stream:
        # One key: on Kafka all three share a partition, so the bad ones come first.
        await broker.events.publish_batch([(b"{not JSON", "exec-1"), (unknown, "exec-1")])
        await broker.events.publish(good, "exec-1")
        assert await anext(stream) == decode(good)


# -- control -------------------------------------------------------------------------


async def test_broadcast_reaches_three_subscribers(
    broker: Broker, broker_factory: BrokerFactory
) -> None:
    """Three processes (a worker, a timer, another worker) each hear a cancel."""
    body = cancel("exec-1")
    listeners = [await broker_factory() for _ in range(3)]
    async with asyncio.timeout(TIMEOUT), AsyncExitStack() as stack:
        subscriptions = [await stack.enter_async_context(b.control.subscribe()) for b in listeners]
        await broker.control.broadcast(body, "exec-1")
        for subscription in subscriptions:
            assert await anext(subscription) == decode(body)


async def test_control_subscription_starts_from_now(broker: Broker) -> None:
    before, after = cancel("exec-1"), cancel("exec-2")
    async with asyncio.timeout(TIMEOUT):
        await broker.control.broadcast(before, "exec-1")
        async with broker.control.subscribe() as messages:
            await broker.control.broadcast(after, "exec-2")
            assert await anext(messages) == decode(after)


# -- lifecycle -----------------------------------------------------------------------


async def test_ping_succeeds_on_a_started_broker(broker: Broker) -> None:
    async with asyncio.timeout(TIMEOUT):
        await broker.ping()


async def test_close_is_idempotent_and_ping_then_fails(broker_factory: BrokerFactory) -> None:
    other = await broker_factory()
    async with asyncio.timeout(TIMEOUT):
        await other.close()
        await other.close()
        with pytest.raises(BrokerUnavailable):
            await other.ping()
