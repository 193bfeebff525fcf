"""B5: live logs — one node printing 100,000 lines, followed over WebSockets, in one run.

The node (`run:` a shell `seq -f ...`, 60-character lines) waits on a gate file until
every follower is connected and has been sent the execution's state, then prints as
fast as it can (over 100,000 lines/s here); the worker stamps each line (`ts`), stores
the lines in batches and publishes each batch as `log.batch` events; the websocket
service encodes each batch once and broadcasts it. Each follower is a real `websockets`
client reading `/ws/executions/{id}?token=...` until the server closes with 1000, and
the run FAILS (exit 1) unless every follower got every line exactly once, in order,
with its text, and the execution's final `succeeded`. A follower closed with 4008 (too
slow) reconnects with `after=<last seq>`, as a client must; the figures count those.

Figures, per event stream, for 100 followers (the headline) and 20:
* lines/s per follower: lines / (its receipt of the last line - the worker's `ts` of
  line 1); `value` is the slowest follower's. Targets (DESIGN §10): >= 5,000 with 100
  followers, >= 20,000 with 20 (`value_20`).
* line latency: receipt - the line's `ts` (the worker's system clock, the same clock as
  here: `time.time()`), over every line of every follower, exact (`p99`, `p99_20`).
  Target: p99 <= 250 ms. A node printing 100,000 lines at once is a burst far faster
  than any store keeps up with, so its lines queue in the worker (stamped when read)
  and the burst's latency is mostly that queue (`printed_per_s` says how fast the lines
  came). Hence also `paced_p99`: 100 followers of a node printing 250 lines every 50 ms
  (at most 5,000 lines/s, the 100-follower target rate; 25,000 lines, --quick 5,000).
* `fanout_spread_p99_ms` (in `runs`): each receipt minus the first follower's receipt
  of the same frame: what broadcasting one frame to every follower takes.
* memory per connection (`rss_per_connection_kib`; for the memory run also a figure
  line of its own): the serving process's RSS (`/proc/PID/status` VmRSS) once the 100
  followers of the first stream (right after the warm-up) are connected, minus before,
  divided by them — RSS, not tracemalloc, as an operator sees it, allocator arenas
  included (later streams start while a burst's memory is being given back: too noisy)
  — and `rss_peak_growth_mib`, its peak growth while the lines flow.
* `slow_closes`: followers closed with 4008 (they reconnected with `after`).
* CPU seconds of the serving process and of the followers' process during the stream.

Processes (2 cores): the followers all run in ONE process of their own (`--followers`),
so the serving process's CPU and RSS are its own. They are cheap: `recv(decode=False)`
gives each frame's bytes, and a frame is parsed (orjson) and checked only the first
time those exact bytes arrive — a broadcast batch is the same bytes for every follower —
after that a follower only checks that the frame's first seq follows its last one.
Latency percentiles are computed after the stream from each receipt's time and its
frame's sorted `ts` values (counting by bisection), not from sampled lines.

* **memory event stream** (the headline): `python -m loom_cli up` — the whole system in
  one process, as `loom up` runs it (the memory broker only exists inside one process),
  on SQLite in a temporary directory. The serving process is that process: the worker
  and the websocket service share its event loop (the API and the timer idle beside).
* **Kafka** (when LOOM_TEST_KAFKA_URL or --kafka-url, and PostgreSQL, are given):
  `python -m loom_worker` and `python -m loom_websocket` as two processes, the event
  stream on Kafka (topics `loombench-<random>.*`, deleted at the end), on a throwaway
  PostgreSQL database. The worker's work queue is `memory://` in its own process: its
  own outbox relay hands it the trigger, so no Kafka consumer-group join (seconds on
  Tansu) is timed or waited for; B5 is about the event stream. The serving process
  measured is the websocket service (the worker's CPU is reported beside).

Baseline, measured in the same run right after each Loom run with the same number of
followers (the same follower process): a bare `websockets` server in this process
broadcasting `logs` frames of the same lines, in batches of the sizes the Loom run
delivered, each batch encoded once (orjson) with `ts` = the moment it is encoded, as
fast as the followers take them (it waits while a connection has over 256 KiB unsent),
then closing with 1000. `ratio` = Loom / bare, lines/s per follower (higher is better);
the Kafka line's baseline is the memory run's bare one.

    uv run python benchmarks/live_logs.py [--quick] [--repeat K] [--lines N]
        [--only memory[,kafka]] [--database-url URL] [--kafka-url URL]

--quick: 10,000 lines (under a minute). --repeat K: each (Loom, bare) pair K times per
follower count, the best rate of each kept (default 1). Prints one JSON object per line
and figure (DESIGN §10): the memory run's throughput, its memory per connection, then
the Kafka run's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rest import (  # type: ignore[import-not-found, unused-ignore]
    BenchError,
    cpu_seconds,
    emit,
    free_port,
    server,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

HERE = Path(__file__).resolve()
HOST = "127.0.0.1"
FOLLOWERS = (100, 20)
"""The follower counts measured, the headline first."""
LINES = 100_000
QUICK_LINES = 10_000
TEXT = "of a long build log: compiling, linking, testing"
"""Each line is `line %06d TEXT` (seq -f pads the number to 6 digits)."""
SLOW = 4008
BARE_HIGH = 256 * 1024
"""The bare server waits while a connection has more than this unsent (`write_limit`)."""
CONNECT_TIMEOUT = 120.0
RUN_TIMEOUT = 600.0
"""Seconds one measured stream may take before the run fails."""
SETTLE = 0.5
"""Seconds after the followers connected before the RSS is read."""
PACE_CHUNK = 250
PACE_SLEEP = 0.05
"""The paced node prints PACE_CHUNK lines every PACE_SLEEP s: 5,000 lines/s at most
(a little less: each round also starts `seq` and `sleep`)."""
PACED_LINES = 25_000
QUICK_PACED_LINES = 5_000


def line_text(seq: int) -> str:
    return f"line {seq:06d} {TEXT}"


def graph_yaml(name: str, lines: int, gate: Path, *, paced: bool = False) -> str:
    """Graph `name`: its node waits for `gate`, then prints `lines` lines at once, or
    `paced`: PACE_CHUNK lines every PACE_SLEEP s (`lines` a multiple of PACE_CHUNK)."""
    wait = f"while [ ! -e {gate} ]; do sleep 0.02; done"
    print_ = f"seq -f 'line %06.0f {TEXT}'"
    if paced:
        script = (
            f"{wait}; i=0; while [ $i -lt {lines} ]; do {print_} $((i + 1)) "
            f"$((i + {PACE_CHUNK})); i=$((i + {PACE_CHUNK})); sleep {PACE_SLEEP}; done"
        )
    else:
        script = f"{wait}; {print_} 1 {lines}"
    return f'name: {name}\ndescription: B5, live logs\nnodes:\n  print:\n    run: "{script}"\n'


def iso_now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


# --- the followers (`--followers URL COUNT LINES`, a process of their own) ----------------


@dataclass(slots=True)
class Frame:
    """One distinct frame (the same bytes reach many followers), parsed and checked once."""

    kind: str
    first: int = 0
    last: int = 0
    ts: list[float] = field(default_factory=list)
    """The lines' `ts`, as `time.time()` values, sorted."""
    status: str | None = None


class Frames:
    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.known: dict[bytes, Frame] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None

    def get(self, message: bytes) -> Frame:
        frame = self.known.get(message)
        if frame is None:
            frame = self.known[message] = self._parse(message)
        return frame

    def _parse(self, message: bytes) -> Frame:
        data = orjson.loads(message)
        if data["type"] != "logs":
            return Frame(data["type"], status=data.get("status"))
        lines = data["lines"]
        if not lines:
            raise FollowError("a logs frame without lines")
        first = lines[0]["seq"]
        for offset, line in enumerate(lines):
            seq = line["seq"]
            if seq != first + offset:
                raise FollowError(f"a frame's lines are not contiguous: {first}.. then {seq}")
            if line["text"] != line_text(seq):
                raise FollowError(f"line {seq} reads {line['text']!r}")
        stamps = [datetime.fromisoformat(line["ts"]).timestamp() for line in lines]
        last = first + len(lines) - 1
        if first == 1:
            self.first_ts = stamps[0]
        if last == self.lines:
            self.last_ts = stamps[-1]
        return Frame("logs", first, last, sorted(stamps))


class FollowError(Exception):
    """A follower did not get every line once, in order (or the connection failed)."""


@dataclass
class Seen:
    """What one follower got."""

    last: int = 0
    last_receipt: float = 0.0
    status: str | None = None
    reconnects: int = 0
    receipts: list[tuple[float, Frame]] = field(default_factory=list)


async def follow(url: str, frames: Frames, seen: Seen, connected: Callable[[], None]) -> None:
    """Follow until the server closes with 1000; reconnect with `after` on 4008."""
    first = True
    while True:
        target = url if seen.last == 0 else f"{url}&after={seen.last}"
        async with connect(
            target,
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=CONNECT_TIMEOUT,
        ) as ws:
            try:
                while True:
                    message = await ws.recv(decode=False)
                    now = time.time()
                    frame = frames.get(message)
                    if first:  # the state: the server has registered this follower
                        connected()
                        first = False
                    if frame.kind == "logs":
                        if frame.first != seen.last + 1:
                            raise FollowError(
                                f"after seq {seen.last} a frame of {frame.first}..{frame.last}"
                            )
                        seen.last = frame.last
                        seen.last_receipt = now
                        seen.receipts.append((now, frame))
                    elif frame.kind == "execution":
                        seen.status = frame.status
            except ConnectionClosed:
                pass
            code, reason = ws.close_code, ws.close_reason
        if code == SLOW:
            seen.reconnects += 1
            continue
        if code != 1000:
            raise FollowError(f"closed with {code} {reason!r} after seq {seen.last}")
        break
    if seen.last != frames.lines:
        raise FollowError(f"closed with 1000 after seq {seen.last} of {frames.lines}")
    if seen.status != "succeeded":
        raise FollowError(f"the execution ended {seen.status}, not succeeded")


def latency_quantiles(
    receipts: list[tuple[float, Frame]], quantiles: tuple[float, ...]
) -> list[float]:
    """Exact quantiles (s, to 10 µs) of receipt - ts over every line of every receipt: the
    smallest L such that at most (1 - q) of the lines took longer, by bisection on L, each
    count a bisection in each receipt's sorted `ts`."""
    total = sum(len(frame.ts) for _, frame in receipts)

    def longer(limit: float) -> int:
        return sum(bisect.bisect_left(frame.ts, t - limit) for t, frame in receipts)

    found = []
    for q in quantiles:
        allowed = int((1 - q) * total)
        low = min(t - frame.ts[-1] for t, frame in receipts)
        high = max(t - frame.ts[0] for t, frame in receipts)
        while high - low > 1e-5:
            middle = (low + high) / 2
            if longer(middle) <= allowed:
                high = middle
            else:
                low = middle
        found.append(high)
    return found


async def run_followers(url: str, count: int, lines: int) -> dict[str, Any]:
    frames = Frames(lines)
    seen = [Seen() for _ in range(count)]
    ready = asyncio.Event()
    joined = 0

    def connected() -> None:
        nonlocal joined
        joined += 1
        if joined == count:
            ready.set()

    began = time.monotonic()
    tasks = [asyncio.create_task(follow(url, frames, s, connected)) for s in seen]
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():  # one failed before all were connected
        waiting.cancel()
        await asyncio.gather(*tasks)
    joining = time.monotonic() - began
    sys.stdout.write(orjson.dumps({"connected": count}).decode() + "\n")
    sys.stdout.flush()
    cpu = time.process_time()
    await asyncio.gather(*tasks)
    cpu = time.process_time() - cpu
    if frames.first_ts is None or frames.last_ts is None:
        raise FollowError("line 1 or the last line never arrived")
    receipts = [r for s in seen for r in s.receipts]
    p50, p99 = latency_quantiles(receipts, (0.5, 0.99))
    rates = sorted(lines / (s.last_receipt - frames.first_ts) for s in seen)
    earliest: dict[int, float] = {}
    for t, frame in receipts:
        earliest[id(frame)] = min(t, earliest.get(id(frame), t))
    spread = sorted(t - earliest[id(frame)] for t, frame in receipts)
    return {
        "rates": rates,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "max_ms": max(t - frame.ts[0] for t, frame in receipts) * 1000,
        "lines": lines,
        "produced_s": frames.last_ts - frames.first_ts,
        "spread_p99_ms": spread[min(len(spread) - 1, int(0.99 * len(spread)))] * 1000,
        "reconnects": sum(s.reconnects for s in seen),
        "frames_per_follower": statistics.median(len(s.receipts) for s in seen),
        "distinct_frames": len(frames.known),
        "sizes": [frame.last - frame.first + 1 for _, frame in seen[0].receipts],
        "cpu_s": cpu,
        "joining_s": joining,
    }


def followers_main(url: str, count: int, lines: int) -> None:
    try:
        result = asyncio.run(run_followers(url, count, lines))
    except (FollowError, WebSocketException, OSError, TimeoutError) as exc:
        print(f"followers: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


# --- measuring one stream -------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


@dataclass
class Stream:
    """One measured stream: what the followers said, and the serving process's figures."""

    followers: int
    result: dict[str, Any]
    rss_per_connection_kib: float
    rss_peak_growth_mib: float
    server_cpu_s: float

    @property
    def slowest(self) -> float:
        return float(self.result["rates"][0])


async def measure(
    url: str, count: int, lines: int, pid: int, start: Callable[[], Awaitable[None]]
) -> Stream:
    """Start `count` followers of `url` in their process, read the RSS of `pid` (the
    serving process) before and once they are connected, call `start()` (the lines
    begin), and wait for the followers' result."""
    before = rss_kib(pid)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE),
        "--followers",
        url,
        str(count),
        str(lines),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("LOOM_")},
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        try:
            first = await asyncio.wait_for(proc.stdout.readline(), CONNECT_TIMEOUT)
        except TimeoutError:
            raise BenchError(
                f"{count} followers were not all sent the state in {CONNECT_TIMEOUT:.0f} s"
            ) from None
        if not first:
            await proc.wait()
            raise BenchError(f"the followers failed: {(await proc.stderr.read()).decode()}")
        await asyncio.sleep(SETTLE)
        connected = rss_kib(pid)
        peak = connected
        cpu = cpu_seconds(pid)

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_kib(pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            await start()
            out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
        except TimeoutError:
            raise BenchError(f"{count} followers did not end in {RUN_TIMEOUT:.0f} s") from None
        finally:
            sampler.cancel()
        cpu = cpu_seconds(pid) - cpu
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"{count} followers of {url.split('?')[0]}: {err.decode().strip()}")
    return Stream(
        count,
        orjson.loads(out.splitlines()[-1]),
        (connected - before) / count,
        (peak - connected) / 1024,
        cpu,
    )


# --- the baseline: a bare websockets server in this process ---------------------------------


class Bare:
    """Serves any path; `broadcast(sizes)` sends the lines in batches of `sizes` to the
    connections open, each batch encoded once, then closes them with 1000."""

    def __init__(self) -> None:
        self.conns: set[Any] = set()
        self.port = 0
        self.sending: asyncio.Task[None] | None = None

    async def handler(self, conn: Any) -> None:
        state = {"type": "node", "node": "print", "status": "running", "attempt": 1}
        await conn.send(orjson.dumps({**state, "ts": iso_now()}), text=True)
        self.conns.add(conn)
        try:
            await conn.wait_closed()
        finally:
            self.conns.discard(conn)

    def starter(self, sizes: list[int]) -> Callable[[], Awaitable[None]]:
        """What starts `broadcast(sizes)` in a task of its own (`sent()` awaits it)."""

        async def start() -> None:
            self.sending = asyncio.create_task(self.broadcast(sizes))

        return start

    async def sent(self) -> None:
        if self.sending is not None:
            await self.sending
            self.sending = None

    async def broadcast(self, sizes: list[int]) -> None:
        conns = list(self.conns)
        try:
            await self._send(conns, sizes)
        except BaseException:
            await asyncio.gather(*(c.close(1011, "the bare server failed") for c in conns))
            raise
        await asyncio.gather(*(c.close(1000, "execution finished") for c in conns))

    async def _send(self, conns: list[Any], sizes: list[int]) -> None:
        from websockets.asyncio.server import broadcast

        seq = 0
        for size in sizes:
            # As each connection's own `send` would: wait while it has over BARE_HIGH
            # unsent (the serve's `write_limit`).
            await asyncio.gather(*(c.drain() for c in conns))
            ts = iso_now()
            lines = [
                {"seq": s, "node": "print", "stream": "stdout", "ts": ts, "text": line_text(s)}
                for s in range(seq + 1, seq + size + 1)
            ]
            broadcast(conns, orjson.dumps({"type": "logs", "lines": lines}), text=True)
            seq += size
            await asyncio.sleep(0)
        final = orjson.dumps({"type": "execution", "status": "succeeded", "ts": iso_now()})
        broadcast(conns, final, text=True)


# --- the Loom side: the database, the graph, the trigger ------------------------------------


@dataclass
class Loom:
    """A running Loom: its database, where followers connect, and the serving pid."""

    database_url: str
    ws_port: int
    pid: int
    token: str
    workdir: Path
    runs: int = 0

    async def prepare(self) -> None:
        """User `b5` (a viewer: a token's user must exist)."""
        from loom_auth import hash_password
        from loom_db import create_database, users

        db = create_database(self.database_url)
        try:
            async with db.transaction() as conn:
                await users.create_user(
                    conn, "b5", hash_password(secrets.token_urlsafe(18)), "viewer", by=None
                )
        finally:
            await db.dispose()

    async def trigger(self, lines: int, *, paced: bool) -> tuple[str, Path]:
        """A new graph whose node prints `lines` (`graph_yaml`) once its gate exists,
        triggered: (the execution id, the gate)."""
        from loom_db import create_database, executions, graphs

        self.runs += 1
        name = f"b5-{self.runs}"
        gate = self.workdir / f"gate-{self.runs}"
        db = create_database(self.database_url)
        try:
            async with db.transaction() as conn:
                graph, _ = await graphs.apply_graph(
                    conn, graph_yaml(name, lines, gate, paced=paced)
                )
                record, _ = await executions.create_execution(
                    conn,
                    graph=name,
                    graph_version=graph.version,
                    params={},
                    trigger_type="manual",
                    trigger_info={"user": "b5"},
                )
        finally:
            await db.dispose()
        return record.id, gate

    def url(self, execution_id: str) -> str:
        return f"ws://{HOST}:{self.ws_port}/ws/executions/{execution_id}?token={self.token}"

    async def stream(self, count: int, lines: int, *, paced: bool = False) -> Stream:
        execution_id, gate = await self.trigger(lines, paced=paced)

        async def start() -> None:
            gate.touch()

        return await measure(self.url(execution_id), count, lines, self.pid, start)


def viewer_token(secret_key: str) -> str:
    from loom_auth import new_access_token
    from loom_db.keys import derive_keys

    keys = derive_keys(secret_key)
    return new_access_token(keys.signing_key, "b5", "viewer", lifetime=3600).token


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env["LOOM_LOG_LEVEL"] = "WARNING"
    return env


@contextmanager
def loom_up(workdir: Path, secret_key: str) -> Iterator[Loom]:
    """`python -m loom_cli up` on SQLite in `workdir`, memory brokers; ready once its
    websocket port answers `/readyz` (the hub's subscription is live)."""
    url = f"sqlite+aiosqlite:///{workdir / 'loom.db'}"
    port, ws_port = free_port(), free_port()
    env = base_env()
    env.update(LOOM_SECRET_KEY=secret_key, LOOM_ADMIN_PASSWORD=secrets.token_urlsafe(18))
    args = [sys.executable, "-m", "loom_cli", "up", "--host", HOST, "--port", str(port)]
    args += ["--ws-port", str(ws_port), "--data-dir", str(workdir), "--database-url", url]
    with server(args, env, "loom up", ws_port) as proc:
        yield Loom(url, ws_port, proc.pid, viewer_token(secret_key), workdir)


@contextmanager
def loom_kafka(
    workdir: Path, secret_key: str, database_url: str, kafka_url: str, prefix: str
) -> Iterator[tuple[Loom, int]]:
    """The worker and the websocket service as processes of their own, the event stream
    on Kafka: (the Loom, serving from the websocket service; the worker's pid)."""
    from loom_db.migrate import upgrade_sync

    upgrade_sync(database_url)
    env = base_env()
    env.update(
        LOOM_SECRET_KEY=secret_key,
        LOOM_DATABASE_URL=database_url,
        LOOM_QUEUE_URL="memory://",
        LOOM_EVENTS_URL=kafka_url,
        LOOM_BROKER_PREFIX=prefix,
    )
    worker_port, ws_port = free_port(), free_port()
    worker_env = {**env, "LOOM_WORKER_HOST": HOST, "LOOM_WORKER_PORT": str(worker_port)}
    ws_env = {**env, "LOOM_WEBSOCKET_HOST": HOST, "LOOM_WEBSOCKET_PORT": str(ws_port)}
    with (
        server(
            [sys.executable, "-m", "loom_worker"], worker_env, "the worker", worker_port
        ) as worker,
        server(
            [sys.executable, "-m", "loom_websocket"], ws_env, "the websocket service", ws_port
        ) as ws,
    ):
        yield Loom(database_url, ws_port, ws.pid, viewer_token(secret_key), workdir), worker.pid


# --- the runs -------------------------------------------------------------------------------


@dataclass
class Measured:
    """The best stream of each follower count (and the bare ones, for the memory run),
    and the paced stream (FOLLOWERS[0] followers)."""

    ours: dict[int, Stream]
    paced: Stream
    bare: dict[int, Stream] = field(default_factory=dict)


async def warm_up(loom: Loom) -> None:
    """One small execution followed once: imports, caches and code paths of the service."""
    await loom.stream(1, 2000)


def best(streams: list[Stream]) -> Stream:
    return max(streams, key=lambda s: s.slowest)


async def bench_memory(loom: Loom, lines: int, paced_lines: int, repeat: int) -> Measured:
    from websockets.asyncio.server import serve

    await loom.prepare()
    await warm_up(loom)
    bare = Bare()
    ours: dict[int, Stream] = {}
    theirs: dict[int, Stream] = {}
    async with serve(
        bare.handler,
        HOST,
        0,
        compression=None,
        ping_interval=None,
        max_size=64 * 1024,
        write_limit=BARE_HIGH,
    ) as bare_server:
        bare.port = bare_server.sockets[0].getsockname()[1]
        bare_url = f"ws://{HOST}:{bare.port}/ws/executions/bare?token=none"
        for count in FOLLOWERS:
            loom_runs: list[Stream] = []
            bare_runs: list[Stream] = []
            for _ in range(repeat):
                loom_runs.append(await loom.stream(count, lines))
                start = bare.starter(loom_runs[-1].result["sizes"])
                bare_runs.append(await measure(bare_url, count, lines, os.getpid(), start))
                await bare.sent()
            ours[count], theirs[count] = best(loom_runs), best(bare_runs)
    paced = await loom.stream(FOLLOWERS[0], paced_lines, paced=True)
    return Measured(ours, paced, theirs)


async def bench_kafka(
    loom: Loom, worker_pid: int, lines: int, paced_lines: int, repeat: int
) -> Measured:
    await loom.prepare()
    await warm_up(loom)

    async def stream(count: int, lines: int, *, paced: bool = False) -> Stream:
        cpu = cpu_seconds(worker_pid)
        found = await loom.stream(count, lines, paced=paced)
        found.result["worker_cpu_s"] = cpu_seconds(worker_pid) - cpu
        return found

    ours: dict[int, Stream] = {}
    for count in FOLLOWERS:
        ours[count] = best([await stream(count, lines) for _ in range(repeat)])
    return Measured(ours, await stream(FOLLOWERS[0], paced_lines, paced=True))


# --- the figures ----------------------------------------------------------------------------


def printed_per_s(stream: Stream) -> float | None:
    """The lines' own rate: their count over line N's `ts` - line 1's."""
    r = stream.result
    return round((r["lines"] - 1) / r["produced_s"], 1) if r["produced_s"] > 0 else None


def summary(stream: Stream) -> dict[str, object]:
    r = stream.result
    return {
        "followers": stream.followers,
        "lines": r["lines"],
        "slowest_lines_per_s": round(stream.slowest, 1),
        "median_lines_per_s": round(statistics.median(r["rates"]), 1),
        "p50_ms": round(r["p50_ms"], 2),
        "p99_ms": round(r["p99_ms"], 2),
        "max_ms": round(r["max_ms"], 2),
        "fanout_spread_p99_ms": round(r["spread_p99_ms"], 2),
        "printed_per_s": printed_per_s(stream),
        "frames_per_follower": r["frames_per_follower"],
        "distinct_frames": r["distinct_frames"],
        "reconnects_after_4008": r["reconnects"],
        "joining_s": round(r["joining_s"], 2),
        "server_cpu_s": round(stream.server_cpu_s, 2),
        "followers_cpu_s": round(r["cpu_s"], 2),
        "rss_peak_growth_mib": round(stream.rss_peak_growth_mib, 1),
        **({"worker_cpu_s": round(r["worker_cpu_s"], 2)} if "worker_cpu_s" in r else {}),
    }


TARGET = "100 followers >= 5000 lines/s each, 20 followers >= 20000 each, p99 <= 250 ms"
BARE_NAME = (
    "bare websockets server broadcasting the same lines in the same batch sizes, each "
    "batch encoded once, as fast as the same followers take them"
)


def throughput_figure(
    name: str, measured: Measured, bare: dict[int, Stream], lines: int, quick: bool, repeat: int
) -> dict[str, object]:
    big, small = measured.ours[FOLLOWERS[0]], measured.ours[FOLLOWERS[1]]
    base, base_small = bare[FOLLOWERS[0]], bare[FOLLOWERS[1]]
    paced = measured.paced
    return {
        "benchmark": "B5",
        "name": name,
        "value": round(big.slowest, 1),
        "unit": f"lines/s per follower ({FOLLOWERS[0]} followers, the slowest)",
        "p99": round(big.result["p99_ms"], 2),
        "value_20": round(small.slowest, 1),
        "p99_20": round(small.result["p99_ms"], 2),
        "baseline": round(base.slowest, 1),
        "baseline_name": BARE_NAME,
        "ratio": round(big.slowest / base.slowest, 3),
        "baseline_20": round(base_small.slowest, 1),
        "ratio_20": round(small.slowest / base_small.slowest, 3),
        "baseline_p99": round(base.result["p99_ms"], 2),
        "baseline_p99_20": round(base_small.result["p99_ms"], 2),
        "slow_closes": sum(
            r.result["reconnects"] for r in (*measured.ours.values(), measured.paced)
        ),
        # Measured first (after the warm-up): later streams start while the memory of the
        # 100,000-line bursts before them is being given back.
        "rss_per_connection_kib": round(big.rss_per_connection_kib, 1),
        "rss_peak_growth_mib": round(big.rss_peak_growth_mib, 1),
        "paced_p50": round(paced.result["p50_ms"], 2),
        "paced_p99": round(paced.result["p99_ms"], 2),
        "paced_printed_per_s": printed_per_s(paced),
        "target": TARGET,
        "measured_by": "lines / (the follower's receipt of the last line - the worker's ts "
        "of line 1); latency: receipt - each line's ts, over every line of every follower",
        "runs": {
            "loom": [summary(measured.ours[c]) for c in FOLLOWERS],
            "bare": [summary(bare[c]) for c in FOLLOWERS],
            "loom_paced": summary(paced),
        },
        "n": lines,
        "repeat": repeat,
        "quick": quick,
    }


def memory_figure(ours: Stream, bare: Stream, quick: bool) -> dict[str, object]:
    return {
        "benchmark": "B5",
        "name": f"memory per connection, {ours.followers} followers of one execution, "
        "loom up (memory event stream, SQLite)",
        "value": round(ours.rss_per_connection_kib, 1),
        "unit": "KiB RSS per connection",
        "measured_by": "VmRSS of the serving process once the followers are connected, "
        "minus before, / followers",
        "peak_growth_mib": round(ours.rss_peak_growth_mib, 1),
        "baseline": round(bare.rss_per_connection_kib, 1),
        "baseline_peak_growth_mib": round(bare.rss_peak_growth_mib, 1),
        "baseline_name": "the bare websockets server (this process), the same followers",
        "ratio": round(ours.rss_per_connection_kib / bare.rss_per_connection_kib, 2)
        if bare.rss_per_connection_kib > 0
        else None,
        "target": "reported (no target set)",
        "n": ours.followers,
        "quick": quick,
    }


def run(
    *,
    lines: int,
    paced_lines: int,
    repeat: int,
    quick: bool,
    only: set[str],
    database_url: str | None,
    kafka_url: str | None,
) -> None:
    secret_key = secrets.token_urlsafe(48)
    figures: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="loom-b5-") as tmp:
        workdir = Path(tmp)
        (workdir / "memory").mkdir()
        with loom_up(workdir / "memory", secret_key) as loom:
            memory = asyncio.run(bench_memory(loom, lines, paced_lines, repeat))
        name = "one node printing lines to followers, loom up: memory event stream, SQLite"
        figures.append(throughput_figure(name, memory, memory.bare, lines, quick, repeat))
        top = FOLLOWERS[0]
        figures.append(memory_figure(memory.ours[top], memory.bare[top], quick))
        if "kafka" in only:
            assert kafka_url and database_url
            kafka = kafka_run(
                workdir, secret_key, database_url, kafka_url, lines, paced_lines, repeat
            )
            name = (
                "one node printing lines to followers, worker and websocket service "
                "processes: Kafka event stream, PostgreSQL"
            )
            figures.append(throughput_figure(name, kafka, memory.bare, lines, quick, repeat))
    for figure in figures:
        emit(figure)


def kafka_run(
    workdir: Path,
    secret_key: str,
    database_url: str,
    kafka_url: str,
    lines: int,
    paced_lines: int,
    repeat: int,
) -> Measured:
    from messaging import delete_kafka_prefix  # type: ignore[import-not-found, unused-ignore]
    from sqlalchemy.engine import make_url

    from loom_db.testing import scratch_database

    prefix = f"loombench-{uuid.uuid4().hex[:10]}"
    (workdir / "kafka").mkdir()
    base = make_url(database_url).set(drivername="postgresql+psycopg")
    try:
        with ExitStack() as stack:
            url = stack.enter_context(scratch_database(base, "loom_bench"))
            loom, worker_pid = stack.enter_context(
                loom_kafka(workdir / "kafka", secret_key, url, kafka_url, prefix)
            )
            return asyncio.run(bench_kafka(loom, worker_pid, lines, paced_lines, repeat))
    finally:
        asyncio.run(delete_kafka_prefix(kafka_url, prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side (best of; 1)")
    parser.add_argument("--lines", type=int, default=None, help="lines (100000; --quick 10000)")
    parser.add_argument(
        "--only",
        default=None,
        help="memory, kafka (comma-separated; default: memory, and kafka when its URL and "
        "PostgreSQL's are given)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LOOM_TEST_POSTGRES_URL"),
        help="PostgreSQL for the Kafka run (default: LOOM_TEST_POSTGRES_URL)",
    )
    parser.add_argument(
        "--kafka-url",
        default=os.environ.get("LOOM_TEST_KAFKA_URL"),
        help="the Kafka run's broker (default: LOOM_TEST_KAFKA_URL; unset: no Kafka run)",
    )
    parser.add_argument("--followers", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.followers:
        url, count, lines = args.followers
        followers_main(url, int(count), int(lines))
        return
    if args.only is None:
        only = {"memory", "kafka"} if args.kafka_url and args.database_url else {"memory"}
    else:
        only = set(args.only.split(","))
    if not only <= {"memory", "kafka"}:
        parser.error(f"--only: unknown runs {sorted(only - {'memory', 'kafka'})}")
    if "kafka" in only and not (args.kafka_url and args.database_url):
        parser.error("the Kafka run needs --kafka-url and --database-url (or LOOM_TEST_*)")
    if "kafka" in only and "memory" not in only:
        parser.error("the Kafka run's baseline is measured by the memory run: add memory")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    lines = args.lines or (QUICK_LINES if args.quick else LINES)
    if not 2000 <= lines <= 999_999:
        parser.error("--lines must be from 2000 to 999999 (six-digit line numbers)")
    paced_lines = QUICK_PACED_LINES if args.quick else PACED_LINES
    try:
        run(
            lines=lines,
            paced_lines=paced_lines,
            repeat=args.repeat,
            quick=args.quick,
            only=only,
            database_url=args.database_url,
            kafka_url=args.kafka_url,
        )
    except BenchError as exc:
        print(f"live logs benchmark failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
