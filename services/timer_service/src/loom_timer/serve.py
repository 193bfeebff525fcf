"""Running the timer until SIGTERM / SIGINT (`python -m loom_timer`, `loom serve timer`):
the scheduler, the reaper and retention, and the health port."""

from __future__ import annotations

import asyncio
import logging

from loom_runtime import hypercorn_config, open_runtime, run_service, serve_app, stop_on_signals
from loom_timer.app import create_app
from loom_timer.service import TimerService
from loom_timer.settings import TimerSettings, load_timer_settings

__all__ = ["main", "run"]

_log = logging.getLogger("loom.timer")


async def run(settings: TimerSettings) -> None:
    """Run until SIGTERM or SIGINT, then stop the scheduler and the background tasks (the
    fires in flight finish, up to `LOOM_SHUTDOWN_GRACE`) and close the runtime. A
    background task that fails on anything but a database outage stops the service too,
    and its error is raised (the process exits non-zero and is restarted)."""
    stop = stop_on_signals()
    async with open_runtime(settings, "the timer service") as runtime:
        async with TimerService(runtime, settings) as service:
            host, port = settings.timer_host, settings.timer_port
            config = hypercorn_config(host, port, settings.shutdown_grace)
            _log.info("timer health and metrics on http://%s:%d/metrics", host, port)
            serving = asyncio.create_task(serve_app(create_app(runtime), config, stop))
            watching = asyncio.create_task(service.wait())
            await asyncio.wait({serving, watching}, return_when=asyncio.FIRST_COMPLETED)
            stop.set()
            await serving
            if watching.done():
                watching.result()  # a background task's error
            watching.cancel()
    _log.info("timer service stopped")


def main(argv: list[str] | None = None) -> None:
    """Entry point (`--help` lists the settings): exit 2 with one clear line for a bad
    argument or a configuration error. `argv`: see `run_service`."""
    run_service("loom-timer", load_timer_settings, run, settings_class=TimerSettings, argv=argv)
