"""Helpers of the worker's tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

WAIT = 90.0
"""Seconds a test waits for a condition: generous, the machines are shared."""


async def until(check: Callable[[], Any], timeout: float = WAIT) -> Any:  # noqa: ASYNC109
    """`check()`'s first truthy answer (awaited when it is a coroutine), polled until
    `timeout` seconds have passed."""
    async with asyncio.timeout(timeout):
        while True:
            answer = check()
            if asyncio.iscoroutine(answer):
                answer = await answer
            if answer:
                return answer
            await asyncio.sleep(0.05)
