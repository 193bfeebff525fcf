"""What only the memory backend promises: one broker per URL in a process, prefixes kept
apart, bounded subscriber buffers, prefetch, and an import that needs no driver."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

import loom_messaging
from loom_messaging import Broker, BrokerUnavailable, decode, encode, open_broker
from loom_messaging.memory import MemoryBroker

TIMEOUT = 10

T = TypeVar("T")


async def next_of(iterator: AsyncIterator[T]) -> T:
    """`anext` as a coroutine, for `create_task`."""
    return await anext(iterator)


def requested(n: int) -> tuple[bytes, str]:
    return encode("execution.requested", {"execution_id": f"exec-{n}", "graph": "g"}), f"exec-{n}"


def event(index: int) -> bytes:
    return encode(
        "execution.status",
        {"execution_id": "exec-1", "graph": "g", "status": str(index), "ts": "t"},
    )


@pytest.fixture
def url() -> str:
    return f"memory://test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def broker(url: str) -> AsyncIterator[Broker]:
    async with open_broker(url, prefix="loom", max_deliveries=3) as started:
        yield started


async def test_same_url_in_one_process_is_the_same_broker(url: str, broker: Broker) -> None:
    body, key = requested(1)
    await broker.queue.publish(body, key)
    async with open_broker(url, prefix="loom") as other, asyncio.timeout(TIMEOUT):
        async with other.queue.consume() as deliveries:
            delivery = await anext(deliveries)
            assert delivery.envelope == decode(body)
            await delivery.ack()


async def test_messages_outlive_the_broker_object_that_published_them(url: str) -> None:
    """Like a server: closing a connection does not lose what it published."""
    body, key = requested(1)
    async with open_broker(url, prefix="loom") as publisher:
        await publisher.queue.publish(body, key)
    async with open_broker(url, prefix="loom") as consumer, asyncio.timeout(TIMEOUT):
        async with consumer.queue.consume() as deliveries:
            assert (await anext(deliveries)).envelope == decode(body)


async def test_another_url_is_another_broker(broker: Broker) -> None:
    mine, theirs = requested(1), requested(2)
    await broker.queue.publish(*mine)
    async with open_broker(f"memory://other-{uuid.uuid4().hex[:8]}", prefix="loom") as other:
        await other.queue.publish(*theirs)
        async with asyncio.timeout(TIMEOUT), other.queue.consume() as deliveries:
            assert (await anext(deliveries)).envelope == decode(theirs[0])


async def test_prefixes_on_one_url_do_not_see_each_other(url: str, broker: Broker) -> None:
    mine, theirs = requested(1), requested(2)
    await broker.queue.publish(*mine)
    async with open_broker(url, prefix="other") as other, asyncio.timeout(TIMEOUT):
        await other.queue.publish(*theirs)
        async with other.queue.consume() as deliveries:
            assert (await anext(deliveries)).envelope == decode(theirs[0])
        async with (
            broker.control.subscribe() as mine_control,
            other.control.subscribe() as theirs_control,
        ):
            await other.control.broadcast(encode("graph.changed", {"graph": "a"}))
            await broker.control.broadcast(body := encode("graph.changed", {"graph": "b"}))
            assert await anext(mine_control) == decode(body)
            assert (await anext(theirs_control)).data == {"graph": "a"}


async def test_slow_subscriber_drops_the_oldest_events_with_a_warning(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that falls `subscriber_buffer` events behind loses the oldest ones, so
    memory stays bounded; it then sees the newest, in order."""
    async with MemoryBroker(url, prefix="loom", max_deliveries=3, subscriber_buffer=5) as broker:
        async with asyncio.timeout(TIMEOUT), broker.events.subscribe() as stream:
            with caplog.at_level(logging.WARNING, logger="loom.messaging.memory"):
                await broker.events.publish_batch([(event(i), "exec-1") for i in range(8)])
            assert [(await anext(stream)).data["status"] for _ in range(5)] == [
                "3",
                "4",
                "5",
                "6",
                "7",
            ]
            assert "dropping the oldest (1 dropped so far)" in caplog.text
            assert len(caplog.records) == 1, "one warning per episode, not per event"
            await broker.events.publish(event(8), "exec-1")
            assert (await anext(stream)).data["status"] == "8"


async def test_consumer_holding_prefetch_deliveries_gets_no_more(broker: Broker) -> None:
    """With prefetch=1, a consumer holding an unacked delivery leaves the next message to
    another consumer, and takes more once it acks."""
    first, second, third = requested(1), requested(2), requested(3)
    await broker.queue.publish(*first)
    async with asyncio.timeout(TIMEOUT):
        async with (
            broker.queue.consume(prefetch=1) as busy,
            broker.queue.consume(prefetch=1) as idle,
        ):
            held = await anext(busy)
            wanting = asyncio.create_task(next_of(busy))  # waits before the idle one does
            await asyncio.sleep(0)
            await broker.queue.publish(*second)
            assert (await anext(idle)).envelope == decode(second[0])
            await held.ack()
            await broker.queue.publish(*third)
            assert (await wanting).envelope == decode(third[0])


async def test_closing_the_broker_ends_its_consumers_and_subscribers(broker: Broker) -> None:
    async with asyncio.timeout(TIMEOUT):
        async with broker.queue.consume() as deliveries, broker.events.subscribe() as stream:
            waiting: list[asyncio.Task[object]] = [
                asyncio.create_task(next_of(deliveries)),
                asyncio.create_task(next_of(stream)),
            ]
            await asyncio.sleep(0)
            await broker.close()
            for task in waiting:
                with pytest.raises(StopAsyncIteration):
                    await task


async def test_a_closed_or_unstarted_broker_is_unavailable(url: str) -> None:
    broker = open_broker(url, prefix="loom")
    with pytest.raises(BrokerUnavailable, match="not started"):
        await broker.ping()
    with pytest.raises(BrokerUnavailable):
        await broker.queue.publish(*requested(1))
    async with broker:
        await broker.ping()
    with pytest.raises(BrokerUnavailable):
        await broker.events.publish(event(1), "exec-1")


async def test_ack_after_leaving_the_consume_block_changes_nothing(broker: Broker) -> None:
    """The message was already put back; a late ack must not lose it."""
    body, key = requested(1)
    await broker.queue.publish(body, key)
    async with asyncio.timeout(TIMEOUT):
        async with broker.queue.consume() as deliveries:
            late = await anext(deliveries)
        await late.ack()
        async with broker.queue.consume() as deliveries:
            assert (await anext(deliveries)).delivery_count == 2


def test_public_names_are_pinned() -> None:
    assert loom_messaging.__all__ == [
        "LOG_BATCH_MAX_BYTES",
        "MAX_MESSAGE_BYTES",
        "Broker",
        "BrokerUnavailable",
        "Control",
        "DeadLetter",
        "Delivery",
        "Envelope",
        "EventStream",
        "InvalidMessage",
        "MessagingError",
        "UnsupportedURL",
        "WorkQueue",
        "check_broker",
        "decode",
        "encode",
        "open_broker",
    ]


def test_memory_broker_imports_no_driver() -> None:
    """`loom up` on memory:// must not pay for (or need) aio-pika and aiokafka."""
    code = (
        "import sys, loom_messaging\n"
        "loom_messaging.open_broker('memory://x', prefix='p')\n"
        "loaded = {'aio_pika', 'aiormq', 'aiokafka'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
