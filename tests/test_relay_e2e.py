"""The outbox relay (loom_db) feeding a REAL broker (loom_messaging): every execution
requested in the database arrives on the work queue, through a broker outage too.

This is where the two libs meet (they never import each other, DESIGN §2): the relay is
handed the broker's publish functions. Databases: SQLite always, PostgreSQL with
LOOM_TEST_POSTGRES_URL. Brokers: memory always, RabbitMQ with LOOM_TEST_AMQP_URL, Kafka
with LOOM_TEST_KAFKA_URL. A missing service skips, or fails under LOOM_TEST_REQUIRE_SERVICES=1. Each test has its own
database and broker prefix. The consumer deduplicates by execution id, as DESIGN §1 asks
of every consumer of the at-least-once work queue.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from loom_db.database import Database, create_database
from loom_db.migrate import upgrade_sync
from loom_db.outbox import enqueue, fetch_unsent
from loom_db.relay import OutboxRelay
from loom_db.testing import scratch_database
from loom_messaging.abc import Broker
from loom_messaging.brokers import open_broker

BROKERS = {"memory": None, "rabbitmq": "LOOM_TEST_AMQP_URL", "kafka": "LOOM_TEST_KAFKA_URL"}
ROWS = 200


def service_url(variable: str, what: str) -> str:
    url = os.environ.get(variable)
    if not url:
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{variable} is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip(f"{variable} is not set: {what} tests skipped")
    return url


@contextmanager
def fresh_postgres() -> Iterator[str]:
    with scratch_database(service_url("LOOM_TEST_POSTGRES_URL", "PostgreSQL")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database of its own for one test."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'loom.db'}"
        upgrade_sync(url)
        yield url
    else:
        with fresh_postgres() as url:
            upgrade_sync(url)
            yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = create_database(database_url)
    try:
        yield database
    finally:
        await database.dispose()


@pytest.fixture(params=list(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    variable = BROKERS[request.param]
    if variable is None:
        return f"memory://relay-e2e-{uuid.uuid4().hex[:8]}"
    return service_url(variable, request.param)


@pytest.fixture(params=["memory", "rabbitmq"])
def cuttable_broker_url(request: pytest.FixtureRequest) -> str:
    """The brokers whose outage a test can stage without stopping a shared server (a
    Kafka client reconnects to the advertised listener, past any proxy: the Kafka
    backend's own tests cover its outages)."""
    variable = BROKERS[request.param]
    if variable is None:
        return f"memory://relay-e2e-{uuid.uuid4().hex[:8]}"
    return service_url(variable, request.param)


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    prefix = f"loomtest-relay-{uuid.uuid4().hex[:8]}"
    try:
        async with open_broker(broker_url, prefix=prefix) as started:
            yield started
    finally:
        await delete_broker_objects(broker_url, prefix)


async def delete_broker_objects(url: str, prefix: str) -> None:
    """Leave nothing of this test on a shared broker."""
    if url.startswith(("amqp://", "amqps://")):
        await delete_rabbitmq_objects(url, prefix)
    elif url.startswith("kafka://"):
        await delete_kafka_topics(url, prefix)


async def delete_kafka_topics(url: str, prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped, unused-ignore]

    admin = AIOKafkaAdminClient(bootstrap_servers=url.removeprefix("kafka://"))
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


async def delete_rabbitmq_objects(url: str, prefix: str) -> None:
    """Leave nothing of this test on the shared RabbitMQ: the queues and exchanges of
    its prefix (the topology in loom_messaging.rabbitmq's docstring)."""
    import aio_pika

    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for queue in ("executions", "executions.dead"):
            await channel.queue_delete(f"{prefix}.{queue}")
        for exchange in ("dlx", "events", "control"):
            await channel.exchange_delete(f"{prefix}.{exchange}")


async def request_executions(db: Database, count: int) -> set[str]:
    """`count` executions requested through the outbox, a few per transaction."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for start in range(0, count, 7):
        async with db.transaction() as conn:
            for execution_id in ids[start : start + 7]:
                await enqueue(
                    conn,
                    "execution.requested",
                    execution_id,
                    {"execution_id": execution_id, "graph": "e2e"},
                )
        db.notify_committed()
    return set(ids)


async def receive(broker: Broker, expected: set[str], seen: dict[str, int]) -> None:
    """Consume until every expected execution id arrived; counts deliveries per id (a
    worker would skip the duplicates: its database claim fails)."""
    async with broker.queue.consume(prefetch=50) as deliveries:
        async for delivery in deliveries:
            assert delivery.envelope.type == "execution.requested"
            execution_id = delivery.envelope.data["execution_id"]
            assert delivery.key == execution_id
            seen[execution_id] = seen.get(execution_id, 0) + 1
            await delivery.ack()
            if expected <= seen.keys():
                return


async def test_every_requested_execution_reaches_the_work_queue(
    db: Database, broker: Broker
) -> None:
    seen: dict[str, int] = {}
    async with OutboxRelay(db, broker.publishers(), batch_size=50):
        expected = await request_executions(db, ROWS)
        async with asyncio.timeout(60):
            await receive(broker, expected, seen)

    assert seen.keys() == expected
    async with db.read() as conn:
        assert await fetch_unsent(conn) == []


class Proxy:
    """A TCP proxy to cut the connections to a shared server without stopping it
    (DESIGN §14): `cut()` closes the listener and aborts every live connection,
    `restore()` listens again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream}
        await asyncio.gather(self._pump(reader, upstream), self._pump(upstream_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass  # the other side, or cut(), aborted the connection: nothing left to pump
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()

    async def restore(self) -> None:
        await self.start()


class Outage:
    """A broker that can be taken down and brought back: `url` is what the relay uses."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proxy: Proxy | None = None
        self.down_broker: Broker | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Outage]:
        parts = urlsplit(self.url)
        if parts.scheme != "memory":  # a real broker: through a proxy we can cut
            self.proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5672)
            await self.proxy.start()
            netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
            self.url = urlunsplit(parts._replace(netloc=f"{netloc}:{self.proxy.port}"))
        try:
            yield self
        finally:
            if self.proxy is not None:
                await self.proxy.cut()

    async def down(self, broker: Broker) -> None:
        if self.proxy is not None:
            await self.proxy.cut()
        else:  # memory: closing the "connection" makes every publish raise
            await broker.close()

    async def up(self, broker: Broker) -> None:
        if self.proxy is not None:
            await self.proxy.restore()  # the robust connection comes back by itself
        else:
            await broker.start()


async def test_rows_written_while_the_broker_is_down_arrive_when_it_is_back(
    db: Database, cuttable_broker_url: str
) -> None:
    """The relay's broker connection goes down (memory: closed; RabbitMQ: cut by a
    proxy), triggers keep being accepted into the outbox, and once the broker is back
    every one of them arrives."""
    broker_url = cuttable_broker_url
    prefix = f"loomtest-relay-{uuid.uuid4().hex[:8]}"
    try:
        async with Outage(broker_url).running() as outage:
            async with open_broker(outage.url, prefix=prefix) as relays_broker:
                relay = OutboxRelay(
                    db, relays_broker.publishers(), batch_size=50, retry_backoff=(0.05, 0.5)
                )
                async with relay:
                    await outage.down(relays_broker)
                    expected = await request_executions(db, ROWS)
                    deadline = time.monotonic() + 10
                    while not relay.failing:
                        assert time.monotonic() < deadline, "the relay never saw the outage"
                        await asyncio.sleep(0.01)
                    async with db.read() as conn:
                        assert len(await fetch_unsent(conn, limit=1_000)) == ROWS

                    await outage.up(relays_broker)
                    seen: dict[str, int] = {}
                    async with open_broker(broker_url, prefix=prefix) as consumer:
                        async with asyncio.timeout(60):
                            await receive(consumer, expected, seen)
                    assert seen.keys() == expected
                    while relay.failing or await _unsent(db):
                        assert time.monotonic() < deadline + 60, "the relay did not recover"
                        await asyncio.sleep(0.01)
    finally:
        await delete_broker_objects(broker_url, prefix)


async def _unsent(db: Database) -> int:
    async with db.read() as conn:
        return len(await fetch_unsent(conn, limit=1_000))
