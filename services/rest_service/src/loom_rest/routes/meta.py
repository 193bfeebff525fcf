"""Public routes: where things are, health, metrics, the OpenAPI document."""

from __future__ import annotations

import logging
from importlib.metadata import version as _dist_version

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from loom_rest.api import Call, Endpoint
from loom_rest.problems import ApiProblem
from loom_rest.schemas import Index
from loom_runtime import readiness

__all__ = ["ENDPOINTS", "VERSION"]

_log = logging.getLogger("loom.rest")

VERSION = _dist_version("loom-rest")
WS_PORT = 8081


class Health(BaseModel):
    status: str
    checks: dict[str, str]


async def index(call: Call[None, None]) -> Index:
    """Clients need one URL: this one tells them where the WebSocket service is."""
    configured = call.runtime.settings.rest_public_ws_url
    if configured is None:
        # Derived from the address the client used: set LOOM_REST_PUBLIC_WS_URL behind a
        # proxy or an ingress, where the WebSocket service is elsewhere.
        url = call.request.url
        scheme = "wss" if url.scheme == "https" else "ws"
        host = url.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        configured = f"{scheme}://{host}:{WS_PORT}"
    return Index(version=VERSION, ws_url=configured)


async def healthz(call: Call[None, None]) -> Health:
    """Liveness: the process answers. Dependencies are /readyz's business."""
    return Health(status="ok", checks={})


async def readyz(call: Call[None, None]) -> Health:
    """Readiness: the database and every broker answer."""
    checks = await readiness(call.runtime)
    if any(value != "ok" for value in checks.values()):
        failing = ", ".join(k for k, v in checks.items() if v != "ok")
        raise ApiProblem(
            503, f"not ready: {failing} unavailable (see the service's log)", checks=checks
        )
    return Health(status="ok", checks=checks)


async def metrics(call: Call[None, None]) -> Response:
    return Response(generate_latest(call.runtime.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(call: Call[None, None]) -> Response:
    return JSONResponse(call.request.app.state.openapi)


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/api/v1/", index, None, "Version and the WebSocket URL", response=Index),
    Endpoint(
        "GET",
        "/api/v1/openapi.json",
        openapi,
        None,
        "This OpenAPI document",
        response_content={"application/json": {"schema": {"type": "object"}}},
    ),
    Endpoint("GET", "/healthz", healthz, None, "Liveness", response=Health),
    Endpoint(
        "GET", "/readyz", readyz, None, "Readiness: database and brokers reachable", response=Health
    ),
    Endpoint(
        "GET",
        "/metrics",
        metrics,
        None,
        "Prometheus metrics",
        response_content={CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
    ),
]
