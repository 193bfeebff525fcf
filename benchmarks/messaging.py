"""Bmsg: loom_messaging's work queue against the raw client of each broker, in one run.

1. Throughput, one line per backend: N small messages (`execution.requested` envelopes,
   about 200 bytes; 50,000, --quick 5,000) published with `publish_batch` in batches of
   500 on the work queue while one consumer takes them (prefetch 500) and acks each; the
   clock runs from the first publish to the last ack. Baselines in the same run, doing the
   same work with the broker's client alone (the consumer parses each body with orjson,
   as any real consumer must):
   * memory   — a plain asyncio.Queue producer/consumer pair;
   * rabbitmq — raw aio-pika: a durable quorum queue, persistent messages, publisher
                confirms pipelined over each batch of 500, one consumer, manual acks
                (LOOM_TEST_AMQP_URL or --amqp-url);
   * kafka    — raw aiokafka: `acks="all"` sends pipelined over each batch of 500, one
                consumer in a group, offsets committed after the acks of each fetch
                (LOOM_TEST_KAFKA_URL or --kafka-url).
   Figure: msgs/s, target ratio >= 0.85 (the layer costs at most 15 %) for rabbitmq and
   kafka; the memory line is for reference only, as it has no raw client to compare with.
2. The outbox relay's wake-up latency: an `execution.requested` row committed in a
   transaction, `notify_committed()`, the relay publishes it to the memory broker, a
   consumer receives it. R rows (500; --quick 200) one after another; p50 and p99 in ms,
   on SQLite, and on PostgreSQL with LOOM_TEST_POSTGRES_URL or --database-url. Baseline:
   the same commit followed by a direct publish (no outbox) to the same broker.

    uv run python benchmarks/messaging.py [--quick] [--repeat K] [--amqp-url URL]
        [--kafka-url URL] [--database-url URL] [--only memory,rabbitmq,kafka,relay]

Every run uses its own broker prefix (`loombench-<random>`) and its own database (a temp
SQLite file; a scratch PostgreSQL database, dropped at the end); on RabbitMQ it deletes
the queues and exchanges of its prefix afterwards, on Kafka the topics of its prefix.
Each side runs K times, alternating, best of K. One JSON object per line and figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson

from loom_db.database import Database, create_database
from loom_db.migrate import upgrade
from loom_db.outbox import enqueue
from loom_db.relay import OutboxRelay
from loom_db.testing import scratch_database as postgres_scratch
from loom_messaging import Broker, encode, open_broker

BATCH = 500
PREFETCH = 500
Item = tuple[bytes, str]
Timing = tuple[float, float]
"""(wall seconds, CPU seconds of this process): the CPU time is steadier on a busy
machine, and says how much of the client's core the layer takes."""
Run = Callable[[list[Item]], Awaitable[Timing]]


def clock() -> Timing:
    return time.perf_counter(), time.process_time()


def since(start: Timing) -> Timing:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def messages(n: int) -> list[Item]:
    ids = [str(uuid.UUID(int=i, version=4)) for i in range(n)]
    return [(encode("execution.requested", {"execution_id": i, "graph": "bench"}), i) for i in ids]


def batches(items: list[Item], size: int = BATCH) -> list[list[Item]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def emit(result: dict[str, object]) -> None:
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


def new_prefix() -> str:
    return f"loombench-{uuid.uuid4().hex[:10]}"


async def best_of(repeat: int, items: list[Item], ours: Run, raw: Run) -> tuple[Timing, Timing]:
    warm = items[: min(len(items), 1_000)]
    await raw(warm)  # connections, declarations, code paths
    await ours(warm)
    our_times, raw_times = [], []
    for _ in range(repeat):
        raw_times.append(await raw(items))
        our_times.append(await ours(items))
    return _best(our_times), _best(raw_times)


def _best(times: list[Timing]) -> Timing:
    return min(wall for wall, _ in times), min(cpu for _, cpu in times)


# --- ours: the same code for every backend ------------------------------------------------


def through_loom(url: str, prefix: str) -> Run:
    """Publish + consume through loom_messaging's work queue (one broker connection)."""

    async def run(items: list[Item]) -> Timing:
        async with open_broker(url, prefix=prefix) as broker:
            return await _through(broker, items)

    return run


async def _through(broker: Broker, items: list[Item]) -> Timing:
    async with broker.queue.consume(prefetch=PREFETCH) as deliveries:
        iterator = aiter(deliveries)
        # One message first, so joining (a Kafka group, a RabbitMQ consumer) is not timed.
        await broker.queue.publish(*items[0])
        await (await anext(iterator)).ack()
        done = asyncio.get_running_loop().create_future()

        async def consume() -> None:
            count = 0
            async for delivery in iterator:
                await delivery.ack()
                count += 1
                if count == len(items):
                    done.set_result(None)
                    return

        start = clock()
        consumer = asyncio.create_task(consume())
        for batch in batches(items):
            await broker.queue.publish_batch(batch)
        await asyncio.wait_for(asyncio.shield(done), timeout=600)
        elapsed = since(start)
        await consumer
        return elapsed


# --- raw baselines ------------------------------------------------------------------------


async def raw_memory(items: list[Item]) -> Timing:
    queue: asyncio.Queue[Item] = asyncio.Queue()

    async def consume() -> None:
        for _ in range(len(items)):
            body, _key = await queue.get()
            orjson.loads(body)
            queue.task_done()

    start = clock()
    consumer = asyncio.create_task(consume())
    for batch in batches(items):
        for item in batch:
            queue.put_nowait(item)
        await asyncio.sleep(0)
    await consumer
    return since(start)


def rabbit_names(prefix: str) -> tuple[list[str], list[str]]:
    """(queues, exchanges) this run creates on RabbitMQ: the backend's and the raw one's."""
    queues = [f"{prefix}.executions", f"{prefix}.executions.dead", f"{prefix}.raw"]
    return queues, [f"{prefix}.dlx", f"{prefix}.events", f"{prefix}.control"]


def raw_rabbitmq(url: str, prefix: str) -> Run:
    """What the backend does on the wire, written straight with aio-pika's API."""
    import aio_pika

    name = f"{prefix}.raw"
    arguments: dict[str, Any] = {  # the work queue's arguments (rabbitmq.py), on a queue of its own
        "x-queue-type": "quorum",
        "x-delivery-limit": 4,
        "x-dead-letter-exchange": f"{prefix}.dlx",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }

    async def run(items: list[Item]) -> Timing:
        connection = await aio_pika.connect(url)
        async with connection:
            publishing = await connection.channel(publisher_confirms=True)
            consuming = await connection.channel(publisher_confirms=False)
            await consuming.set_qos(prefetch_count=PREFETCH)
            queue = await consuming.declare_queue(name, durable=True, arguments=arguments)
            done = asyncio.get_running_loop().create_future()
            count = 0

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal count
                orjson.loads(message.body)
                await message.ack()
                count += 1
                if count == len(items) and not done.done():
                    done.set_result(None)

            tag = await queue.consume(on_message)
            exchange = publishing.default_exchange
            start = clock()
            for batch in batches(items):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(
                                body,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=uuid.uuid4().hex,
                                headers={"x-loom-key": key},
                            ),
                            routing_key=name,
                            mandatory=True,
                        )
                        for body, key in batch
                    )
                )
            await asyncio.wait_for(done, timeout=600)
            elapsed = since(start)
            await queue.cancel(tag)
            return elapsed

    return run


async def delete_rabbitmq_prefix(url: str, prefix: str) -> None:
    """Delete the queues and exchanges of this run's prefix (nothing else)."""
    import aio_pika

    queues, exchanges = rabbit_names(prefix)
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)  # RabbitMQ: ok when it does not exist
        for exchange in exchanges:
            await channel.exchange_delete(exchange)


def kafka_bootstrap(url: str) -> str:
    return url.removeprefix("kafka://").rstrip("/")


KAFKA_PARTITIONS = 6  # the backend's default for the work topic
KAFKA_SESSION = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000}  # its defaults


def raw_kafka(url: str, prefix: str) -> Run:
    """The backend's producer settings and a plain group consumer, with aiokafka alone."""
    from aiokafka import (  # type: ignore[import-untyped, unused-ignore]
        AIOKafkaConsumer,
        AIOKafkaProducer,
        TopicPartition,
    )
    from aiokafka.admin import (  # type: ignore[import-untyped, unused-ignore]
        AIOKafkaAdminClient,
        NewTopic,
    )

    bootstrap = kafka_bootstrap(url)
    topic = f"{prefix}.raw"
    created = False

    async def run(items: list[Item]) -> Timing:
        nonlocal created
        if not created:
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(topic, KAFKA_PARTITIONS, 1)])
            finally:
                await admin.close()
            created = True
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            max_request_size=256 * 1024 + 64 * 1024,
            max_batch_size=64 * 1024,
            linger_ms=1,
        )
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=f"{prefix}.raw-group",
            enable_auto_commit=False,
            auto_offset_reset="latest",
            **KAFKA_SESSION,
        )
        await producer.start()
        await consumer.start()
        try:
            # Join the group and take the partitions before the clock starts.
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=100)
            await consumer.seek_to_end(*consumer.assignment())
            for tp in consumer.assignment():
                await consumer.position(tp)
            count = 0

            async def consume() -> None:
                nonlocal count
                while count < len(items):
                    fetched = await consumer.getmany(timeout_ms=100, max_records=PREFETCH)
                    offsets: dict[Any, int] = {}
                    for tp, records in fetched.items():
                        for record in records:
                            orjson.loads(record.value)
                            count += 1  # "acked": committed below with its fetch
                        offsets[TopicPartition(tp.topic, tp.partition)] = records[-1].offset + 1
                    if offsets:
                        await consumer.commit(offsets)

            start = clock()
            consuming = asyncio.create_task(consume())
            for batch in batches(items):
                sent = [await producer.send(topic, body, key=key.encode()) for body, key in batch]
                await asyncio.gather(*sent)
            await asyncio.wait_for(consuming, timeout=600)
            return since(start)
        finally:
            await consumer.stop()
            await producer.stop()

    return run


async def delete_kafka_prefix(url: str, prefix: str) -> None:
    """Delete the topics of this run's prefix (its consumer groups expire on their own:
    the admin client has no call to delete them)."""
    from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped, unused-ignore]

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap(url))
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


# --- throughput figures -------------------------------------------------------------------


async def throughput(
    backend: str,
    n: int,
    repeat: int,
    quick: bool,
    url: str,
    raw_name: str,
    raw: Run,
    ours: Run,
    target: str = ">= 0.85 ratio",
) -> None:
    items = messages(n)
    (ours_s, ours_cpu), (raw_s, raw_cpu) = await best_of(repeat, items, ours, raw)
    rate, raw_rate = n / ours_s, n / raw_s
    emit(
        {
            "benchmark": "Bmsg",
            "name": f"{backend}: publish_batch({BATCH}) + consume/ack {n} messages",
            "value": round(rate, 1),
            "unit": "msgs/s",
            "baseline": round(raw_rate, 1),
            "baseline_name": raw_name,
            "ratio": round(rate / raw_rate, 3),
            "cpu_us_per_msg": round(ours_cpu / n * 1e6, 2),
            "baseline_cpu_us_per_msg": round(raw_cpu / n * 1e6, 2),
            "target": target,
            "n": n,
            "backend": backend,
            "repeat": repeat,
            "quick": quick,
        }
    )


async def bench_memory(n: int, repeat: int, quick: bool) -> None:
    url = f"memory://bench-{uuid.uuid4().hex[:8]}"
    await throughput(
        "memory",
        n,
        repeat,
        quick,
        url,
        "asyncio.Queue producer/consumer pair, orjson.loads per message",
        raw_memory,
        through_loom(url, new_prefix()),
        target="reference only: no raw client to compare with (the target is set against "
        "the raw aio-pika and aiokafka clients)",
    )


async def bench_rabbitmq(url: str, n: int, repeat: int, quick: bool) -> None:
    prefix = new_prefix()
    try:
        await throughput(
            "rabbitmq",
            n,
            repeat,
            quick,
            url,
            "raw aio-pika: same quorum queue arguments, persistent + mandatory, confirms "
            "pipelined per batch, one consumer, manual acks",
            raw_rabbitmq(url, prefix),
            through_loom(url, prefix),
        )
    finally:
        await delete_rabbitmq_prefix(url, prefix)


async def bench_kafka(url: str, n: int, repeat: int, quick: bool) -> None:
    prefix = new_prefix()
    try:
        await throughput(
            "kafka",
            n,
            repeat,
            quick,
            url,
            "raw aiokafka: the backend's producer settings (acks=all, linger 1 ms) and 6 "
            "partitions, sends pipelined per batch, one group consumer, commit per fetch",
            raw_kafka(url, prefix),
            through_loom(url, prefix),
        )
    finally:
        await delete_kafka_prefix(url, prefix)


# --- the relay's wake-up latency ----------------------------------------------------------


@asynccontextmanager
async def scratch_database(kind: str, postgres_url: str | None) -> AsyncIterator[Database]:
    """A migrated database of our own: a temp SQLite file, or a scratch PG database."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            db = create_database(f"sqlite+aiosqlite:///{Path(directory) / 'loom.db'}")
            try:
                await upgrade(db)
                yield db
            finally:
                await db.dispose()
        return
    assert postgres_url is not None
    with postgres_scratch(postgres_url, "loom_bench") as url:
        db = create_database(url)
        try:
            await upgrade(db)
            yield db
        finally:
            await db.dispose()


async def latencies(
    db: Database, broker: Broker, rows: int, publish: Callable[[str], Awaitable[None]] | None
) -> list[float]:
    """Commit one row at a time; ms from the end of the commit to its consumption.
    `publish` None: the relay delivers it; else `publish(execution_id)` right after."""
    arrived: dict[str, asyncio.Future[float]] = {}
    samples: list[float] = []

    async def consume() -> None:
        async with broker.queue.consume(prefetch=10) as deliveries:
            async for delivery in deliveries:
                now = time.perf_counter()
                await delivery.ack()
                future = arrived.get(delivery.envelope.data["execution_id"])
                if future is not None and not future.done():
                    future.set_result(now)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    try:
        for i in range(rows + 20):  # the first 20 warm up
            execution_id = str(uuid.uuid4())
            future = arrived[execution_id] = asyncio.get_running_loop().create_future()
            data: dict[str, Any] = {"execution_id": execution_id, "graph": "bench"}
            async with db.transaction() as conn:
                await enqueue(conn, "execution.requested", execution_id, data)
            committed = time.perf_counter()
            if publish is None:
                db.notify_committed()
            else:
                await publish(execution_id)
            received = await asyncio.wait_for(future, timeout=30)
            if i >= 20:
                samples.append((received - committed) * 1000)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    return samples


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def bench_relay(kind: str, postgres_url: str | None, rows: int, quick: bool) -> None:
    async with scratch_database(kind, postgres_url) as db:
        url = f"memory://bench-relay-{uuid.uuid4().hex[:8]}"
        async with open_broker(url, prefix=new_prefix()) as broker:
            async with OutboxRelay(db, broker.publishers()):
                relayed = await latencies(db, broker, rows, None)

            async def direct(execution_id: str) -> None:
                body = encode("execution.requested", {"execution_id": execution_id})
                await broker.queue.publish(body, execution_id)

            # The direct run's rows stay unsent in the outbox: no relay runs any more.
            straight = await latencies(db, broker, rows, direct)
    p50, p99 = percentile(relayed, 50), percentile(relayed, 99)
    base50 = percentile(straight, 50)
    emit(
        {
            "benchmark": "Bmsg",
            "name": f"outbox relay wake-up, commit -> consumed (memory broker, {kind})",
            "value": round(p50, 3),
            "unit": "ms p50",
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "mean_ms": round(statistics.fmean(relayed), 3),
            "baseline": round(base50, 3),
            "baseline_p99_ms": round(percentile(straight, 99), 3),
            "baseline_name": "the same commit, then a direct publish (no outbox), ms p50",
            "ratio": round(base50 / p50, 3),
            "target": "reported (no target set; B3's whole trigger path: p50 <= 20, p99 <= 100)",
            "n": rows,
            "database": kind,
            "quick": quick,
        }
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument("--repeat", type=int, default=None, help="runs per side (best of)")
    parser.add_argument("--amqp-url", default=os.environ.get("LOOM_TEST_AMQP_URL"))
    parser.add_argument("--kafka-url", default=os.environ.get("LOOM_TEST_KAFKA_URL"))
    parser.add_argument("--database-url", default=os.environ.get("LOOM_TEST_POSTGRES_URL"))
    parser.add_argument(
        "--only", default="memory,rabbitmq,kafka,relay", help="comma-separated figures to run"
    )
    args = parser.parse_args()
    only = set(args.only.split(","))
    n = 5_000 if args.quick else 50_000
    rows = 200 if args.quick else 500
    repeat = args.repeat or (2 if args.quick else 3)
    if "memory" in only:
        await bench_memory(n, repeat, args.quick)
    if "rabbitmq" in only and args.amqp_url:
        await bench_rabbitmq(args.amqp_url, n, repeat, args.quick)
    if "kafka" in only and args.kafka_url:
        await bench_kafka(args.kafka_url, n, repeat, args.quick)
    if "relay" in only:
        await bench_relay("sqlite", None, rows, args.quick)
        if args.database_url:
            await bench_relay("postgres", args.database_url, rows, args.quick)


if __name__ == "__main__":
    asyncio.run(main())
