"""Running the websocket service until SIGTERM / SIGINT (`python -m loom_websocket`,
`loom serve websocket`)."""

from __future__ import annotations

import logging

from loom_runtime import open_runtime, run_service, stop_on_signals
from loom_websocket.server import LiveLogs
from loom_websocket.settings import WebsocketSettings, load_websocket_settings

__all__ = ["main", "run"]

_log = logging.getLogger("loom.websocket")


async def run(settings: WebsocketSettings) -> None:
    """Serve until SIGTERM or SIGINT, then close every connection with 1001 (clients
    reconnect elsewhere with `after`); exit 0. It writes nothing, so it runs no relay."""
    stop = stop_on_signals()
    async with open_runtime(settings, "the websocket service", relay=False) as runtime:
        await LiveLogs(runtime, settings).serve(stop)
    _log.info("websocket service stopped")


def main(argv: list[str] | None = None) -> None:
    """Entry point (`--help` lists the settings): exit 2 with one clear line for a bad
    argument or a configuration error. `argv`: see `run_service`."""
    run_service(
        "loom-websocket", load_websocket_settings, run, settings_class=WebsocketSettings, argv=argv
    )
