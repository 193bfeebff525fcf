"""A small client of Loom's REST API (DESIGN §5) for the `loom` commands.

Every way a call can go wrong becomes ONE exception, `ClientError`, carrying the message
to print and the exit status to end with (`EXIT_*`), decided here and nowhere else:

* the server answered problem details → `Problem` (a `ClientError`) with its title,
  detail and `errors[]`; 401/403 exit 3, 400/413/415/422 exit 2, 5xx exit 4, any other
  4xx exit 1;
* the server cannot be reached (refused, DNS, timeout, TLS) → exit 4;
* no credentials at all → exit 3, before anything is sent.

A stored access token that has expired is refreshed once (POST /api/v1/auth/refresh,
the new pair handed to `on_refresh` to be stored) and the request retried once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "Client",
    "ClientError",
    "Problem",
    "TokenPair",
    "normalize_server",
]

EXIT_OK = 0
EXIT_FAILED = 1
"""The server said no (404, 409, 429, ...), or what was asked for failed."""
EXIT_INVALID = 2
"""Invalid input: a usage error, or the server answered 400, 413, 415 or 422."""
EXIT_AUTH = 3
"""Not logged in, the login was refused or expired (401), or not allowed (403)."""
EXIT_UNREACHABLE = 4
"""The server cannot be reached, or answered with a 5xx (try again later)."""

API = "/api/v1"
_INVALID_STATUSES = frozenset({400, 413, 415, 422})


class ClientError(Exception):
    """A failed call: `message` (one line, printed after `loom: `), `lines` to print
    after it, and the `exit_code` the command ends with."""

    def __init__(self, message: str, exit_code: int, lines: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.lines = lines


@dataclass(frozen=True, slots=True)
class ProblemError:
    """One entry of a problem's `errors[]`."""

    path: str
    message: str
    line: int | None


class Problem(ClientError):
    """The server answered an error status; `title`, `detail` and `errors` come from its
    problem details (RFC 9457) when it sent them."""

    def __init__(
        self, status: int, title: str, detail: str, errors: tuple[ProblemError, ...] = ()
    ) -> None:
        lines = tuple(
            f"  {e.path}: {e.message}" + (f" (line {e.line})" if e.line is not None else "")
            for e in errors
        )
        message = f"{title}: {detail}" if detail else title
        super().__init__(message, _exit_code_of(status), lines)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors


def _exit_code_of(status: int) -> int:
    if status in (401, 403):
        return EXIT_AUTH
    if status in _INVALID_STATUSES:
        return EXIT_INVALID
    if status >= 500:
        return EXIT_UNREACHABLE
    return EXIT_FAILED


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str


def normalize_server(url: str) -> str:
    """The server's root URL as the commands use it: `http://` when no scheme is given, no
    trailing `/` or `/api/v1`. Raises `ClientError` (exit 2) for something that is not
    an http(s) URL."""
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
    text = text.rstrip("/")
    text = text.removesuffix(API).rstrip("/")
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ClientError(f"not a valid server URL {url!r}: {exc}", EXIT_INVALID) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ClientError(
            f"not a valid server URL {url!r}: expected http(s)://HOST[:PORT]", EXIT_INVALID
        )
    return text


@dataclass
class Client:
    """Calls on one server. `token` is sent as `Authorization: Bearer`; with a
    `refresh_token` an expired access token is refreshed once per call."""

    server: str
    token: str | None = None
    refresh_token: str | None = None
    on_refresh: Callable[[TokenPair], None] | None = None
    refresh_guard: Callable[[], AbstractContextManager[TokenPair | None]] | None = None
    """Held around a refresh (and `on_refresh`): a lock shared with other `loom`
    processes, yielding the pair stored now (None if none) so that a pair another
    process refreshed meanwhile is adopted instead of presenting a spent token."""
    timeout: float = 30.0
    transport: httpx.BaseTransport | None = None
    _http: httpx.Client = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._http = httpx.Client(
            base_url=self.server,
            timeout=self.timeout,
            transport=self.transport,
            headers={"User-Agent": "loom-cli"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- calls ----------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: bool = True,
    ) -> httpx.Response:
        """One request to `API + path`; the 2xx response. Raises `ClientError` (see the
        module docstring)."""
        if auth and not self.token:
            raise ClientError(
                f"not logged in to {self.server}: run `loom login --server {self.server}` "
                "(or set LOOM_TOKEN to an API token)",
                EXIT_AUTH,
            )
        response = self._send(method, path, json, content, params, headers, auth)
        if response.status_code == 401 and auth and self.refresh_token:
            self._refresh()
            response = self._send(method, path, json, content, params, headers, auth)
        if response.is_success:
            return response
        raise _problem(response)

    def get(
        self, path: str, params: Mapping[str, str | int | None] | None = None, *, auth: bool = True
    ) -> Any:
        """GET `path` with the query `params` that are not None; the JSON answer."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return _json(self.call("GET", path, params=query, auth=auth))

    def login(self, username: str, password: str) -> TokenPair:
        answer = _json(
            self.call(
                "POST",
                "/auth/login",
                json={"username": username, "password": password},
                auth=False,
            )
        )
        return _token_pair(answer)

    def _refresh(self) -> None:
        assert self.refresh_token is not None
        with self.refresh_guard() if self.refresh_guard is not None else nullcontext() as latest:
            if latest is not None and latest.refresh_token != self.refresh_token:
                # Another command refreshed meanwhile: its pair is the live one.
                self.token, self.refresh_token = latest.access_token, latest.refresh_token
                return
            self._refresh_now()

    def _refresh_now(self) -> None:
        assert self.refresh_token is not None
        response = self._send(
            "POST", "/auth/refresh", {"refresh_token": self.refresh_token}, None, None, None, False
        )
        if not response.is_success:
            problem = _problem(response)
            if problem.exit_code != EXIT_AUTH:
                raise problem
            raise ClientError(
                f"your login to {self.server} has expired: run `loom login` again",
                EXIT_AUTH,
            ) from problem
        pair = _token_pair(_json(response))
        self.token, self.refresh_token = pair.access_token, pair.refresh_token
        if self.on_refresh is not None:
            self.on_refresh(pair)

    def _send(
        self,
        method: str,
        path: str,
        json: Any,
        content: bytes | None,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str] | None,
        auth: bool,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if auth and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        try:
            return self._http.request(
                method,
                API + path,
                json=json,
                content=content,
                params=params,
                headers=all_headers,
            )
        except httpx.UnsupportedProtocol as exc:
            raise ClientError(
                f"not a valid server URL {self.server!r}: {exc}", EXIT_INVALID
            ) from exc
        except httpx.TimeoutException as exc:
            raise ClientError(
                f"the Loom server at {self.server} did not answer within {self.timeout:g}s",
                EXIT_UNREACHABLE,
            ) from exc
        except httpx.TransportError as exc:
            raise ClientError(
                f"cannot reach the Loom server at {self.server} (is it running? is the URL "
                f"right? set it with --server or LOOM_SERVER): {exc}",
                EXIT_UNREACHABLE,
            ) from exc


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ClientError(
            f"the answer from {response.request.url} is not JSON: is this a Loom server?",
            EXIT_UNREACHABLE,
        ) from None


def _token_pair(answer: Any) -> TokenPair:
    if not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
        raise ClientError("the server's login answer has no access token", EXIT_UNREACHABLE)
    return TokenPair(answer["access_token"], str(answer.get("refresh_token") or ""))


def _problem(response: httpx.Response) -> Problem:
    """The error answer `response` as a `Problem`, from its problem details if it has
    them, else from its status line."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or "title" not in body:
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        return Problem(status, f"HTTP {status} {response.reason_phrase}".strip(), text)
    errors = tuple(
        ProblemError(
            path=str(e.get("path") or ""),
            message=str(e.get("message") or ""),
            line=e["line"] if isinstance(e.get("line"), int) else None,
        )
        for e in body.get("errors") or ()
        if isinstance(e, dict)
    )
    return Problem(status, str(body.get("title") or ""), str(body.get("detail") or ""), errors)
