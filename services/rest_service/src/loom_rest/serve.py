"""Serving the app with Hypercorn until SIGTERM / SIGINT (`python -m loom_rest`,
`loom serve rest`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

from loom_common import LoomError, configure_logging
from loom_rest.app import create_app
from loom_rest.runtime import open_runtime
from loom_rest.settings import RestSettings, load_rest_settings

__all__ = ["hypercorn_config", "main", "run"]

_log = logging.getLogger("loom.rest")


def hypercorn_config(host: str, port: int, grace: float) -> Config:
    """The Hypercorn settings the service (and its benchmark's baseline) run with."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = grace
    config.keep_alive_timeout = 75
    return config


async def run(settings: RestSettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish the requests in flight
    (up to `LOOM_SHUTDOWN_GRACE`), close the runtime."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_runtime(settings) as runtime:
        config = hypercorn_config(settings.rest_host, settings.rest_port, settings.shutdown_grace)
        _log.info(
            "REST API listening on http://%s:%d/api/v1/", settings.rest_host, settings.rest_port
        )
        # In a task of its own: Hypercorn's shutdown leaves cancellation requests counted on
        # the task that ran it, which would make the runtime's closing look cancelled.
        app = create_app(runtime)
        await asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    _log.info("REST API stopped")


def main() -> None:
    """Entry point: exit 2 with one clear line for a configuration error."""
    try:
        settings = load_rest_settings()
    except LoomError as exc:
        print(f"loom-rest: {exc}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(run(settings))
    except LoomError as exc:
        _log.error("cannot start: %s", exc)
        raise SystemExit(2) from None
