"""Serving the app with Hypercorn until SIGTERM / SIGINT (`python -m loom_rest`,
`loom serve rest`)."""

from __future__ import annotations

import logging

from loom_rest.app import create_app
from loom_rest.runtime import open_runtime
from loom_rest.settings import RestSettings, load_rest_settings
from loom_runtime import hypercorn_config, run_service, serve_app, stop_on_signals

__all__ = ["hypercorn_config", "main", "run"]

_log = logging.getLogger("loom.rest")


async def run(settings: RestSettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish the requests in flight
    (up to `LOOM_SHUTDOWN_GRACE`), close the runtime."""
    stop = stop_on_signals()
    async with open_runtime(settings) as runtime:
        config = hypercorn_config(settings.rest_host, settings.rest_port, settings.shutdown_grace)
        _log.info(
            "REST API listening on http://%s:%d/api/v1/", settings.rest_host, settings.rest_port
        )
        await serve_app(create_app(runtime), config, stop)
    _log.info("REST API stopped")


def main(argv: list[str] | None = None) -> None:
    """Entry point (`--help` lists the settings): exit 2 with one clear line for a bad
    argument or a configuration error. `argv`: see `run_service`."""
    run_service("loom-rest", load_rest_settings, run, settings_class=RestSettings, argv=argv)
