"""Serving the webhook app with Hypercorn until SIGTERM / SIGINT (`python -m
loom_webhook`, `loom serve webhook`)."""

from __future__ import annotations

import logging

from loom_runtime import hypercorn_config, open_runtime, run_service, serve_app, stop_on_signals
from loom_webhook.app import create_app
from loom_webhook.settings import WebhookSettings, load_webhook_settings

__all__ = ["main", "run"]

_log = logging.getLogger("loom.webhook")


async def run(settings: WebhookSettings) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, finish the deliveries in flight
    (up to `LOOM_SHUTDOWN_GRACE`), close the runtime."""
    stop = stop_on_signals()
    async with open_runtime(settings, "the webhook service") as runtime:
        host, port = settings.webhook_host, settings.webhook_port
        config = hypercorn_config(host, port, settings.shutdown_grace)
        _log.info("webhooks listening on http://%s:%d/hooks/", host, port)
        await serve_app(create_app(runtime, settings), config, stop)
    _log.info("webhook service stopped")


def main(argv: list[str] | None = None) -> None:
    """Entry point (`--help` lists the settings): exit 2 with one clear line for a bad
    argument or a configuration error. `argv`: see `run_service`."""
    run_service(
        "loom-webhook", load_webhook_settings, run, settings_class=WebhookSettings, argv=argv
    )
