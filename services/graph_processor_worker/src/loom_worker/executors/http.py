"""The `http` executor: one request over a shared httpx client, and a circuit breaker per host.

The breaker counts consecutive failures of a host (scheme, host and port): connection
errors, timeouts and 5xx responses. After `failure_threshold` of them it opens and every
node aimed at that host fails at once, without a request, instead of burning its retries
on a dead endpoint; after `cool_down` seconds one trial request goes out (half-open): its
success closes the breaker, its failure re-opens it. A 4xx is the client's fault, not the
host's: it counts as a sign of life.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from .base import LogSink, NodeCall, NodeFailed, NodeResult

if TYPE_CHECKING:
    # Imported on first use: httpx (with the rich, click and pygments its __init__ pulls
    # in, and the client's SSL context) is ~7 MB a worker without http nodes never needs.
    import httpx

__all__ = ["DEFAULT_TIMEOUT", "BreakerState", "CircuitBreaker", "HttpExecutor"]

DEFAULT_TIMEOUT = 30.0
"""Seconds, for a spec without `timeout` (connect, read, write and pool each)."""

_RETRYABLE_4XX = frozenset({408, 425, 429})
"""Client errors that are worth a retry; any other unexpected 4xx is not retried."""


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """The breaker of one host. Pure: no I/O, the clock is injected (`time.monotonic`)."""

    def __init__(
        self,
        failure_threshold: int = 5,
        cool_down: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.cool_down = cool_down
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        """Consecutive failures so far."""
        self._opened_at = 0.0
        self._trial_in_flight = False

    def allow(self) -> bool:
        """May a request go out now? Once the cool-down is over, the first caller gets
        True (the trial request, breaker half-open) and the others False until it ends."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.cool_down:
                return False
            self.state = BreakerState.HALF_OPEN
        if self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def retry_after(self) -> float:
        """Seconds until the next trial request may go out (0 when one is in flight)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cool_down - self._clock())

    def record_success(self) -> None:
        """The host answered (anything but a 5xx): close."""
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._trial_in_flight = False

    def record_failure(self) -> None:
        """A connection error, timeout or 5xx: count it; open at the threshold, and re-open
        after a failed trial. (Stragglers failing while open do not extend the cool-down.)"""
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.failure_threshold
        ):
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()
        self._trial_in_flight = False

    def release(self) -> None:
        """The trial request ended without a verdict (cancelled): let another one try."""
        self._trial_in_flight = False


class HttpExecutor:
    """Runs `http` nodes over one shared `httpx.AsyncClient` (created on the first
    request, owned and closed here unless `client` is given; an owned client follows
    redirects)."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        failure_threshold: int = 5,
        cool_down: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._owns_client = client is None
        self._client = client
        self._failure_threshold = failure_threshold
        self._cool_down = cool_down
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    async def __aenter__(self) -> HttpExecutor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()

    def _the_client(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(follow_redirects=True)
        return self._client

    async def request(self, spec: Mapping[str, Any], *, call: NodeCall, log: LogSink) -> NodeResult:
        """Make the request of a rendered `http` spec: `method` (GET), `url`, `headers`,
        `json` or `body`, `expect` (status codes; default any 2xx), `timeout` (seconds, 30).

        Outputs: `status`, `headers` (lower-case names), `body` (parsed if JSON, else text).
        Logs `GET https://host/path -> 200 (12 ms)` (no query string) to stdout.

        Raises `NodeFailed`: for an unexpected status (with the outputs; not retryable for
        a 4xx other than 408, 425 and 429), a connection error or timeout (the httpx error),
        an open circuit (without a request), and, not retryable, for an invalid spec or URL.
        """
        import httpx

        method, url, options, expect = _parse_spec(spec)
        key = _host_key(url)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = CircuitBreaker(self._failure_threshold, self._cool_down, clock=self._clock)
            self._breakers[key] = breaker
        if not breaker.allow():
            if breaker.state is BreakerState.HALF_OPEN:
                wait = "a trial request is in flight"
            else:
                wait = f"retrying after {math.ceil(breaker.retry_after())}s"
            raise NodeFailed(
                f"circuit open for {key} after {breaker.failures} consecutive failures; {wait}"
            )
        trial = breaker.state is BreakerState.HALF_OPEN
        shown = f"{method} {url.scheme}://{url.netloc.decode('ascii')}{url.path}"
        started = time.perf_counter()
        try:
            response = await self._the_client().request(method, url, **options)
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            if trial:
                breaker.release()
            raise NodeFailed(_describe(exc), retryable=False) from exc
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TransportError):
                breaker.record_failure()
            else:  # too many redirects, undecodable content: the host is alive
                breaker.record_success()
            log("stderr", f"{shown} -> {_describe(exc)} ({_elapsed_ms(started)} ms)")
            raise NodeFailed(_describe(exc)) from exc
        except BaseException:  # cancelled: no verdict on the host
            if trial:
                breaker.release()
            raise
        status = response.status_code
        if status >= 500:
            breaker.record_failure()
        else:
            breaker.record_success()
        log("stdout", f"{shown} -> {status} ({_elapsed_ms(started)} ms)")
        outputs = {
            "status": status,
            "headers": dict(response.headers.items()),
            "body": _body(response),
        }
        if status not in expect if expect is not None else not 200 <= status < 300:
            wanted = "2xx" if expect is None else ", ".join(str(code) for code in expect)
            raise NodeFailed(
                f"unexpected status {status} (expected {wanted})",
                outputs=outputs,
                retryable=not (400 <= status < 500) or status in _RETRYABLE_4XX,
            )
        return NodeResult(outputs=outputs)


def _parse_spec(
    spec: Mapping[str, Any],
) -> tuple[str, httpx.URL, dict[str, Any], list[int] | None]:
    """(method, url, the client's request options, expect); NodeFailed for a bad spec."""
    import httpx

    def invalid(message: str) -> NodeFailed:
        return NodeFailed(f"invalid http spec: {message}", retryable=False)

    method = spec.get("method", "GET")
    if not isinstance(method, str) or not method.isalpha():
        raise invalid(f"method {method!r} is not an HTTP method")
    raw_url = spec.get("url")
    if not isinstance(raw_url, str) or not raw_url:
        raise invalid("url must be a non-empty string")
    try:
        url = httpx.URL(raw_url)
    except httpx.InvalidURL as exc:
        raise invalid(f"url {raw_url!r}: {exc}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise invalid(f"url {raw_url!r} is not an absolute http(s) URL")
    headers = spec.get("headers") or {}
    if not isinstance(headers, Mapping):
        raise invalid("headers must be a mapping")
    timeout = spec.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise invalid(f"timeout {timeout!r} is not a positive number of seconds")
    options: dict[str, Any] = {
        "headers": {str(name): str(value) for name, value in headers.items()},
        "timeout": float(timeout),
    }
    if "json" in spec and "body" in spec:
        raise invalid("json and body are exclusive")
    if "json" in spec:
        options["json"] = spec["json"]
    elif "body" in spec:
        if not isinstance(spec["body"], str):
            raise invalid("body must be a string (use json for structured data)")
        options["content"] = spec["body"]
    expect = spec.get("expect")
    if expect is not None and (
        not isinstance(expect, list)
        or not all(isinstance(code, int) and not isinstance(code, bool) for code in expect)
    ):
        raise invalid(f"expect {expect!r} is not a list of status codes")
    return method.upper(), url, options, expect


def _host_key(url: httpx.URL) -> str:
    """`scheme://host:port`, the unit of a circuit breaker."""
    port = url.port or (443 if url.scheme == "https" else 80)
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}:{port}"


def _body(response: httpx.Response) -> Any:
    media_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            pass  # a body that claims to be JSON but is not: the text, as for any other type
    return response.text


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)
