"""The webhook service's app (DESIGN §6): `POST /hooks/{graph}` and
`/hooks/{graph}/{name}`, plus `/healthz`, `/readyz`, `/metrics`.

A delivery passes these checks in this order, and the first that fails answers:

    unknown or disabled hook 404 · rate limit 429 · body too large 413 ·
    content type 415 · signature 401 · ping 200 · malformed body 400 ·
    `events` / `if` 200 skipped · params 422 · then 202, or 200 duplicate for a
    delivery id stored before

A 202 is sent only after the execution and its outbox row are committed; a database that
cannot be reached answers 503 (`Retry-After`). Each outcome for a hook that exists is
written to its delivery log (for a 202 and a duplicate, in the same transaction as the
execution). Nothing in an answer says why a signature failed; the log does.

A repeated delivery id is recognised when its execution is stored (the unique key of
`webhook:{graph}:{hook}:{id}`), after the filters and params, not before them as DESIGN
§6 lists it (ADR 0007): a provider's redelivery carries the same body and headers, so it
passes the same filters and maps to the same params, and the answer is the same 200
duplicate -- without a read per delivery to look for it first.

Deliveries are stored by a `DeliveryWriter` (group commit), and hooks with their secrets
are kept in memory for `LOOM_WEBHOOK_CACHE_SECONDS` (see that setting for what stays
exact).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from loom_auth import problem_response
from loom_common import ExpressionError, ParamError
from loom_db import DatabaseUnavailable, NotFound, TransactionConflict, executions
from loom_db import graphs as graph_queries
from loom_db import secrets as secret_queries
from loom_db.deliveries import NewDelivery
from loom_db.errors import SecretKeyMismatch
from loom_db.executions import NewExecution
from loom_db.graphs import TriggerRecord
from loom_runtime import Runtime, health_routes, metrics_of
from loom_webhook.deliveries import BodyFormat, body_format, decode_body, is_github_ping
from loom_webhook.errors import MalformedBody, SignatureRejected, UnsupportedMediaType
from loom_webhook.hooks import Hook, HookCache
from loom_webhook.ratelimit import HookLimiter
from loom_webhook.settings import WebhookSettings
from loom_webhook.signatures import delivery_id, event_name, verify
from loom_webhook.writer import GONE, STALE, Accepted, Creation, DeliveryWriter

__all__ = ["create_app"]

_log = logging.getLogger("loom.webhook")

_JSON = "application/json"


class _Answer(Exception):
    """An answer decided before the end of the checks; `outcome` goes to the delivery
    log (None: not logged, the hook does not exist)."""

    def __init__(
        self,
        response: Response,
        outcome: str | None,
        detail: str | None = None,
        execution_id: str | None = None,
    ) -> None:
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome
        self.detail = detail
        self.execution_id = execution_id


def _problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    return problem_response(status, title, detail, **extra)


def _json(status: int, body: Mapping[str, Any]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON)


_NOT_FOUND = "no such webhook"
_ATTEMPTS = 3
"""Tries of a delivery whose graph gets a new version meanwhile."""
_MAX_KNOWN = 10_000
"""Hooks kept in memory at most (forgotten all at once past it: they are re-read)."""


@dataclass(slots=True)
class _Metrics:
    deliveries: Counter
    seconds: Histogram

    @classmethod
    def of(cls, registry: CollectorRegistry) -> _Metrics:
        return cls(
            Counter(
                "loom_webhook_deliveries",
                "Webhook deliveries by outcome",
                ["outcome"],
                registry=registry,
            ),
            Histogram(
                "loom_webhook_delivery_seconds",
                "Time to answer a webhook delivery",
                registry=registry,
                buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            ),
        )


@dataclass(frozen=True, slots=True)
class _Known:
    """A hook as read from the database, with its secret's value, until `expires`."""

    hook: Hook
    secret: str | None
    expires: float


class WebhookHandler:
    """Everything one delivery needs, held for the app's life."""

    def __init__(self, runtime: Runtime, settings: WebhookSettings) -> None:
        self.runtime = runtime
        self.database = runtime.database
        self.max_bytes = settings.webhook_max_bytes
        self.cache_seconds = settings.webhook_cache_seconds
        self.limiter = HookLimiter(settings.webhook_rate_limit, settings.webhook_rate_burst)
        self.compiled = HookCache()
        self.known: dict[tuple[str, str], _Known] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[_Known]] = {}
        self.writer = DeliveryWriter(runtime.database)
        self.metrics = metrics_of(runtime.registry, _Metrics.of)
        self._last_limited: dict[tuple[str, str], float] = {}

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        graph = request.path_params["graph"]
        name = request.path_params.get("name", "default")
        try:
            response, outcome = await self._deliver(request, graph, name)
        except (DatabaseUnavailable, TransactionConflict) as exc:
            _log.warning("hook %s/%s: answering 503: %s", graph, name, exc)
            response, outcome = (
                _problem(
                    503,
                    "Service Unavailable",
                    "the database is not reachable right now; nothing was stored, try again",
                    headers={"Retry-After": "2"},
                ),
                "unavailable",
            )
        self.metrics.deliveries.labels(outcome).inc()
        self.metrics.seconds.observe(time.perf_counter() - started)
        return response

    async def _deliver(self, request: Request, graph: str, name: str) -> tuple[Response, str]:
        headers = request.headers
        wanted_id = None
        try:
            known = await self._known(graph, name)
            wanted_id = delivery_id(known.hook.auth, headers)
            self._check_rate(graph, name)
            body = await self._read_body(request)
            fmt = self._format(headers)
            for _ in range(_ATTEMPTS):
                wanted_id = delivery_id(known.hook.auth, headers)
                answer = await self._process(known, headers, body, fmt, wanted_id)
                if answer is not None:
                    return answer
                # The graph has a newer version than the hook kept in memory: read it
                # again and run the checks again (the new version may filter otherwise).
                known = await self._known(graph, name, fresh=True)
            raise TransactionConflict(f"the graph {graph!r} changed during the delivery")
        except _Answer as answer:
            if answer.outcome is not None:
                await self.writer.log(
                    NewDelivery(
                        graph=graph,
                        hook=name,
                        delivery_id=wanted_id,
                        status_code=answer.response.status_code,
                        outcome=answer.outcome,
                        detail=None if answer.detail is None else answer.detail[:1000],
                    )
                )
            return answer.response, answer.outcome or _unlogged(answer.response)

    async def _process(
        self,
        known: _Known,
        headers: Mapping[str, str],
        body: bytes,
        fmt: BodyFormat,
        wanted_id: str | None,
    ) -> tuple[Response, str] | None:
        """The checks from the signature on, then the execution; None when the hook was
        read from an older graph version than the stored one. Raises `_Answer`."""
        known = await self._verify(known, headers, body)
        hook = known.hook
        if is_github_ping(hook.auth, headers):
            raise _Answer(_json(200, {"pong": True}), "ping")
        try:
            payload = decode_body(fmt, body)
        except MalformedBody as exc:
            raise _Answer(_problem(400, "Bad Request", str(exc)), "invalid", str(exc)) from None
        event = event_name(hook.auth, headers)
        context = {
            "payload": payload,
            "headers": {key.lower(): value for key, value in headers.items()},
            "event": event,
        }
        params = self._apply(hook, event, context)
        trigger_info = {
            "hook": hook.name,
            "event": event,
            "delivery_id": wanted_id,
            "payload": payload,
        }
        return await self._create(hook, wanted_id, params, trigger_info)

    # --- the checks, in order ----------------------------------------------------------

    async def _known(self, graph: str, name: str, *, fresh: bool = False) -> _Known:
        """The hook and its secret, from memory unless `fresh` or expired. Raises
        `_Answer` 404 for an unknown or disabled hook. Concurrent deliveries to a hook
        that must be read share one read."""
        key = (graph, name)
        known = None if fresh else self.known.get(key)
        if known is not None and known.expires > time.monotonic():
            return known
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.ensure_future(self._load(graph, name))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(loading)

    async def _load(self, graph: str, name: str) -> _Known:
        async with self.database.read() as conn:
            trigger = await graph_queries.find_webhook(conn, graph, name)
            if trigger is None:
                self.known.pop((graph, name), None)
                raise _Answer(_problem(404, "Not Found", _NOT_FOUND), None)
            hook = self.compiled.get(trigger) or await self._compile(conn, trigger)
            secret = await self._secret(conn, hook)
        known = _Known(hook, secret, time.monotonic() + self.cache_seconds)
        if self.cache_seconds > 0:
            if len(self.known) >= _MAX_KNOWN:
                self.known.clear()
            self.known[(graph, name)] = known
        return known

    async def _secret(self, conn: AsyncConnection, hook: Hook) -> str | None:
        if hook.secret_name is None:
            return None
        try:
            return await secret_queries.get_secret(conn, self.runtime.keys, hook.secret_name)
        except NotFound:
            _log.warning(
                "hook %s/%s: its secret %r is not stored: every delivery is refused",
                hook.graph,
                hook.name,
                hook.secret_name,
            )
        except SecretKeyMismatch as exc:
            _log.error("hook %s/%s: %s", hook.graph, hook.name, exc)
        return None

    async def _compile(self, conn: AsyncConnection, trigger: TriggerRecord) -> Hook:
        record = await graph_queries.get_graph(conn, trigger.graph, trigger.graph_version)
        hook = Hook.compile(trigger, record.spec)
        self.compiled.put(hook)
        return hook

    def _check_rate(self, graph: str, name: str) -> None:
        wait = self.limiter.take(f"{graph}/{name}")
        if wait is None:
            return
        response = _problem(
            429,
            "Too Many Requests",
            "this hook receives more deliveries than its rate limit; try again later",
            headers={"Retry-After": str(max(1, round(wait + 0.5)))},
        )
        # One line in the delivery log per hook and second, not one per rejected request
        # (a flood must not turn into as many database writes).
        now = time.monotonic()
        logged = now - self._last_limited.get((graph, name), -1.0) >= 1.0
        if logged:
            self._last_limited[(graph, name)] = now
        raise _Answer(response, "rate_limited" if logged else None, "rate limit exceeded")

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large()
                chunks.append(chunk)
        except ClientDisconnect:
            raise _Answer(Response(status_code=400), None) from None
        return b"".join(chunks)

    def _too_large(self) -> _Answer:
        detail = f"the body is larger than {self.max_bytes} bytes"
        return _Answer(_problem(413, "Content Too Large", detail), "too_large")

    def _format(self, headers: Mapping[str, str]) -> BodyFormat:
        try:
            return body_format(headers.get("content-type"))
        except UnsupportedMediaType as exc:
            raise _Answer(
                _problem(415, "Unsupported Media Type", str(exc)), "unsupported", str(exc)
            ) from None

    async def _verify(self, known: _Known, headers: Mapping[str, str], body: bytes) -> _Known:
        """`known`, or the hook read again when the signature fails with a secret kept
        in memory and passes with the stored one (a secret was just replaced). Raises
        `_Answer` 401."""
        try:
            verify(known.hook.auth, known.secret, headers, body, datetime.now(UTC))
            return known
        except SignatureRejected as exc:
            reason = str(exc)
        if self.cache_seconds > 0:
            stored = await self._known(known.hook.graph, known.hook.name, fresh=True)
            if stored.secret != known.secret or stored.hook is not known.hook:
                try:
                    verify(stored.hook.auth, stored.secret, headers, body, datetime.now(UTC))
                    return stored
                except SignatureRejected as exc:
                    reason = str(exc)
        hook = known.hook
        _log.info("hook %s/%s: signature rejected: %s", hook.graph, hook.name, reason)
        # Nothing about why: a sender probing secrets learns nothing.
        raise _Answer(
            _problem(401, "Unauthorized", "the delivery is not authenticated"),
            "unauthorized",
            reason,
        )

    def _apply(self, hook: Hook, event: str | None, context: Mapping[str, Any]) -> dict[str, Any]:
        try:
            skipped = hook.skip_reason(event, context)
        except ExpressionError as exc:
            detail = f"the hook's `if` cannot be evaluated on this delivery: {exc}"
            errors = [{"path": "webhook.if", "message": str(exc), "line": None}]
            raise _Answer(
                _problem(422, "Unprocessable Content", detail, errors=errors), "invalid", detail
            ) from None
        if skipped is not None:
            raise _Answer(_json(200, {"skipped": skipped}), "skipped", skipped)
        try:
            return hook.resolve(context)
        except ExpressionError as exc:
            detail = f"the hook's params cannot be computed from this delivery: {exc}"
            errors = [{"path": "webhook.params", "message": str(exc), "line": None}]
        except ParamError as exc:
            detail = "the params do not fit the graph"
            errors = [
                {"path": f"params.{param}", "message": message, "line": None}
                for param, message in exc.problems.items()
            ]
        raise _Answer(
            _problem(422, "Unprocessable Content", detail, errors=errors),
            "invalid",
            f"{detail}: {errors}",
        )

    # --- storing -----------------------------------------------------------------------

    async def _create(
        self,
        hook: Hook,
        wanted_id: str | None,
        params: dict[str, Any],
        trigger_info: dict[str, Any],
    ) -> tuple[Response, str] | None:
        key = None
        if wanted_id is not None:
            key = executions.webhook_key(hook.graph, hook.name, wanted_id)
        creation = Creation(
            NewExecution(
                graph=hook.graph,
                graph_version=hook.graph_version,
                params=params,
                trigger_type="webhook",
                trigger_info=trigger_info,
                idempotency_key=key,
            ),
            hook=hook.name,
            delivery_id=wanted_id,
        )
        outcome = await self.writer.create(creation)
        if outcome == STALE:
            self.known.pop((hook.graph, hook.name), None)
            return None
        if outcome == GONE:
            self.known.pop((hook.graph, hook.name), None)
            return _problem(404, "Not Found", _NOT_FOUND), "not_found"
        assert isinstance(outcome, Accepted)
        if not outcome.created:
            return _json(
                200, {"execution_id": outcome.execution_id, "duplicate": True}
            ), "duplicate"
        return _json(202, {"execution_id": outcome.execution_id}), "accepted"


class _AsgiEndpoint:
    """The hook routes as a plain ASGI app (Starlette calls an object that is not a
    function that way): the handler raises no HTTPException, so Starlette's per-request
    wrapping for them would be work for nothing on the hottest route."""

    def __init__(self, handler: WebhookHandler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler.handle(Request(scope, receive))
        await response(scope, receive, send)


def _unlogged(response: Response) -> str:
    return {404: "not_found", 429: "rate_limited"}.get(response.status_code, "disconnected")


def create_app(runtime: Runtime, settings: WebhookSettings) -> Starlette:
    """The webhook app over `runtime` (its database, keys and metrics registry)."""
    handler = WebhookHandler(runtime, settings)

    deliveries = _AsgiEndpoint(handler)
    routes = [
        Route("/hooks/{graph}", deliveries, methods=["POST"]),
        Route("/hooks/{graph}/{name}", deliveries, methods=["POST"]),
        *health_routes(runtime),
    ]
    app = Starlette(routes=routes)
    app.state.webhooks = handler
    return app
