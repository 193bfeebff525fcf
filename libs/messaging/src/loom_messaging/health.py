"""`/readyz` helpers: is the broker reachable now?

`check_broker` turns a backend's `ping()` into a reason a readiness endpoint can show:
None when the broker answered in time, else one line saying why not. It never raises for
an unreachable or slow broker (that is the answer it exists to give).
"""

from __future__ import annotations

import asyncio

from loom_messaging.abc import Broker
from loom_messaging.errors import BrokerUnavailable

__all__ = ["check_broker"]


# `timeout` bounds a probe that must answer quickly whatever the broker does; it is the
# point of the function, not a cancellation scope left to the caller (ASYNC109).
async def check_broker(broker: Broker, timeout: float = 2.0) -> str | None:  # noqa: ASYNC109
    """None if `broker` answers `ping()` within `timeout` seconds, else the reason.

    Raises only what `ping()` raises besides `BrokerUnavailable` (a backend bug: each
    backend translates its driver's errors into `BrokerUnavailable`).
    """
    try:
        async with asyncio.timeout(timeout):
            await broker.ping()
    except TimeoutError:
        return f"the broker did not answer within {timeout:g}s"
    except BrokerUnavailable as exc:
        return str(exc).strip() or "the broker is unavailable"
    return None
