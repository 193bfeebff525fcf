"""Liveness, readiness and metrics, the same in every service (`/healthz`, `/readyz`,
`/metrics`). Readiness asks the database and every broker, each within 2 s; the reasons
go to the log, not to the answer (these routes are public, and driver errors name hosts).
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loom_db import Database, DatabaseError
from loom_messaging import check_broker
from loom_runtime.runtime import Runtime

__all__ = ["CHECK_TIMEOUT", "check_database", "health_routes", "readiness"]

_log = logging.getLogger("loom.health")

CHECK_TIMEOUT = 2.0
"""Seconds each dependency has to answer a readiness check."""


async def check_database(database: Database) -> str | None:
    """None when the database answers `SELECT 1` in time, else why not."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            async with database.read() as conn:
                await conn.execute(text("SELECT 1"))
    except TimeoutError:
        return f"the database did not answer within {CHECK_TIMEOUT:g}s"
    except DatabaseError as exc:
        return str(exc) or "the database is unavailable"
    return None


async def readiness(runtime: Runtime) -> dict[str, str]:
    """`{"database": "ok", "broker RabbitMQBroker": "unavailable", ...}`; a failing
    check's reason is logged as a warning."""
    names = ["database", *(f"broker {b.__class__.__name__}" for b in runtime.brokers)]
    answers = await asyncio.gather(
        check_database(runtime.database), *(check_broker(b) for b in runtime.brokers)
    )
    for name, answer in zip(names, answers, strict=True):
        if answer is not None:
            _log.warning("not ready: %s: %s", name, answer)
    return {
        name: "ok" if answer is None else "unavailable"
        for name, answer in zip(names, answers, strict=True)
    }


def health_routes(runtime: Runtime) -> list[Route]:
    """`/healthz` (the process answers), `/readyz` (200 or 503 with the checks) and
    `/metrics` (Prometheus text of the runtime's registry)."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "checks": {}})

    async def readyz(request: Request) -> Response:
        checks = await readiness(runtime)
        ok = all(value == "ok" for value in checks.values())
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(runtime.registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
