"""Running the worker until SIGTERM / SIGINT (`python -m loom_worker`, `loom serve
worker`): the worker and its small HTTP port (`/healthz`, `/readyz`, `/metrics`)."""

from __future__ import annotations

import asyncio
import logging

from starlette.applications import Starlette

from loom_runtime import (
    Runtime,
    health_routes,
    hypercorn_config,
    open_runtime,
    run_service,
    serve_app,
    stop_on_signals,
)
from loom_worker.service import Worker
from loom_worker.settings import WorkerSettings, load_worker_settings

__all__ = ["create_app", "main", "run"]

_log = logging.getLogger("loom.worker")


def create_app(runtime: Runtime) -> Starlette:
    """The worker's health and metrics app."""
    return Starlette(routes=health_routes(runtime))


async def run(settings: WorkerSettings) -> None:
    """Work until SIGTERM or SIGINT, then stop as DESIGN §8 says; exit 0."""
    stop = stop_on_signals()
    async with open_runtime(settings, "the worker") as runtime:
        worker = Worker(runtime, settings)
        config = hypercorn_config(
            settings.worker_host, settings.worker_port, settings.shutdown_grace
        )
        http_stop = asyncio.Event()
        http = asyncio.create_task(serve_app(create_app(runtime), config, http_stop))
        _log.info(
            "worker %s: %d slots; health on http://%s:%d/healthz",
            worker.worker_id,
            settings.worker_slots,
            settings.worker_host,
            settings.worker_port,
        )
        try:
            await worker.run(stop)
        finally:
            http_stop.set()
            await http
    _log.info("worker stopped")


def main(argv: list[str] | None = None) -> None:
    """Entry point (`--help` lists the settings): exit 2 with one clear line for a bad
    argument or a configuration error. `argv`: see `run_service`."""
    run_service("loom-worker", load_worker_settings, run, settings_class=WorkerSettings, argv=argv)
