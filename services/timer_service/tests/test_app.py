"""The timer's health port: `/healthz`, `/readyz` and `/metrics` with the timer's own
metrics, through the ASGI app in-process."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx

from loom_db import Database
from loom_timer import TimerService, create_app

StartTimer = Callable[..., AbstractAsyncContextManager[TimerService]]


async def test_health_readiness_and_metrics_answer(db: Database, start_timer: StartTimer) -> None:
    async with start_timer(db) as service:
        transport = httpx.ASGITransport(app=create_app(service.runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://timer.test") as client:
            health = await client.get("/healthz")
            ready = await client.get("/readyz")
            metrics = await client.get("/metrics")
    assert health.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok",
        "checks": {"database": "ok", "broker MemoryBroker": "ok"},
    }
    assert metrics.status_code == 200
    for name in (
        "loom_timer_fire_delay_seconds_bucket",
        "loom_timer_ticks_fired_total",
        "loom_timer_triggers",
        "loom_timer_reaped_executions_total",
    ):
        assert name in metrics.text
