"""`create_app(runtime)`: the Starlette app of the REST service (DESIGN §2, §5)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from loom_auth import BearerAuthBackend, Principal, Role, parse_role
from loom_db import Database, NotFound, tokens, users
from loom_rest.api import endpoint_app
from loom_rest.metrics import RestMetrics
from loom_rest.openapi import openapi_document
from loom_rest.problems import ApiProblem, problem_for
from loom_rest.routes import ENDPOINTS
from loom_rest.routes.meta import VERSION
from loom_rest.runtime import Runtime

__all__ = ["create_app"]

_log = logging.getLogger("loom.rest")


def create_app(runtime: Runtime) -> Starlette:
    """The API over `runtime`'s database, brokers and registry. Starts nothing: the
    runtime's owner opens and closes the collaborators."""
    database = runtime.database

    async def lookup_api_token(token_hash: str) -> Principal | None:
        async with database.transaction() as conn:
            found = await tokens.find_api_token(conn, token_hash)
        if found is None:
            return None
        token, user = found
        return Principal(
            username=user.username, role=parse_role(token.role), kind="api", token_id=token.id
        )

    roles = _CurrentRoles(database)
    backend = BearerAuthBackend(runtime.signing_key, lookup_api_token, lookup_role=roles.get)
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


class _CurrentRoles:
    """Users' current roles for access tokens (`None`: deleted or disabled), read from the
    database and kept for `ttl` seconds: a demotion or a disabled account takes effect
    within that, not at the token's expiry, for one indexed read per user and second."""

    def __init__(self, database: Database, ttl: float = 1.0) -> None:
        self._database = database
        self._ttl = ttl
        self._known: dict[str, tuple[float, Role | None]] = {}

    async def get(self, username: str) -> Role | None:
        now = time.monotonic()
        known = self._known.get(username)
        if known is not None and now - known[0] < self._ttl:
            return known[1]
        async with self._database.read() as conn:
            try:
                user = await users.get_user(conn, username)
            except NotFound:
                user = None
        role = None if user is None or user.disabled else parse_role(user.role)
        if len(self._known) > 10_000:
            self._known.clear()
        self._known[username] = (now, role)
        return role


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
