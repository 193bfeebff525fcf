"""Running a service until SIGTERM / SIGINT: Hypercorn's settings, the stop signal, and
the entry point every `python -m loom_<service>` shares (a configuration error exits 2
with one clear line)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hypercorn.asyncio import serve
from hypercorn.config import Config

from loom_common import LoomError, configure_logging
from loom_common.settings import LoomSettings

__all__ = ["hypercorn_config", "run_service", "serve_app", "stop_on_signals"]

S = TypeVar("S", bound=LoomSettings)


def hypercorn_config(host: str, port: int, grace: float) -> Config:
    """The Hypercorn settings services (and their benchmarks' baselines) run with."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = grace
    config.keep_alive_timeout = 75
    return config


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_app(app: Any, config: Config, stop: asyncio.Event) -> None:
    """Serve `app` until `stop` is set, then finish the requests in flight (up to the
    config's graceful timeout)."""
    # In a task of its own: Hypercorn's shutdown leaves cancellation requests counted on
    # the task that ran it, which would make the caller's cleanup look cancelled.
    await asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))


def run_service(name: str, load: Callable[[], S], run: Callable[[S], Awaitable[None]]) -> None:
    """The body of a service's `main()`: load its settings, configure logging, run it.
    A `LoomError` while loading or starting (a missing key, an unreachable broker) exits 2
    with one line naming the service."""
    try:
        settings = load()
    except LoomError as exc:
        print(f"{name}: {exc}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run(settings))  # type: ignore[arg-type]
    except LoomError as exc:
        logging.getLogger("loom").error("%s cannot start: %s", name, exc)
        raise SystemExit(2) from None
