"""`create_app(runtime)`: the Starlette app of the REST service (DESIGN §2, §5)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from loom_rest.api import endpoint_app
from loom_rest.metrics import RestMetrics
from loom_rest.openapi import openapi_document
from loom_rest.problems import ApiProblem, problem_for
from loom_rest.routes import ENDPOINTS
from loom_rest.routes.meta import VERSION
from loom_rest.runtime import Runtime
from loom_runtime import auth_backend

__all__ = ["create_app"]

_log = logging.getLogger("loom.rest")


def create_app(runtime: Runtime) -> Starlette:
    """The API over `runtime`'s database, brokers and registry. Starts nothing: the
    runtime's owner opens and closes the collaborators."""
    backend = auth_backend(runtime.database, runtime.signing_key)
    metrics = RestMetrics.of(runtime.registry)
    # One Route per path, so that a 405 names every method the path allows (`Allow`).
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for e in ENDPOINTS:
        by_path.setdefault(e.path, {})[e.method] = endpoint_app(
            e, runtime, backend, metrics.observe
        )
    routes = [Route(path, _dispatch(apps), methods=list(apps)) for path, apps in by_path.items()]
    middleware = []
    hops = runtime.settings.rest_trusted_proxy_hops
    if hops:
        middleware.append(Middleware(_ForwardedClient, trusted_hops=hops))
    if runtime.settings.rest_cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=runtime.settings.rest_cors_origins,
                allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Accept"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _unexpected},
    )
    app.state.runtime = runtime
    app.state.openapi = openapi_document(ENDPOINTS, VERSION)
    return app


class _ForwardedClient:
    """The client address from `X-Forwarded-For`, as written by `trusted_hops` proxies
    (the entry that many places from the end: what the nearest trusted proxy saw). Written
    here because Hypercorn's ProxyFixMiddleware deep-copies every request's scope, which
    fails inside a Starlette app (and costs time besides)."""

    def __init__(self, app: ASGIApp, trusted_hops: int) -> None:
        self.app = app
        self.trusted_hops = trusted_hops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            forwarded = [
                part.strip()
                for name, value in scope["headers"]
                if name == b"x-forwarded-for"
                for part in value.decode("latin-1").split(",")
            ]
            if len(forwarded) >= self.trusted_hops and forwarded[-self.trusted_hops]:
                scope = {**scope, "client": (forwarded[-self.trusted_hops], 0)}
        await self.app(scope, receive, send)


def _dispatch(
    apps: dict[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await apps[method](request)

    return dispatch


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing errors (unknown path 404, wrong method 405) as problem details."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        detail = f"no route {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    else:
        detail = str(exc.detail)
    return ApiProblem(exc.status_code, detail, headers=exc.headers).response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    return problem_for(exc)
