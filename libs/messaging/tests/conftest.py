"""The contract suite's fixture: every test that takes `broker` runs against memory,
RabbitMQ (LOOM_TEST_AMQP_URL) and Kafka (LOOM_TEST_KAFKA_URL), each test with its own
broker prefix so runs never see each other's messages. Without a URL those runs are
skipped with a reason, unless LOOM_TEST_REQUIRE_SERVICES=1 (CI), where that fails."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from loom_messaging.abc import Broker
from loom_messaging.brokers import open_broker

BACKENDS = {
    "memory": None,
    "rabbitmq": "LOOM_TEST_AMQP_URL",
    "kafka": "LOOM_TEST_KAFKA_URL",
}


def broker_url(backend: str) -> str:
    variable = BACKENDS[backend]
    if variable is None:
        return f"memory://test-{uuid.uuid4().hex[:8]}"
    url = os.environ.get(variable)
    if not url:
        if os.environ.get("LOOM_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{variable} is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip(f"{variable} is not set: {backend} tests skipped")
    return url


@pytest.fixture
def prefix() -> str:
    return f"loomtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=list(BACKENDS))
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of each backend in turn (memory: one fresh in-process broker per test)."""
    return broker_url(request.param)


@pytest.fixture
async def broker(backend_url: str, prefix: str) -> AsyncIterator[Broker]:
    """A started broker of each backend, with a fresh prefix (max 3 deliveries). On the
    shared RabbitMQ, the prefix's queues and exchanges are deleted afterwards."""
    async with open_broker(backend_url, prefix=prefix, max_deliveries=3) as started:
        yield started
    if backend_url.startswith(("amqp://", "amqps://")):
        from loom_messaging.rabbitmq import delete_prefix

        await delete_prefix(backend_url, prefix)


@pytest.fixture
async def broker_factory(backend_url: str, prefix: str) -> AsyncIterator[object]:
    """More brokers on the same backend, URL and prefix as `broker` — another process's
    connection: `other = await broker_factory()`. Closed at the end of the test."""
    opened: list[Broker] = []

    async def make() -> Broker:
        b = open_broker(backend_url, prefix=prefix, max_deliveries=3)
        await b.start()
        opened.append(b)
        return b

    yield make
    for b in opened:
        await b.close()
