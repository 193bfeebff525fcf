"""The route table's building block: an `Endpoint` says what a route is (method, path,
role, request and response models, documented errors) and the app, the OpenAPI document
and the RBAC test are all made from the same table.

A handler is `async def handler(call: Call) -> BaseModel | Response | None`: a model is
answered as JSON with the endpoint's status, None as 204, a `Response` as it is (for
another status, headers or media type). It raises for errors (`ApiProblem`, or the
libs' errors that `problems.problem_for` maps).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson
import pydantic_core
from pydantic import BaseModel, ValidationError
from starlette.authentication import AuthCredentials, AuthenticationBackend
from starlette.requests import Request
from starlette.responses import Response

from loom_auth import Anonymous, Principal, Role, authorize
from loom_rest.problems import ApiProblem, problem_for, unprocessable, validation_errors
from loom_rest.runtime import Runtime

__all__ = ["Call", "Endpoint", "json_response", "read_body"]

_B = TypeVar("_B")
_Q = TypeVar("_Q")

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Call(Generic[_B, _Q]):
    """One request as a handler sees it: validated body and query, the caller."""

    request: Request
    runtime: Runtime
    principal: Principal | None
    body: _B
    query: _Q

    @property
    def actor(self) -> str | None:
        """Who is acting, for the audit log: the username (API tokens act as their
        owner)."""
        return self.principal.username if self.principal is not None else None

    @property
    def user(self) -> Principal:
        """The caller of a guarded route."""
        assert self.principal is not None, "a public route has no caller"
        return self.principal

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])


Handler = Callable[[Call[Any, Any]], Awaitable[BaseModel | Response | None]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One route. `role` None means public. `body` / `query` are pydantic models the
    request is validated against (422 with every error); `response` documents (and
    serializes) the success answer. `errors` lists the statuses worth documenting beyond
    the ones every route of its kind has. `request_content` replaces the JSON request body
    in the OpenAPI document for routes that read other media types themselves;
    `response_content` adds media types to the success answer."""

    method: str
    path: str
    handler: Handler
    role: Role | None
    summary: str
    status: int = 200
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    request_content: dict[str, Any] | None = None
    response_content: dict[str, Any] = field(default_factory=dict)
    other_statuses: dict[int, str] = field(default_factory=dict)
    """Other success statuses the route may answer with the same `response` model."""
    body_required: bool = True
    """False: an empty body is read as `{}` (e.g. a trigger without params)."""

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


def json_response(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """`model` as JSON (aliases, ISO times with `Z`)."""
    body = orjson.dumps(model.model_dump(mode="json", by_alias=True))
    return Response(body, status_code=status, headers=headers, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing with 413 as soon as it passes `limit` bytes: a declared
    `Content-Length` over the limit is refused before anything is read, and a streamed
    body is counted as it arrives, never held past the limit. The body is cached on the
    request, so `request.form()` parses it afterwards."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's own cache: request.body()/form() reuse it
    return body


def _too_large(limit: int) -> ApiProblem:
    return ApiProblem(413, f"the request body is larger than {limit:,} bytes")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _json_body(
    request: Request, model: type[BaseModel], limit: int, required: bool
) -> BaseModel:
    raw = await read_body(request, limit)
    if not raw.strip() and required:
        error = {"path": "body", "message": "a JSON body is required", "line": None}
        raise unprocessable("the request has no body", [error])
    kind = media_type(request)
    if kind not in (JSON, "") and not kind.endswith("+json"):
        raise ApiProblem(415, f"send the body as {JSON}, not {kind}")
    try:
        # pydantic's parser, as the model's below: it keeps big integers as integers
        # (orjson would make them floats) so that `_refuse_unstorable` sees them.
        data = pydantic_core.from_json(raw) if raw.strip() else {}
    except ValueError as exc:
        error = {"path": "body", "message": f"not valid JSON: {exc}", "line": None}
        raise unprocessable("the body is not valid JSON", [error]) from None
    _refuse_unstorable(data, "body")
    try:
        # From the JSON text: strict models then take JSON's own types (and ISO times).
        return model.model_validate_json(raw if raw.strip() else b"{}")
    except ValidationError as exc:
        errors = validation_errors(exc, "body")
        raise unprocessable("the request body is not valid", errors) from None


def _refuse_unstorable(value: Any, path: str) -> None:
    """422 for what no stored value may hold, with its place: a NUL character anywhere
    (PostgreSQL refuses it) or an integer beyond 64 bits (JSON columns, answers and
    messages carry 64-bit integers: a bigger one would be stored, then fail every answer
    that shows it)."""
    if isinstance(value, str):
        if "\x00" in value:
            error = {"path": path, "message": "must not contain NUL characters", "line": None}
            raise unprocessable("the request is not valid", [error])
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            error = {"path": path, "message": "an integer must fit in 64 bits", "line": None}
            raise unprocessable("the request is not valid", [error])
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_unstorable(key, path)
            _refuse_unstorable(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_unstorable(item, f"{path}.{index}")


def _query(request: Request, model: type[BaseModel]) -> BaseModel:
    params: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if key in params:
            error = {"path": f"query.{key}", "message": "given more than once", "line": None}
            raise unprocessable("the query is not valid", [error])
        _refuse_unstorable(value, f"query.{key}")
        params[key] = value
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise unprocessable("the query is not valid", validation_errors(exc, "query")) from None


Observe = Callable[[str, str, int, float], None]
"""`observe(method, path template, status, seconds)`: the metrics hook."""


def endpoint_app(
    endpoint: Endpoint, runtime: Runtime, backend: AuthenticationBackend, observe: Observe
) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint of `endpoint`: authorize, validate, call, answer; every
    error becomes problem details here, and every answer is observed."""
    limit = runtime.settings.rest_max_body_bytes

    async def run(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await _answer(request)
        except Exception as exc:  # every error is answered; problem_for logs bugs as 500s
            response = problem_for(exc)
        observe(endpoint.method, endpoint.path, response.status_code, time.perf_counter() - started)
        return response

    async def _answer(request: Request) -> Response:
        # Authenticated here rather than in AuthenticationMiddleware, so that a database
        # outage while looking up an API token is answered 503 like any other.
        found = await backend.authenticate(request)
        request.scope["auth"], request.scope["user"] = found or (AuthCredentials(), Anonymous())
        if endpoint.role is not None:
            principal: Principal | None = authorize(request, endpoint.role)
        else:
            principal = request.user if isinstance(request.user, Principal) else None
        for value in request.path_params.values():
            if "\x00" in str(value):  # no stored name or id holds one
                raise ApiProblem(404, f"nothing at {request.url.path}")
        query = _query(request, endpoint.query) if endpoint.query is not None else None
        body = None
        if endpoint.body is not None:
            body = await _json_body(request, endpoint.body, limit, endpoint.body_required)
        result = await endpoint.handler(Call(request, runtime, principal, body, query))
        if result is None:
            return Response(status_code=204)
        if isinstance(result, Response):
            return result
        return json_response(result, endpoint.status)

    run.__name__ = endpoint.operation_id
    return run
