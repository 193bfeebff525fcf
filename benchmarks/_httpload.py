"""A minimal HTTP/1.1 keep-alive load generator on raw asyncio streams, for the benchmarks.

httpx costs more CPU per request than the servers under test on these 2-core machines;
this client only writes a prebuilt request and reads the status line, the headers and a
`Content-Length` body. No chunked bodies, no redirects, no TLS: an answer without
`Content-Length` raises `LoadError`. An answer with `Connection: close` (Hypercorn sends
one after `keep_alive_max_requests`, 1,000 by default) makes the client reconnect; the
reconnection counts in that request's latency.

    result = asyncio.run(load("127.0.0.1", 8080, request(...), concurrency=16, seconds=10))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LoadError", "LoadResult", "fetch", "load", "request"]

HEADER_END = b"\r\n\r\n"
MAX_HEADER = 64 * 1024


class LoadError(Exception):
    """The server answered something this client cannot measure (or did not answer)."""


@dataclass
class LoadResult:
    """What C connections, each sending requests back to back, completed in `elapsed` s."""

    completed: int
    elapsed: float
    latencies: list[float]
    """Seconds from writing each request to reading the last byte of its answer."""
    reconnects: int = 0
    """Connections the server closed (after `Connection: close`) and the client reopened."""
    statuses: dict[int, int] = field(default_factory=dict)
    """How many answers had each status."""
    bad_example: bytes = b""
    """The first non-2xx answer (head and body), to say what went wrong."""

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))
        return ordered[index] * 1000


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def request(
    method: str,
    host: str,
    port: int,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> bytes:
    """The bytes of one HTTP/1.1 request (sent as is, again and again)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes, bool]:
    """(status, head, body, closing) of one answer, `closing` if the server closes the
    connection after it; raises `LoadError` for what it cannot read."""
    try:
        head = await reader.readuntil(HEADER_END)
    except asyncio.IncompleteReadError as exc:
        raise LoadError(f"the server closed the connection ({len(exc.partial)} bytes)") from None
    except asyncio.LimitOverrunError:
        raise LoadError(f"an answer's head is over {MAX_HEADER} bytes") from None
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise LoadError(f"not an HTTP/1.x status line: {status_line[:100]!r}")
    status = int(parts[1])
    length = -1
    closing = False
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            raise LoadError(f"Transfer-Encoding {value.strip()!r} is not supported")
        elif name == b"connection" and value.strip().lower() == b"close":
            closing = True
    if length < 0:
        raise LoadError(f"a {status} answer without Content-Length: {head[:300]!r}")
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        raise LoadError("the server closed the connection in the middle of a body") from None
    return status, head, body, closing


async def fetch(
    host: str, port: int, raw: bytes, answer_timeout: float = 10.0
) -> tuple[int, bytes]:
    """Send one request on a new connection: (status, body)."""
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEADER)
    try:
        writer.write(raw)
        status, _, body, _ = await asyncio.wait_for(_read_answer(reader), answer_timeout)
        return status, body
    finally:
        writer.close()
        await writer.wait_closed()


async def load(
    host: str,
    port: int,
    raw: bytes | Callable[[], bytes],
    *,
    concurrency: int,
    seconds: float,
    answer_timeout: float = 30.0,
) -> LoadResult:
    """`concurrency` keep-alive connections, each sending `raw` back to back (waiting for
    each answer) for `seconds`; `raw` may be a function giving each request's bytes (when
    requests must differ, e.g. by a delivery id). Connections are opened before the clock
    starts. Non-2xx answers are counted, not raised: the caller decides (see
    `LoadResult`)."""
    next_request = raw if callable(raw) else lambda: raw

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port, limit=MAX_HEADER)

    connections = [_Connection(*await connect()) for _ in range(concurrency)]
    result = LoadResult(completed=0, elapsed=0.0, latencies=[])
    statuses = result.statuses
    latencies = result.latencies
    clock = time.perf_counter

    async def connection(slot: _Connection) -> None:
        reader, writer = slot.reader, slot.writer
        deadline = clock() + seconds
        start = clock()
        while start < deadline:
            writer.write(next_request())
            status, head, body, closing = await asyncio.wait_for(
                _read_answer(reader), answer_timeout
            )
            statuses[status] = statuses.get(status, 0) + 1
            if not 200 <= status < 300 and not result.bad_example:
                result.bad_example = head + body[:500]
            if closing:  # a client pays for the new connection: count it in this latency
                writer.close()
                reader, writer = slot.reader, slot.writer = await connect()
                result.reconnects += 1
            done = clock()
            latencies.append(done - start)
            start = done

    start = clock()
    try:
        await asyncio.gather(*(connection(slot) for slot in connections))
    finally:
        result.elapsed = clock() - start
        for slot in connections:
            slot.writer.close()
        for slot in connections:
            try:
                await slot.writer.wait_closed()
            except OSError:
                pass
    result.completed = len(latencies)
    return result
