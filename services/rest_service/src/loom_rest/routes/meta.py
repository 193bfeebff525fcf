"""Public routes: where things are, health, metrics, the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import version as _dist_version

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from loom_db import DatabaseError
from loom_messaging import check_broker
from loom_rest.api import Call, Endpoint
from loom_rest.problems import ApiProblem
from loom_rest.schemas import Index

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


async def _database_check(call: Call[None, None]) -> str | None:
    """None when the database answers, else why not."""
    try:
        async with asyncio.timeout(2.0):
            async with call.runtime.database.read() as conn:
                await conn.execute(text("SELECT 1"))
    except TimeoutError:
        return "the database did not answer within 2s"
    except DatabaseError as exc:
        return str(exc) or "the database is unavailable"
    return None


async def readyz(call: Call[None, None]) -> Health:
    """Readiness: the database and every broker answer."""
    runtime = call.runtime
    names = ["database", *(f"broker {b.__class__.__name__}" for b in runtime.brokers)]
    answers = await asyncio.gather(
        _database_check(call), *(check_broker(b) for b in runtime.brokers)
    )
    # The reasons go to the log: this route is public, and driver errors name hosts.
    for name, answer in zip(names, answers, strict=True):
        if answer is not None:
            _log.warning("not ready: %s: %s", name, answer)
    checks = {
        name: "ok" if answer is None else "unavailable"
        for name, answer in zip(names, answers, strict=True)
    }
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
