"""The timer's HTTP side: only `/healthz`, `/readyz` and `/metrics` (DESIGN §7 serves no
API; `loom_runtime.health_routes`), on `LOOM_TIMER_PORT`."""

from __future__ import annotations

from starlette.applications import Starlette

from loom_runtime import Runtime, health_routes

__all__ = ["create_app"]


def create_app(runtime: Runtime) -> Starlette:
    """The health and metrics app of a timer running on `runtime`."""
    return Starlette(routes=health_routes(runtime))
