"""The `http` executor against a real HTTP/1.1 server on 127.0.0.1, and its circuit breaker."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

import pytest

from loom_worker.executors import CircuitBreaker, HttpExecutor, NodeCall, NodeFailed
from loom_worker.executors.http import BreakerState

CALL = NodeCall(execution_id="exec-1", node="config", attempt=1)


class Lines:
    """A LogSink that keeps what it is given."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, stream: str, text: str) -> None:
        self.items.append((stream, text))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Server:
    """A tiny HTTP/1.1 responder: one request per connection.

    `/json`, `/text`, `/badjson`, `/status/<code>`, `/echo` (the request as JSON), `/slow`.
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                if line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = {"method": method, "path": target, "headers": headers, "body": body.decode()}
            self.requests.append(request)
            status, content_type, payload = await self.route(target, request)
            writer.write(
                f"HTTP/1.1 {status} Whatever\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nX-Server: Tiny\r\nConnection: close\r\n\r\n"
                .encode() + payload
            )  # fmt: skip
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def route(self, target: str, request: dict[str, Any]) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if path == "/json":
            return 200, "application/json; charset=utf-8", b'{"version": "1.2", "n": [1, 2]}'
        if path == "/problem":
            return 200, "application/problem+json", b'{"title": "x"}'
        if path == "/badjson":
            return 200, "application/json", b"not json"
        if path == "/text":
            return 200, "text/plain", b"hello"
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            return code, "application/json", json.dumps({"code": code}).encode()
        if path == "/echo":
            return 200, "application/json", json.dumps(request).encode()
        if path == "/slow":
            await asyncio.sleep(30)
        return 404, "text/plain", b"not found"

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def exec_server() -> AsyncIterator[Server]:
    server = Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    yield server
    listener.close()
    await server.stop()
    await listener.wait_closed()


@pytest.fixture
async def exec_http() -> AsyncIterator[HttpExecutor]:
    async with HttpExecutor(failure_threshold=2, cool_down=30.0) as executor:
        yield executor


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_get_returns_status_lower_case_headers_and_the_parsed_body(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    result = await exec_http.request({"url": f"{exec_server.url}/json"}, call=CALL, log=Lines())
    assert result.outputs["status"] == 200
    assert result.outputs["headers"]["x-server"] == "Tiny"
    assert result.outputs["headers"]["content-type"] == "application/json; charset=utf-8"
    assert result.outputs["body"] == {"version": "1.2", "n": [1, 2]}


@pytest.mark.parametrize(
    ("path", "body"),
    [("/text", "hello"), ("/badjson", "not json"), ("/problem", {"title": "x"})],
)
async def test_only_a_json_body_is_parsed(
    exec_http: HttpExecutor, exec_server: Server, path: str, body: object
) -> None:
    result = await exec_http.request({"url": exec_server.url + path}, call=CALL, log=Lines())
    assert result.outputs["body"] == body


async def test_method_headers_and_json_reach_the_server(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    spec = {
        "method": "post",
        "url": f"{exec_server.url}/echo",
        "headers": {"X-Token": "abc"},
        "json": {"text": "deploy: ok"},
    }
    result = await exec_http.request(spec, call=CALL, log=Lines())
    echoed = result.outputs["body"]
    assert echoed["method"] == "POST"
    assert echoed["headers"]["x-token"] == "abc"
    assert echoed["headers"]["content-type"] == "application/json"
    assert json.loads(echoed["body"]) == {"text": "deploy: ok"}


async def test_a_text_body_is_sent_as_is(exec_http: HttpExecutor, exec_server: Server) -> None:
    spec = {"method": "PUT", "url": f"{exec_server.url}/echo", "body": "a=1&b=2"}
    result = await exec_http.request(spec, call=CALL, log=Lines())
    assert result.outputs["body"]["body"] == "a=1&b=2"


async def test_one_log_line_tells_method_url_status_and_time(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    log = Lines()
    await exec_http.request({"url": f"{exec_server.url}/text?token=s3cret"}, call=CALL, log=log)
    [(stream, line)] = log.items
    assert stream == "stdout"
    assert line.startswith(f"GET {exec_server.url}/text -> 200 (")
    assert line.endswith(" ms)")
    assert "s3cret" not in line


async def test_an_unexpected_status_fails_with_the_outputs(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    with pytest.raises(NodeFailed) as failed:
        await exec_http.request({"url": f"{exec_server.url}/status/503"}, call=CALL, log=Lines())
    assert failed.value.error == "unexpected status 503 (expected 2xx)"
    assert failed.value.outputs["body"] == {"code": 503}
    assert failed.value.retryable is True


async def test_an_unexpected_4xx_is_not_retried_but_429_is(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    with pytest.raises(NodeFailed) as failed:
        await exec_http.request({"url": f"{exec_server.url}/status/404"}, call=CALL, log=Lines())
    assert failed.value.retryable is False
    with pytest.raises(NodeFailed) as failed:
        await exec_http.request({"url": f"{exec_server.url}/status/429"}, call=CALL, log=Lines())
    assert failed.value.retryable is True


async def test_expect_lists_the_acceptable_codes(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    spec = {"url": f"{exec_server.url}/status/404", "expect": [200, 404]}
    result = await exec_http.request(spec, call=CALL, log=Lines())
    assert result.outputs["status"] == 404
    with pytest.raises(NodeFailed, match=r"unexpected status 200 \(expected 201, 202\)"):
        spec = {"url": f"{exec_server.url}/json", "expect": [201, 202]}
        await exec_http.request(spec, call=CALL, log=Lines())


async def test_a_timeout_fails_with_the_httpx_error(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    log = Lines()
    with pytest.raises(NodeFailed) as failed:
        spec = {"url": f"{exec_server.url}/slow", "timeout": 0.2}
        await exec_http.request(spec, call=CALL, log=log)
    assert failed.value.error.startswith("ReadTimeout")
    assert failed.value.retryable is True
    assert log.items[0][0] == "stderr"


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"url": "ftp://example.org/x"},
        {"url": "http://127.0.0.1/", "json": {}, "body": "x"},
        {"url": "http://127.0.0.1/", "expect": "200"},
        {"url": "http://127.0.0.1/", "timeout": 0},
        {"url": "http://127.0.0.1/", "method": "GET /x"},
    ],
)
async def test_an_invalid_spec_fails_without_retry(
    exec_http: HttpExecutor, spec: dict[str, Any]
) -> None:
    with pytest.raises(NodeFailed) as failed:
        await exec_http.request(spec, call=CALL, log=Lines())
    assert failed.value.error.startswith("invalid http spec")
    assert failed.value.retryable is False


async def test_4xx_responses_do_not_trip_the_breaker(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    for _ in range(5):
        with pytest.raises(NodeFailed, match="unexpected status 404"):
            await exec_http.request({"url": f"{exec_server.url}/nowhere"}, call=CALL, log=Lines())
    assert len(exec_server.requests) == 5


async def test_5xx_responses_open_the_breaker_which_then_fails_fast(
    exec_http: HttpExecutor, exec_server: Server
) -> None:
    for _ in range(2):
        with pytest.raises(NodeFailed, match="unexpected status 500"):
            await exec_http.request(
                {"url": f"{exec_server.url}/status/500"}, call=CALL, log=Lines()
            )
    with pytest.raises(NodeFailed) as failed:
        await exec_http.request({"url": f"{exec_server.url}/json"}, call=CALL, log=Lines())
    host = exec_server.url
    assert failed.value.error == (
        f"circuit open for {host} after 2 consecutive failures; retrying after 30s"
    )
    assert len(exec_server.requests) == 2


async def test_a_dead_port_opens_the_breaker_and_it_half_opens_after_the_cool_down() -> None:
    clock = Clock()
    url = f"http://127.0.0.1:{closed_port()}/health"
    async with HttpExecutor(failure_threshold=2, cool_down=10.0, clock=clock) as executor:
        for _ in range(2):
            with pytest.raises(NodeFailed) as failed:
                await executor.request({"url": url}, call=CALL, log=Lines())
            assert failed.value.error.startswith("ConnectError")
        with pytest.raises(NodeFailed, match="circuit open .* retrying after 10s"):
            await executor.request({"url": url}, call=CALL, log=Lines())
        clock.now += 4
        with pytest.raises(NodeFailed, match="retrying after 6s"):
            await executor.request({"url": url}, call=CALL, log=Lines())
        clock.now += 6
        with pytest.raises(NodeFailed) as failed:  # the trial request goes out, and fails
            await executor.request({"url": url}, call=CALL, log=Lines())
        assert failed.value.error.startswith("ConnectError")
        with pytest.raises(NodeFailed, match="after 3 consecutive failures; retrying after 10s"):
            await executor.request({"url": url}, call=CALL, log=Lines())


async def test_a_given_client_is_used_and_left_open(exec_server: Server) -> None:
    import httpx

    async with httpx.AsyncClient(headers={"X-Shared": "yes"}) as client:
        executor = HttpExecutor(client)
        result = await executor.request({"url": f"{exec_server.url}/echo"}, call=CALL, log=Lines())
        assert result.outputs["body"]["headers"]["x-shared"] == "yes"
        await executor.aclose()
        assert not client.is_closed


def test_breaker_opens_after_the_threshold_of_consecutive_failures() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 30.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not consecutive any more
    for _ in range(2):
        breaker.record_failure()
        assert breaker.allow()
    breaker.record_failure()
    assert state_of(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after() == 30.0


def test_breaker_half_opens_for_one_trial_and_closes_on_its_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    breaker.record_failure()
    clock.now += 29.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()  # one trial at a time
    breaker.record_success()
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.failures == 0
    assert breaker.allow() and breaker.allow()


def test_breaker_reopens_for_a_full_cool_down_when_the_trial_fails() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    breaker.record_failure()
    clock.now += 31
    assert breaker.allow()
    breaker.record_failure()
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.retry_after() == 30.0
    assert not breaker.allow()


def test_breaker_lets_another_trial_go_when_one_ends_without_a_verdict() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    breaker.record_failure()
    clock.now += 30
    assert breaker.allow()
    breaker.release()  # the trial was cancelled
    assert breaker.allow()
    assert not breaker.allow()


def test_breaker_stragglers_failing_while_open_do_not_extend_the_cool_down() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 30.0, clock=clock)
    breaker.record_failure()
    clock.now += 20
    breaker.record_failure()
    assert breaker.retry_after() == 10.0
