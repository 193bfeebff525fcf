"""Every error the API answers, as RFC 9457 problem details (`application/problem+json`).

Handlers raise; `problem_for` turns what they raise into ONE answer, in one place:

* `ApiProblem` — an answer chosen by the handler (status, title, detail, extensions);
* loom_common's `SpecError` / `ParamError` → 422 with `errors: [{path, message, line}]`;
* loom_db's `NotFound` → 404, `Conflict` → 409, `DatabaseUnavailable` /
  `TransactionConflict` → 503 with `Retry-After` (never a 500: DESIGN §11);
* loom_messaging's `BrokerUnavailable` → 503 with `Retry-After`;
* loom_auth's errors → 401 / 403 (`auth_error_response`);
* anything else → 500, logged with its traceback (a bug, never a user's fault).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from loom_auth import AuthError, PasswordPolicyError, auth_error_response, problem_response
from loom_common import ParamError, SpecError
from loom_db import Conflict, DatabaseUnavailable, NotFound, TransactionConflict
from loom_db.pagination import InvalidCursor
from loom_messaging import BrokerUnavailable

__all__ = ["ApiProblem", "problem_for", "validation_errors"]

_log = logging.getLogger("loom.rest")

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class ApiProblem(Exception):
    """An error answer chosen by a handler: `raise ApiProblem(409, "graph 'x' exists")`."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title or TITLES.get(status, "Error")
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = extensions

    def response(self) -> Response:
        return problem_response(
            self.status, self.title, self.detail, headers=self.headers, **self.extensions
        )


def validation_errors(exc: ValidationError, where: str) -> list[dict[str, Any]]:
    """`{path, message, line}` for each error of a request model; `where` ("body",
    "query") prefixes the path."""
    found = []
    for error in exc.errors(include_url=False):
        path = ".".join([where, *(str(part) for part in error["loc"])])
        message = str(error["msg"]).removeprefix("Value error, ")
        found.append({"path": path, "message": message, "line": None})
    return found


def unprocessable(detail: str, errors: Sequence[Mapping[str, Any]]) -> ApiProblem:
    return ApiProblem(422, detail, errors=list(errors))


def _spec_errors(exc: SpecError) -> Iterable[dict[str, Any]]:
    for issue in exc.issues:
        yield {"path": issue.path or "(document)", "message": issue.message, "line": issue.line}


def problem_for(exc: Exception) -> Response:
    """The answer to `exc` (see the module docstring). Raises nothing."""
    if isinstance(exc, ApiProblem):
        return exc.response()
    if isinstance(exc, SpecError):
        errors = list(_spec_errors(exc))
        count = f"{len(errors)} error{'s' if len(errors) != 1 else ''}"
        return unprocessable(f"the graph is not valid: {count}", errors).response()
    if isinstance(exc, ParamError):
        errors = [
            {"path": f"body.params.{name}", "message": message, "line": None}
            for name, message in exc.problems.items()
        ]
        return unprocessable("the params do not fit the graph", errors).response()
    if isinstance(exc, PasswordPolicyError):
        errors = [{"path": "body.password", "message": str(exc), "line": None}]
        return unprocessable(str(exc), errors).response()
    if isinstance(exc, InvalidCursor):
        error = {"path": "query.cursor", "message": str(exc), "line": None}
        return unprocessable("the query is not valid", [error]).response()
    if isinstance(exc, AuthError):
        return auth_error_response(exc)
    if isinstance(exc, NotFound):
        return ApiProblem(404, str(exc)).response()
    if isinstance(exc, Conflict):
        return ApiProblem(409, str(exc)).response()
    if isinstance(exc, (DatabaseUnavailable, TransactionConflict)):
        _log.warning("answering 503: %s", exc)
        return ApiProblem(
            503,
            "the database is not reachable right now; nothing was changed, try again",
            headers={"Retry-After": "2"},
        ).response()
    if isinstance(exc, BrokerUnavailable):
        _log.warning("answering 503: %s", exc)
        return ApiProblem(
            503,
            "the message broker is not reachable right now; try again",
            headers={"Retry-After": "2"},
        ).response()
    _log.exception("unexpected error", exc_info=exc)
    return ApiProblem(500, "an unexpected error; it was logged").response()
