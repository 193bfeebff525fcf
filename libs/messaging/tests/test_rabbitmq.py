"""What only the RabbitMQ backend promises, against a PRIVATE RabbitMQ node that these
tests start (and stop, and kill) themselves — never the shared broker (DESIGN §14).

The node starts once per session (4–8 s). Without `rabbitmq-server` these tests are
skipped, unless LOOM_TEST_REQUIRE_SERVICES=1, where that fails. The contract suite runs
the shared behaviour against the shared broker (LOOM_TEST_AMQP_URL)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import aiormq
import pytest

from loom_messaging import (
    Broker,
    BrokerUnavailable,
    DeadLetter,
    Delivery,
    MessagingError,
    decode,
    encode,
    open_broker,
)
from loom_messaging import testing as rabbit_node
from loom_messaging.rabbitmq import RabbitBroker, delete_prefix

TIMEOUT = 60


def requested(n: int | str) -> tuple[bytes, str]:
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


@pytest.fixture(scope="session")
def node() -> Iterator[Any]:
    """One private node for the session; a test that stops it starts it again."""
    installed = rabbit_node.rabbitmq_installed()
    if not installed or os.geteuid() != 0:
        why = (
            "needs root (the node runs as user rabbitmq)"
            if installed
            else "rabbitmq-server is not installed"
        )
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{why} and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip(f"{why}: private RabbitMQ node tests skipped")
    private = rabbit_node.RabbitNode()
    try:
        private.start()
        yield private
    finally:
        private.remove()


@pytest.fixture
def prefix() -> str:
    return f"loomtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def brokers(node: Any, prefix: str) -> AsyncIterator[Any]:
    """Started brokers on the private node, one per "process", sharing the test's prefix
    (`await brokers(max_deliveries=2)`); closed after the test."""
    await asyncio.to_thread(node.ensure_started)
    opened: list[RabbitBroker] = []

    async def make(max_deliveries: int = 5, **options: Any) -> RabbitBroker:
        broker = RabbitBroker(
            node.url,
            prefix=prefix,
            max_deliveries=max_deliveries,
            **options,
        )
        await broker.start()
        opened.append(broker)
        return broker

    yield make
    for broker in opened:
        await broker.close()
    await delete_prefix(node.url, prefix)


async def until_published(broker: Broker, body: bytes, key: str) -> int:
    """Publish, retrying while the broker is unavailable; how many attempts failed."""
    failed = 0
    while True:
        try:
            await broker.queue.publish(body, key)
            return failed
        except BrokerUnavailable:
            failed += 1
            await asyncio.sleep(0.05)


async def wait_for_dead_letters(broker: Broker, count: int) -> list[DeadLetter]:
    while True:
        letters = await broker.queue.dead_letters()
        if len(letters) >= count:
            return letters
        await asyncio.sleep(0.05)


async def next_of(iterator: AsyncIterator[Any]) -> Any:
    return await anext(iterator)


async def restart(node: Any, how: str) -> float:
    """Stop (cleanly, or SIGKILL) and start the node; returns the time it came back."""
    await asyncio.to_thread(node.stop if how == "stop" else node.kill)
    await asyncio.to_thread(node.start)
    return time.monotonic()


# -- restarts ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_broker_restart_during_publishing_and_consuming_loses_no_confirmed_message(
    node: Any, brokers: Any, how: str
) -> None:
    """2,000 messages published one by one with confirms (retried while the broker is
    away) while another connection consumes; the node is stopped — or killed — and
    started mid-way. Every confirmed message arrives at least once."""
    publisher: RabbitBroker = await brokers()
    worker: RabbitBroker = await brokers()
    total = 2_000
    confirmed: set[str] = set()
    received: set[str] = set()
    everything = asyncio.Event()
    a_quarter_confirmed = asyncio.Event()
    first_delivery_after: list[float] = []
    restarted_at: list[float] = []
    if how == "kill":
        await asyncio.sleep(2)  # a quorum queue killed within ~1 s of its declaration can be lost

    async def consume() -> None:
        async with worker.queue.consume(prefetch=50) as deliveries:
            async for delivery in deliveries:
                if restarted_at and not first_delivery_after:
                    first_delivery_after.append(time.monotonic() - restarted_at[0])
                received.add(delivery.key)
                try:
                    await delivery.ack()
                except BrokerUnavailable:
                    pass  # the connection went: RabbitMQ delivers it again
                if len(confirmed) == total and confirmed <= received:
                    everything.set()

    async def bounce() -> None:
        await a_quarter_confirmed.wait()
        restarted_at.append(await restart(node, how))

    async with asyncio.timeout(4 * TIMEOUT), asyncio.TaskGroup() as tasks:
        consumer = tasks.create_task(consume())
        bouncer = tasks.create_task(bounce())
        published_again_at: list[float] = []
        for n in range(total):
            body, key = requested(n)
            if await until_published(publisher, body, key) and not published_again_at:
                published_again_at.append(time.monotonic())
            confirmed.add(key)
            if len(confirmed) == total // 4:
                a_quarter_confirmed.set()
        await bouncer
        if confirmed <= received:
            everything.set()
        await everything.wait()
        consumer.cancel()
    assert confirmed <= received
    print(  # the recovery times, for the closing note
        f"\n[{how}] node accepting connections -> first confirmed publish after "
        f"{published_again_at[0] - restarted_at[0]:.2f} s, first delivery after "
        f"{first_delivery_after[0]:.2f} s"
    )


async def test_consuming_and_subscriptions_resume_after_a_restart_by_themselves(
    node: Any, brokers: Any
) -> None:
    """A worker's `consume` block and a websocket's `subscribe` block stay open across a
    restart: no re-subscribing. While the node is down, publish and ping fail at once
    with BrokerUnavailable; a delivery held across the restart cannot be acked any more
    and is delivered again."""
    broker: RabbitBroker = await brokers()
    spare: RabbitBroker = await brokers()
    before, key = requested("before")
    after, _ = requested("after")
    async with asyncio.timeout(2 * TIMEOUT), AsyncExitStack() as stack:
        deliveries = await stack.enter_async_context(broker.queue.consume())
        events = await stack.enter_async_context(broker.events.subscribe())
        control = await stack.enter_async_context(broker.control.subscribe())
        await broker.queue.publish(before, key)
        held = await anext(deliveries)
        assert held.delivery_count == 1

        await asyncio.to_thread(node.stop)
        began = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await broker.queue.publish(after, key)
        with pytest.raises(BrokerUnavailable):
            await broker.events.publish(node_status("exec-1", 0), "exec-1")
        with pytest.raises(BrokerUnavailable):
            await broker.ping()
        await spare.close()
        # Generous (the machine is shared): what matters is not waiting out the 10 s timeout.
        assert time.monotonic() - began < 8, "an outage must stall neither publishers nor close"

        await asyncio.to_thread(node.start)
        back = time.monotonic()
        await until_published(broker, after, key)
        published_after = time.monotonic() - back
        with pytest.raises(BrokerUnavailable):
            await held.ack()
        again = await anext(deliveries)
        print(
            f"\n[resume] node accepting connections -> publish confirmed after "
            f"{published_after:.2f} s, the held message delivered again after "
            f"{time.monotonic() - back:.2f} s"
        )
        assert (again.envelope, again.delivery_count) == (held.envelope, 2)
        await again.ack()
        assert (await anext(deliveries)).envelope == decode(after)
        await broker.ping()

        # The subscribers' exclusive queues are declared again by the reconnection in its
        # own time, and events are news (lost while no queue exists): publish until one
        # arrives, as a live system simply keeps publishing.
        event = node_status("exec-1", 1)
        cancel = encode("execution.cancel", {"execution_id": "exec-1", "by": "alice"})
        assert await until_received(
            lambda: broker.events.publish(event, "exec-1"), events
        ) == decode(event)
        assert await until_received(
            lambda: broker.control.broadcast(cancel, "exec-1"), control
        ) == decode(cancel)


async def until_received(publish: Any, stream: Any) -> Any:
    """Publish (again every half second) until the subscription yields something."""
    while True:
        await publish()
        try:
            async with asyncio.timeout(0.5):
                return await anext(stream)
        except TimeoutError:
            continue


# -- the work queue on RabbitMQ --------------------------------------------------------


async def test_delivery_limit_dead_letters_with_the_reason_and_keeps_them(brokers: Any) -> None:
    """Workers that die holding a message (their connections close): RabbitMQ's delivery
    limit moves it to the dead letters after `max_deliveries`, with the reason; listing
    the dead letters leaves them there, and replay makes it new work."""
    broker: RabbitBroker = await brokers(max_deliveries=2)
    body, key = requested(1)
    began = datetime.now(UTC)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, key)
        for attempt in (1, 2):
            dying: RabbitBroker = await brokers(max_deliveries=2)
            async with dying.queue.consume(prefetch=1) as deliveries:
                assert (await anext(deliveries)).delivery_count == attempt
                await dying.close()
        [letter] = await wait_for_dead_letters(broker, 1)
        assert (letter.body, letter.key) == (body, key)
        assert letter.reason == "delivered 2 times without an ack"
        assert began - timedelta(seconds=2) <= letter.at <= datetime.now(UTC) + timedelta(seconds=2)
        assert await broker.queue.dead_letters() == [letter], "listing must not consume"

        await broker.queue.replay(letter.id)
        assert await broker.queue.dead_letters() == []
        async with broker.queue.consume() as deliveries:
            replayed = await anext(deliveries)
            assert (replayed.envelope, replayed.key, replayed.delivery_count) == (
                decode(body),
                key,
                1,
            )
            await replayed.ack()


async def test_dead_letters_are_listed_oldest_first_up_to_the_limit(brokers: Any) -> None:
    broker: RabbitBroker = await brokers()
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish_batch([requested(n) for n in range(5)])
        async with broker.queue.consume(prefetch=5) as deliveries:
            for n in range(5):
                await (await anext(deliveries)).dead_letter(f"reason {n}")
        assert [letter.reason for letter in await broker.queue.dead_letters(limit=3)] == [
            "reason 0",
            "reason 1",
            "reason 2",
        ]
        assert len(await broker.queue.dead_letters()) == 5


async def test_a_delivery_held_past_the_consumer_timeout_comes_back_to_the_same_block(
    brokers: Any,
) -> None:
    """The private node's consumer timeout is 5 s (production: 30 min): RabbitMQ closes
    the channel; the block's channel is reopened, and the message delivered again."""
    broker: RabbitBroker = await brokers()
    body, key = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, key)
        async with broker.queue.consume() as deliveries:
            held = await anext(deliveries)
            again = await anext(deliveries)  # arrives after the consumer timeout
            assert (again.envelope, again.delivery_count) == (held.envelope, 2)
            with pytest.raises(BrokerUnavailable):
                await held.ack()
            await again.ack()


async def test_publishing_to_a_deleted_work_queue_is_not_silently_lost(
    brokers: Any,
) -> None:
    """Mandatory publishing: a work message that no queue takes raises instead of being
    confirmed into nowhere."""
    broker: RabbitBroker = await brokers()
    other: RabbitBroker = await brokers()
    async with asyncio.timeout(TIMEOUT):
        channel = await other._raw_channel()
        await channel.queue_delete(broker.names.work)
        await channel.close()
        with pytest.raises(BrokerUnavailable, match="could not route"):
            await broker.queue.publish(*requested(1))


async def test_another_max_deliveries_on_the_same_prefix_is_refused(brokers: Any) -> None:
    """The delivery limit is a queue argument: a process configured differently fails to
    start with a clear error rather than silently using the other limit."""
    await brokers(max_deliveries=5)
    with pytest.raises(MessagingError, match="x-delivery-limit") as caught:
        await brokers(max_deliveries=3)
    assert not isinstance(caught.value, BrokerUnavailable)


# -- events --------------------------------------------------------------------------


async def test_slow_subscriber_loses_the_oldest_events_not_the_newest(brokers: Any) -> None:
    """A subscriber that does not read keeps at most its prefetch plus `subscriber_buffer`
    events; RabbitMQ drops the oldest beyond that, so the broker's memory stays bounded.
    What it does get is in order and ends with the newest."""
    broker: RabbitBroker = await brokers(subscriber_buffer=10)
    total = 1_500
    async with asyncio.timeout(TIMEOUT), broker.events.subscribe() as stream:
        for start in range(0, total, 500):
            await broker.events.publish_batch(
                [(node_status("exec-1", n), "exec-1") for n in range(start, start + 500)]
            )
        seen: list[int] = []
        while not seen or seen[-1] != total - 1:
            seen.append((await anext(stream)).data["index"])
    assert seen == sorted(seen)
    assert len(seen) < total


# -- lifecycle -----------------------------------------------------------------------


async def test_closing_the_broker_ends_its_consumers_and_subscribers(brokers: Any) -> None:
    broker: RabbitBroker = await brokers()
    async with asyncio.timeout(TIMEOUT):
        async with broker.queue.consume() as deliveries, broker.events.subscribe() as stream:
            waiting = [asyncio.create_task(next_of(it)) for it in (deliveries, stream)]
            await asyncio.sleep(0)
            await broker.close()
            for task in waiting:
                with pytest.raises(StopAsyncIteration):
                    await task


async def test_an_unreachable_broker_is_unavailable_at_start() -> None:
    broker = open_broker(
        f"amqp://guest:secret@127.0.0.1:{rabbit_node.free_port()}/", prefix="loomtest-x"
    )
    with pytest.raises(BrokerUnavailable, match="connect to amqp://guest:\\*\\*\\*@") as caught:
        await broker.start()
    assert "secret" not in str(caught.value)
    with pytest.raises(BrokerUnavailable, match="not started"):
        await broker.ping()
    with pytest.raises(BrokerUnavailable, match="not started"):
        await broker.queue.publish(*requested(1))


async def test_ack_after_leaving_the_consume_block_changes_nothing(brokers: Any) -> None:
    """The message was already put back; a late ack must not lose it (or ack another)."""
    broker: RabbitBroker = await brokers()
    await broker.queue.publish(*requested(1))
    async with asyncio.timeout(TIMEOUT):
        async with broker.queue.consume() as deliveries:
            late: Delivery = await anext(deliveries)
        await late.ack()
        async with broker.queue.consume() as deliveries:
            assert (await anext(deliveries)).delivery_count == 2


async def test_delete_prefix_leaves_nothing_of_a_prefix(node: Any, brokers: Any) -> None:
    """What test runs on a shared broker call in their teardown."""
    broker: RabbitBroker = await brokers()
    await broker.queue.publish(*requested(1))
    await delete_prefix(node.url, broker.prefix)
    await delete_prefix(node.url, broker.prefix)  # again: nothing left is fine
    with pytest.raises(BrokerUnavailable, match="could not route"):
        await broker.queue.publish(*requested(2))
    channel = await broker._raw_channel()
    for name in (broker.names.events, broker.names.control, broker.names.dlx):
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.exchange_declare(name, passive=True)
        channel = await broker._raw_channel()  # the refusal closed that channel
    await channel.close()
