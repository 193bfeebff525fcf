"""The webhook service's app (DESIGN §6): `POST /hooks/{graph}` and
`/hooks/{graph}/{name}`, plus `/healthz`, `/readyz`, `/metrics`.

A delivery passes these checks in this order, and the first that fails answers:

    unknown or disabled hook 404 · rate limit 429 · body too large 413 ·
    content type 415 · signature 401 · delivery seen before 200 duplicate ·
    malformed body 400 · `events` / `if` 200 skipped · params 422 · 202 accepted

A 202 is sent only after the execution and its outbox row are committed; a database that
cannot be reached answers 503 (`Retry-After`). Each outcome for a hook that exists is
written to its delivery log (for a 202 and a duplicate, in the same transaction as the
execution). Nothing in an answer says why a signature failed; the log does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from loom_auth import problem_response
from loom_common import ExpressionError, ParamError
from loom_db import DatabaseUnavailable, NotFound, TransactionConflict, deliveries, executions
from loom_db import graphs as graph_queries
from loom_db import secrets as secret_queries
from loom_db.errors import SecretKeyMismatch
from loom_db.executions import ExecutionRecord
from loom_db.graphs import TriggerRecord
from loom_db.models import graphs as graph_rows
from loom_runtime import Runtime, health_routes
from loom_webhook.deliveries import body_format, decode_body, is_github_ping
from loom_webhook.errors import MalformedBody, SignatureRejected, UnsupportedMediaType
from loom_webhook.hooks import Hook, HookCache
from loom_webhook.ratelimit import HookLimiter
from loom_webhook.settings import WebhookSettings
from loom_webhook.signatures import delivery_id, event_name, verify

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


_METRICS: dict[int, _Metrics] = {}


class WebhookHandler:
    """Everything one delivery needs, held for the app's life."""

    def __init__(self, runtime: Runtime, settings: WebhookSettings) -> None:
        self.runtime = runtime
        self.database = runtime.database
        self.max_bytes = settings.webhook_max_bytes
        self.limiter = HookLimiter(settings.webhook_rate_limit, settings.webhook_rate_burst)
        self.hooks = HookCache()
        registry = runtime.registry
        if id(registry) not in _METRICS:
            _METRICS[id(registry)] = _Metrics.of(registry)
        self.metrics = _METRICS[id(registry)]
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
            hook, secret, seen = await self._lookup(graph, name, headers)
            wanted_id = delivery_id(hook.auth, headers)
            self._check_rate(graph, name)
            body = await self._read_body(request)
            fmt = self._format(headers)
            try:
                verify(hook.auth, secret, headers, body, datetime.now(UTC))
            except SignatureRejected as exc:
                _log.info("hook %s/%s: signature rejected: %s", graph, name, exc)
                # Nothing about why: a sender probing secrets learns nothing.
                raise _Answer(
                    _problem(401, "Unauthorized", "the delivery is not authenticated"),
                    "unauthorized",
                    str(exc),
                ) from None
            event = event_name(hook.auth, headers)
            if seen is not None:
                raise _Answer(self._duplicate(seen), "duplicate", execution_id=seen.id)
            if is_github_ping(hook.auth, headers):
                raise _Answer(_json(200, {"pong": True}), "ping")
            try:
                payload = decode_body(fmt, body)
            except MalformedBody as exc:
                raise _Answer(_problem(400, "Bad Request", str(exc)), "invalid", str(exc)) from None
            context = {
                "payload": payload,
                "headers": {key.lower(): value for key, value in headers.items()},
                "event": event,
            }
            params = self._apply(hook, event, context)
        except _Answer as answer:
            if answer.outcome is not None:
                await self._record(graph, name, wanted_id, answer)
            return answer.response, answer.outcome or _unlogged(answer.response)
        trigger_info = {
            "hook": name,
            "event": event,
            "delivery_id": wanted_id,
            "payload": payload,
        }
        return await self._create(hook, wanted_id, params, trigger_info)

    # --- the checks, in order ----------------------------------------------------------

    async def _lookup(
        self, graph: str, name: str, headers: Mapping[str, str]
    ) -> tuple[Hook, str | None, ExecutionRecord | None]:
        """The hook, its secret's value and the execution of this delivery id if one was
        made, in one read. Raises `_Answer` 404 for an unknown or disabled hook."""
        async with self.database.read() as conn:
            trigger = await graph_queries.find_webhook(conn, graph, name)
            if trigger is None:
                raise _Answer(_problem(404, "Not Found", _NOT_FOUND), None)
            hook = self.hooks.get(trigger) or await self._compile(conn, trigger)
            secret = None
            if hook.secret_name is not None:
                try:
                    secret = await secret_queries.get_secret(
                        conn, self.runtime.keys, hook.secret_name
                    )
                except NotFound:
                    _log.warning(
                        "hook %s/%s: its secret %r is not stored: every delivery is refused",
                        graph,
                        name,
                        hook.secret_name,
                    )
                except SecretKeyMismatch as exc:
                    _log.error("hook %s/%s: %s", graph, name, exc)
            seen = None
            wanted = delivery_id(hook.auth, headers)
            if wanted is not None:
                key = executions.webhook_key(graph, name, wanted)
                seen = await executions.find_by_key(conn, key)
        return hook, secret, seen

    async def _compile(self, conn: AsyncConnection, trigger: TriggerRecord) -> Hook:
        record = await graph_queries.get_graph(conn, trigger.graph, trigger.graph_version)
        hook = Hook.compile(trigger, record.spec)
        self.hooks.put(hook)
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
        too_large = _Answer(
            _problem(
                413,
                "Content Too Large",
                f"the body is larger than {self.max_bytes} bytes",
            ),
            "too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_bytes:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise _Answer(Response(status_code=400), None) from None
        return b"".join(chunks)

    def _format(self, headers: Mapping[str, str]) -> Any:
        try:
            return body_format(headers.get("content-type"))
        except UnsupportedMediaType as exc:
            raise _Answer(
                _problem(415, "Unsupported Media Type", str(exc)), "unsupported", str(exc)
            ) from None

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
    ) -> tuple[Response, str]:
        key = (
            None if wanted_id is None else executions.webhook_key(hook.graph, hook.name, wanted_id)
        )
        async with self.database.transaction() as conn:
            # A shared lock on the graph's row: a pause or delete commits before this
            # execution or after it, never in between (then it is refused or reaped).
            row = (
                await conn.execute(
                    select(graph_rows.c.enabled)
                    .where(graph_rows.c.name == hook.graph)
                    .with_for_update(read=True)
                )
            ).first()
            if row is None or not row.enabled:
                return _problem(404, "Not Found", _NOT_FOUND), "not_found"
            record, created = await executions.create_execution(
                conn,
                graph=hook.graph,
                graph_version=hook.graph_version,
                params=params,
                trigger_type="webhook",
                trigger_info=trigger_info,
                idempotency_key=key,
            )
            outcome = "accepted" if created else "duplicate"
            await deliveries.record_delivery(
                conn,
                graph=hook.graph,
                hook=hook.name,
                delivery_id=wanted_id,
                status_code=202 if created else 200,
                outcome=outcome,
                execution_id=record.id,
            )
        if not created:
            return self._duplicate(record), "duplicate"
        self.database.notify_committed()
        return _json(202, {"execution_id": record.id}), "accepted"

    def _duplicate(self, record: ExecutionRecord) -> Response:
        return _json(200, {"execution_id": record.id, "duplicate": True})

    async def _record(self, graph: str, name: str, wanted_id: str | None, answer: _Answer) -> None:
        assert answer.outcome is not None
        async with self.database.transaction() as conn:
            await deliveries.record_delivery(
                conn,
                graph=graph,
                hook=name,
                delivery_id=wanted_id,
                status_code=answer.response.status_code,
                outcome=answer.outcome,
                detail=None if answer.detail is None else answer.detail[:1000],
                execution_id=answer.execution_id,
            )


def _unlogged(response: Response) -> str:
    return {404: "not_found", 429: "rate_limited"}.get(response.status_code, "disconnected")


def create_app(runtime: Runtime, settings: WebhookSettings) -> Starlette:
    """The webhook app over `runtime` (its database, keys and metrics registry)."""
    handler = WebhookHandler(runtime, settings)

    routes = [
        Route("/hooks/{graph}", handler.handle, methods=["POST"]),
        Route("/hooks/{graph}/{name}", handler.handle, methods=["POST"]),
        *health_routes(runtime),
    ]
    app = Starlette(routes=routes)
    app.state.webhooks = handler
    return app
