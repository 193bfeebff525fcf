"""The readiness check: a live broker is fine, a closed or silent one gives a reason."""

from __future__ import annotations

import asyncio
import time
import uuid

from loom_messaging.abc import Broker
from loom_messaging.brokers import open_broker
from loom_messaging.health import check_broker
from loom_messaging.memory import MemoryBroker


def memory_broker() -> Broker:
    return open_broker(f"memory://health-{uuid.uuid4().hex[:8]}", prefix="loomtest-health")


async def test_a_started_broker_is_ready() -> None:
    async with memory_broker() as broker:
        assert await check_broker(broker) is None


async def test_a_closed_broker_is_not_ready_and_says_why() -> None:
    broker = memory_broker()
    await broker.start()
    await broker.close()

    reason = await check_broker(broker)

    assert reason is not None and "not started" in reason


async def test_a_broker_that_does_not_answer_fails_within_the_timeout() -> None:
    class Silent(MemoryBroker):
        async def ping(self) -> None:
            await asyncio.sleep(60)

    broker = Silent(f"memory://silent-{uuid.uuid4().hex[:8]}", prefix="loomtest", max_deliveries=5)
    await broker.start()
    started = time.perf_counter()

    reason = await check_broker(broker, timeout=0.1)

    assert reason == "the broker did not answer within 0.1s"
    assert time.perf_counter() - started < 1.0
    await broker.close()
