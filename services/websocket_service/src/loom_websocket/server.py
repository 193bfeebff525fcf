"""The websocket service: `LiveLogs(runtime, settings)` serves DESIGN §9 on the
`websockets` library's asyncio server (not inside Hypercorn: a `websockets` server
writes one encoded frame to many connections without an ASGI layer per message).

* `/ws/executions/{id}?after=SEQ`: `follow.FollowExecution`.
* `/ws/events?graph=NAME`: every execution status change (of one graph), for dashboards.
* `/healthz`, `/readyz`, `/metrics`: plain HTTP, answered in `process_request`.

Refusals complete the handshake and then close with a code a browser can read: 4401
without valid credentials, 4403 for a role below viewer, 4404 for an unknown execution,
4400 for a malformed `after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import HTTPConnection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from loom_auth import BearerAuthBackend, Principal, Role, role_allows
from loom_runtime import Runtime, auth_backend, readiness
from loom_websocket.follow import FollowExecution
from loom_websocket.hub import Hub, Watcher
from loom_websocket.metrics import WebsocketMetrics
from loom_websocket.settings import WebsocketSettings

__all__ = ["BAD_REQUEST", "FORBIDDEN", "UNAUTHENTICATED", "LiveLogs"]

UNAUTHENTICATED = 4401
FORBIDDEN = 4403
BAD_REQUEST = 4400

_EXECUTION = re.compile(r"^/ws/executions/([A-Za-z0-9_-]{1,64})$")

_log = logging.getLogger("loom.websocket")


class LiveLogs:
    """The service over `runtime`: `await serve(stop)` listens until `stop` is set, then
    closes every connection with 1001 (clients reconnect elsewhere with `after`)."""

    def __init__(self, runtime: Runtime, settings: WebsocketSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = WebsocketMetrics.of(runtime.registry)
        self.hub = Hub(
            runtime.event_broker.events,
            runtime.database,
            self.metrics,
            high_water=settings.websocket_high_water,
        )
        self._auth: BearerAuthBackend = auth_backend(
            runtime.database, runtime.signing_key, allow_query_token=True
        )
        self._open = 0
        self.server: Server | None = None
        self.started = asyncio.Event()

    @property
    def port(self) -> int:
        """The port listened on (the real one when the settings asked for 0)."""
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def serve(self, stop: asyncio.Event) -> None:
        hub = asyncio.create_task(self.hub.run(), name="loom-websocket-hub")
        try:
            # Followers registered before the subscription is live could miss events.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hub.ready.wait(), 10)
            if not self.hub.ready.is_set():
                _log.warning("the event stream is not reachable yet: serving from the database")
            async with serve(
                self._handle,
                self.settings.websocket_host,
                self.settings.websocket_port,
                process_request=self._process_request,
                compression=None,
                ping_interval=self.settings.websocket_ping_interval,
                ping_timeout=self.settings.websocket_ping_interval,
                # The high-water mark is checked by the hub; this only bounds `send`.
                write_limit=64 * 1024,
                max_size=64 * 1024,
                server_header=None,
            ) as server:
                self.server = server
                self.started.set()
                _log.info(
                    "live logs on ws://%s:%d/ws/executions/{id}",
                    self.settings.websocket_host,
                    self.port,
                )
                await stop.wait()
                server.close(close_connections=True)
                await server.wait_closed()
        finally:
            hub.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hub

    # --- plain HTTP ------------------------------------------------------------------

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return _json(conn, 200, {"status": "ok", "checks": {}})
        if path == "/readyz":
            checks = await readiness(self.runtime)
            checks["event stream"] = "ok" if self.hub.ready.is_set() else "unavailable"
            ok = all(value == "ok" for value in checks.values())
            body = {"status": "ok" if ok else "unavailable", "checks": checks}
            return _json(conn, 200 if ok else 503, body)
        if path == "/metrics":
            response = conn.respond(200, generate_latest(self.runtime.registry).decode())
            _content_type(response, CONTENT_TYPE_LATEST)
            return response
        if path != "/ws/events" and _EXECUTION.match(path) is None:
            return _problem(conn, 404, f"no route {path}")
        if self._open >= self.settings.websocket_max_connections:
            return _problem(conn, 503, "this process has as many connections as it takes")
        return None

    # --- WebSockets ------------------------------------------------------------------

    async def _handle(self, conn: ServerConnection) -> None:
        assert conn.request is not None
        parts = urlsplit(conn.request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        endpoint = "events" if parts.path == "/ws/events" else "executions"
        self._open += 1
        gauge = self.metrics.connections.labels(endpoint)
        gauge.inc()
        try:
            if not await self._allowed(conn, query):
                return
            if endpoint == "events":
                await self._watch(conn, query.get("graph") or None)
                return
            match = _EXECUTION.match(parts.path)
            assert match is not None
            after = _after(query.get("after"))
            if after is None:
                await self._refuse(conn, BAD_REQUEST, "after must be a whole number >= 0")
                return
            follow = FollowExecution(
                self.hub,
                self.runtime.database,
                self.metrics,
                conn,
                match[1],
                after,
                slow_seconds=self.settings.websocket_slow_seconds,
            )
            await _until_closed(conn, follow.run)
        finally:
            self._open -= 1
            gauge.dec()

    async def _allowed(self, conn: ServerConnection, query: dict[str, str]) -> bool:
        assert conn.request is not None
        scope = {
            "type": "websocket",
            "scheme": "ws",
            "path": urlsplit(conn.request.path).path,
            "root_path": "",
            "query_string": urlsplit(conn.request.path).query.encode(),
            "headers": [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in conn.request.headers.raw_items()
            ],
            "server": None,
        }
        found = await self._auth.authenticate(HTTPConnection(scope))
        user = None if found is None else found[1]
        if not isinstance(user, Principal):
            await self._refuse(conn, UNAUTHENTICATED, "unauthenticated: send a bearer token")
            return False
        if not role_allows(user.role, Role.VIEWER):
            await self._refuse(conn, FORBIDDEN, "forbidden")
            return False
        return True

    async def _refuse(self, conn: ServerConnection, code: int, reason: str) -> None:
        self.metrics.refusals.labels(str(code)).inc()
        await conn.close(code, reason)

    async def _watch(self, conn: ServerConnection, graph: str | None) -> None:
        watcher = Watcher(conn, graph)
        self.hub.watch(watcher)
        try:
            await conn.wait_closed()
        finally:
            self.hub.unwatch(watcher)


async def _until_closed(
    conn: ServerConnection, work: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Run `work` until it returns or the client goes away (whatever it sends is read and
    dropped, so its pings and close frames are answered)."""

    async def drain() -> None:
        with contextlib.suppress(Exception):
            async for _ in conn:
                pass

    task = asyncio.create_task(work())
    reader = asyncio.create_task(drain())
    try:
        await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, reader):
            pending.cancel()
        results = await asyncio.gather(task, reader, return_exceptions=True)
    error = results[0]
    if isinstance(error, Exception) and not _closed(error):
        raise error


def _closed(error: BaseException) -> bool:
    return isinstance(error, ConnectionClosed | asyncio.CancelledError)


def _after(value: str | None) -> int | None:
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def _content_type(response: Response, value: str) -> None:
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = value


def _json(conn: ServerConnection, status: int, body: Any) -> Response:
    response = conn.respond(status, orjson.dumps(body).decode())
    _content_type(response, "application/json")
    return response


def _problem(conn: ServerConnection, status: int, detail: str) -> Response:
    body = {"type": "about:blank", "title": _TITLES[status], "status": status, "detail": detail}
    response = _json(conn, status, body)
    _content_type(response, "application/problem+json")
    return response


_TITLES = {404: "Not Found", 503: "Service Unavailable"}
