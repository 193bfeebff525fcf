"""`loom logs ID [-f]` and `loom trigger GRAPH --follow`.

Three layers:

* the follower's reconnect, backoff, no-duplicate and exit-status logic against a small
  REAL `websockets` server started here, which speaks DESIGN §9's protocol and drops,
  refuses or closes connections on purpose (a test fixture playing the WebSocket
  service, so each failure happens exactly when the test wants it);
* the commands against a real REST service (`loom serve rest`, as test_remote.py starts
  it) and that same scripted WebSocket server, which the REST service names as its
  `ws_url`: what a user sees printed and the exit status;
* the whole system: REST service, worker and WebSocket service as processes on
  PostgreSQL and RabbitMQ; the WebSocket service is killed and restarted while
  `loom trigger --follow` follows, and every line is still printed exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from click.testing import CliRunner, Result
from websockets.asyncio.server import ServerConnection, serve

from loom_cli.client import ClientError
from loom_cli.follow import Backoff, Follower, after_close, follow
from loom_cli.main import cli
from loom_db import create_database, executions, logs, node_runs
from loom_db.logs import LogLineIn
from loom_db.testing import fresh_postgres_database, require_services
from loom_messaging.rabbitmq import delete_prefix

from .test_remote import PASSWORD, SECRET_KEY, Server, free_port, serve_rest

FAST = Backoff(first=0.05, factor=2.0, longest=0.2, give_up=3.0)
Item = dict[str, Any]


# --- a scripted WebSocket server playing the service -------------------------------------

Script = Callable[[ServerConnection, int], Awaitable[None]]
"""What the server does on one connection, given the `after` the client asked for."""


@dataclass
class FakeLive:
    """Connection N runs `scripts[N]` (the last one again for any further connection);
    records each request's `after` and headers."""

    scripts: Sequence[Script]
    afters: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def handler(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None
        self.headers.append({k.lower(): v for k, v in request.headers.raw_items()})
        path = urlsplit(request.path)
        assert path.path.startswith("/ws/executions/")
        after = int(parse_qs(path.query)["after"][0])
        self.afters.append(after)
        script = self.scripts[min(len(self.afters), len(self.scripts)) - 1]
        await script(connection, after)


def logs_frame(first: int, last: int, node: str = "hello") -> str:
    lines = [
        {
            "seq": seq,
            "node": node,
            "stream": "stdout",
            "ts": "2026-11-23T10:00:00.123Z",
            "text": f"line {seq}",
        }
        for seq in range(first, last + 1)
    ]
    return json.dumps({"type": "logs", "lines": lines})


def node_frame(node: str, status: str, attempt: int = 1, **more: Any) -> str:
    frame = {"type": "node", "node": node, "status": status, "attempt": attempt}
    return json.dumps({**frame, "ts": "2026-11-23T10:00:00Z", **more})


def execution_frame(status: str, **more: Any) -> str:
    return json.dumps({"type": "execution", "status": status, "ts": "2026-11-23T10:00:01Z", **more})


def sends(*frames: str, close: int | None = 1000, reason: str = "") -> Script:
    """Send `frames`, then close with `close` (None: drop the TCP connection, no close
    frame, as a killed server or a broken network would)."""

    async def script(connection: ServerConnection, after: int) -> None:
        for frame in frames:
            await connection.send(frame)
        if close is None:
            connection.transport.abort()
        else:
            await connection.close(close, reason)

    return script


def replays(last: int, *, then: Sequence[str] = (), close: int = 1000) -> Script:
    """A server that honours `after`: node state, lines after..last, `then`, close."""

    async def script(connection: ServerConnection, after: int) -> None:
        await connection.send(node_frame("hello", "running"))
        if after < last:
            await connection.send(logs_frame(after + 1, last))
        for frame in then:
            await connection.send(frame)
        await connection.close(close)

    return script


@contextmanager
def live_server(fake: FakeLive, port: int = 0) -> Iterator[int]:
    """`fake` served on 127.0.0.1:`port` from a thread of its own (so that code calling
    `asyncio.run`, as the commands do, can talk to it); yields the port."""
    ready: queue.Queue[tuple[asyncio.AbstractEventLoop, asyncio.Event, int] | BaseException] = (
        queue.Queue()
    )

    async def main() -> None:
        stop = asyncio.Event()
        try:
            server = await serve(fake.handler, "127.0.0.1", port, compression=None)
        except BaseException as exc:
            ready.put(exc)
            raise
        async with server:
            ready.put((asyncio.get_running_loop(), stop, server.sockets[0].getsockname()[1]))
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started = ready.get(timeout=10)
    assert not isinstance(started, BaseException), started
    loop, stop, bound = started
    try:
        yield bound
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


@dataclass
class Followed:
    follower: Follower
    shown: list[Item]
    notices: list[str]

    @property
    def seqs(self) -> list[int]:
        return [item["seq"] for item in self.shown if item["type"] == "log"]


async def run_follow(
    port: int,
    *,
    tokens: Sequence[str] = ("token-1",),
    backoff: Backoff = FAST,
    after: int = 0,
) -> Followed:
    """`follow` against 127.0.0.1:`port`; each refresh moves to the next of `tokens`."""
    shown: list[Item] = []
    notices: list[str] = []
    current = [0]

    async def refresh() -> bool:
        if current[0] + 1 >= len(tokens):
            return False
        current[0] += 1
        return True

    follower = await follow(
        f"ws://127.0.0.1:{port}",
        "5b1f6a46-0f4b-4c1e-9a51-2d7c3b8e1f00",
        token=lambda: tokens[current[0]],
        refresh=refresh,
        show=shown.append,
        notice=notices.append,
        after=after,
        backoff=backoff,
    )
    return Followed(follower, shown, notices)


async def follow_fake(fake: FakeLive, **options: Any) -> Followed:
    with live_server(fake) as port:
        return await run_follow(port, **options)


# --- the follower's frames (pure) -------------------------------------------------------


def test_a_line_already_printed_is_never_printed_again() -> None:
    follower = Follower()

    first = follower.read(logs_frame(1, 3))
    again = follower.read(logs_frame(2, 5))

    assert [line["seq"] for line in first + again] == [1, 2, 3, 4, 5]
    assert follower.last_seq == 5
    assert again[0] == {
        "type": "log",
        "seq": 4,
        "node": "hello",
        "stream": "stdout",
        "ts": "2026-11-23T10:00:00.123Z",
        "text": "line 4",
    }


def test_a_node_state_sent_again_after_a_reconnect_is_not_printed_again() -> None:
    follower = Follower()

    shown = [
        *follower.read(node_frame("build[0]", "running")),
        *follower.read(node_frame("build[0]", "running")),
        *follower.read(node_frame("build[0]", "failed", exit_code=2)),
        *follower.read(node_frame("build[0]", "running", attempt=2)),
        *follower.read(execution_frame("succeeded")),
        *follower.read(execution_frame("succeeded")),
    ]

    assert [(i["type"], i["status"], i.get("attempt")) for i in shown] == [
        ("node", "running", 1),
        ("node", "failed", 1),
        ("node", "running", 2),
        ("execution", "succeeded", None),
    ]
    assert follower.status == "succeeded"


def test_an_unknown_frame_type_is_skipped_and_a_broken_frame_is_an_error() -> None:
    follower = Follower()

    assert follower.read(json.dumps({"type": "metrics-of-the-future", "x": 1})) == []
    for broken in ("not json", "[1, 2]", json.dumps({"type": "logs", "lines": [{"text": "x"}]})):
        with pytest.raises(ClientError) as raised:
            follower.read(broken)
        assert raised.value.exit_code == 4


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (1000, "done"),
        (4401, "refresh"),
        (4008, "reconnect"),
        (1001, "reconnect"),
        (1006, "reconnect"),
        (1011, "reconnect"),
        (1012, "reconnect"),
    ],
)
def test_close_codes_that_end_refresh_or_resume(code: int, action: str) -> None:
    assert after_close(code, "", "e1") == action


@pytest.mark.parametrize(
    ("code", "exit_code", "words"),
    [
        (4404, 1, "Not Found: execution 'e1' not found"),
        (4403, 3, "Forbidden"),
        (1008, 4, "closed the connection with 1008 (policy)"),
    ],
)
def test_close_codes_that_stop_following(code: int, exit_code: int, words: str) -> None:
    with pytest.raises(ClientError) as raised:
        after_close(code, "policy", "e1")
    assert raised.value.exit_code == exit_code
    assert words in raised.value.message


# --- the follower against a scripted server ---------------------------------------------


async def test_follow_sends_the_token_without_compression_and_ends_with_the_status() -> None:
    fake = FakeLive(
        [sends(node_frame("hello", "running"), logs_frame(1, 3), execution_frame("failed"))]
    )

    followed = await follow_fake(fake)

    assert followed.seqs == [1, 2, 3]
    assert followed.follower.status == "failed"
    assert fake.afters == [0]
    assert fake.headers[0]["authorization"] == "Bearer token-1"
    assert "sec-websocket-extensions" not in fake.headers[0]
    assert followed.notices == []


@pytest.mark.parametrize(
    ("close", "notices"),
    [(None, 1), (1001, 1), (1011, 1), (4008, 0)],
    ids=["dropped", "going-away", "server-error", "too-slow"],
)
async def test_every_line_is_printed_once_across_lost_connections(
    close: int | None, notices: int
) -> None:
    """The server drops the follower twice; the second time it also replays from before
    `after` (as a careless server might): each line is still printed exactly once."""
    overlap_then_drop: Script = sends(node_frame("hello", "running"), logs_frame(2, 7), close=close)
    fake = FakeLive(
        [
            sends(node_frame("hello", "running"), logs_frame(1, 4), close=close),
            overlap_then_drop,
            replays(10, then=[node_frame("hello", "succeeded"), execution_frame("succeeded")]),
        ]
    )

    followed = await follow_fake(fake)

    assert followed.seqs == list(range(1, 11))
    assert fake.afters == [0, 4, 7]
    nodes = [(i["node"], i["status"]) for i in followed.shown if i["type"] == "node"]
    assert nodes == [("hello", "running"), ("hello", "succeeded")]
    assert followed.follower.status == "succeeded"
    assert len(followed.notices) == notices * 2


async def test_a_refused_connection_is_retried_until_the_service_is_back() -> None:
    port = free_port()
    fake = FakeLive([replays(3, then=[execution_frame("succeeded")])])
    done = threading.Event()

    def start_later() -> None:
        time.sleep(0.6)
        with live_server(fake, port):
            done.wait(10)

    starter = threading.Thread(target=start_later)
    starter.start()
    try:
        followed = await run_follow(port)
    finally:
        done.set()
        starter.join()

    assert followed.seqs == [1, 2, 3]
    assert fake.afters == [0]
    assert len(followed.notices) == 1
    assert followed.notices[0].startswith(f"cannot reach the live logs at ws://127.0.0.1:{port}")


async def test_it_backs_off_doubling_and_gives_up_after_the_time_without_a_connection() -> None:
    """A listener that accepts and hangs up before the handshake: each attempt fails."""
    attempts: list[float] = []

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    backoff = Backoff(first=0.1, factor=2.0, longest=0.4, give_up=1.5)
    started = time.monotonic()
    async with listener:
        with pytest.raises(ClientError) as raised:
            await run_follow(port, backoff=backoff)
    took = time.monotonic() - started

    assert raised.value.exit_code == 4
    assert "no connection to the WebSocket service" in raised.value.message
    assert "for 1.5s" in raised.value.message
    assert 1.5 <= took < 3.0
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    wanted = [0.1, 0.2, 0.4, 0.4, 0.4][: len(gaps)]
    assert len(gaps) >= 4
    assert all(want <= gap < want + 0.2 for gap, want in zip(gaps, wanted, strict=True)), gaps


async def test_a_4401_refreshes_the_token_once_and_follows_on() -> None:
    fake = FakeLive([sends(close=4401), replays(2, then=[execution_frame("succeeded")])])

    followed = await follow_fake(fake, tokens=("expired", "fresh"))

    assert followed.seqs == [1, 2]
    assert [h["authorization"] for h in fake.headers] == ["Bearer expired", "Bearer fresh"]


async def test_a_token_refused_again_after_its_refresh_ends_with_exit_3() -> None:
    fake = FakeLive([sends(close=4401)])

    with pytest.raises(ClientError) as raised:
        await follow_fake(fake, tokens=("expired", "fresh", "never-used"))

    assert raised.value.exit_code == 3
    assert "run `loom login` again" in raised.value.message
    assert len(fake.afters) == 2


@pytest.mark.parametrize(("code", "exit_code"), [(4404, 1), (4403, 3)])
async def test_an_unknown_or_forbidden_execution_stops_at_once(code: int, exit_code: int) -> None:
    fake = FakeLive([sends(close=code)])

    with pytest.raises(ClientError) as raised:
        await follow_fake(fake)

    assert raised.value.exit_code == exit_code
    assert len(fake.afters) == 1


# --- the commands, with a real REST service ---------------------------------------------


@dataclass
class Rest:
    server: Server
    database_url: str
    ws_port: int


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rest]:
    """The REST service on SQLite and memory brokers, naming 127.0.0.1:`ws_port` (where
    each test starts its scripted server) as the WebSocket service."""
    home = tmp_path_factory.mktemp("follow")
    ws_port = free_port()
    with serve_rest(home, LOOM_REST_PUBLIC_WS_URL=f"ws://127.0.0.1:{ws_port}") as server:
        yield Rest(server, f"sqlite+aiosqlite:///{home / 'loom.db'}", ws_port)


@pytest.fixture
def loom(tmp_path: Path, rest: Rest) -> Callable[..., Result]:
    """`loom ARGS` in-process, logged in as admin."""
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LOOM_")}
    environ["LOOM_CONFIG_DIR"] = str(tmp_path / "config")
    runner = CliRunner(env=environ)
    login = ["login", "--server", rest.server.url, "--username", "admin"]
    logged = runner.invoke(cli, login, env={"LOOM_PASSWORD": PASSWORD})
    assert logged.exit_code == 0, logged.output

    def run(*args: str) -> Result:
        return runner.invoke(cli, list(args))

    return run


GRAPH = """\
name: {name}
nodes:
  hello:
    run: echo hello
  a_longer_name:
    needs: [hello]
    run: echo bye
"""


def triggered(loom: Callable[..., Result], tmp_path: Path) -> str:
    """A queued execution of a new two-node graph (no worker runs it: the test plays the
    worker in the database and the WebSocket service with its scripted server)."""
    name = f"follow-{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(GRAPH.format(name=name))
    assert loom("apply", "-f", str(path)).exit_code == 0
    result = loom("trigger", name, "-o", "json")
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["id"])


def store(rest: Rest, execution_id: str, lines: int, *, end: str | None = None) -> None:
    """Store `lines` log lines of node `hello` (and its run), and end the execution with
    `end`, as a worker would."""

    async def write() -> None:
        database = create_database(rest.database_url)
        start = datetime(2026, 11, 23, 10, tzinfo=UTC)
        try:
            async with database.transaction() as conn:
                await logs.append_logs(
                    conn,
                    execution_id,
                    [
                        LogLineIn(seq, "hello", "stdout", start, f"line {seq}")
                        for seq in range(1, lines + 1)
                    ],
                )
                await node_runs.record_node(
                    conn,
                    execution_id,
                    node="hello",
                    name="hello",
                    index=None,
                    attempt=1,
                    status="failed" if end == "failed" else "succeeded",
                    started_at=start,
                    finished_at=start + timedelta(seconds=2),
                    exit_code=1 if end == "failed" else 0,
                )
            if end is not None:
                async with database.transaction() as conn:
                    assert await executions.claim(conn, execution_id, "w", 30) is not None
                    await executions.admit(
                        conn, execution_id, "w", 30, concurrency=None, on_overlap="queue"
                    )
                    error = "hello failed" if end == "failed" else None
                    await executions.finish(conn, execution_id, end, error=error)
        finally:
            await database.dispose()

    asyncio.run(write())


def test_logs_prints_the_stored_lines_as_loom_run_does_across_pages(
    loom: Callable[..., Result], rest: Rest, tmp_path: Path
) -> None:
    execution_id = triggered(loom, tmp_path)
    store(rest, execution_id, 1005)

    result = loom("logs", execution_id)

    assert result.exit_code == 0, result.output
    # The prefix is as wide as the graph's longest node id, as in `loom run`.
    expected = [f"hello         | line {seq}" for seq in range(1, 1006)]
    assert result.stdout.splitlines() == expected


def test_logs_json_output_is_one_object_per_line(
    loom: Callable[..., Result], rest: Rest, tmp_path: Path
) -> None:
    execution_id = triggered(loom, tmp_path)
    store(rest, execution_id, 3)

    result = loom("logs", execution_id, "-o", "json")

    assert result.exit_code == 0, result.output
    items = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(i["type"], i["seq"], i["node"], i["text"]) for i in items] == [
        ("log", seq, "hello", f"line {seq}") for seq in (1, 2, 3)
    ]


def test_logs_of_an_unknown_execution_exits_1(loom: Callable[..., Result]) -> None:
    result = loom("logs", str(uuid.uuid4()))

    assert result.exit_code == 1
    assert result.stderr.startswith("loom: Not Found: ")


def test_logs_follow_of_an_ended_execution_prints_it_and_exits_with_its_status(
    loom: Callable[..., Result], rest: Rest, tmp_path: Path
) -> None:
    """No WebSocket service is needed for an execution that has ended."""
    execution_id = triggered(loom, tmp_path)
    store(rest, execution_id, 2, end="failed")

    result = loom("logs", execution_id, "-f")

    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == ["hello         | line 1", "hello         | line 2"]
    assert "hello  failed  1         2.0s" in lines
    assert lines[-1].endswith(" failed in 2.0s: hello failed")


def test_trigger_follow_prints_lines_and_status_changes_then_the_summary_and_exits_0(
    loom: Callable[..., Result], rest: Rest, tmp_path: Path
) -> None:
    name = f"follow-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "graph.yaml"
    path.write_text(GRAPH.format(name=name))
    assert loom("apply", "-f", str(path)).exit_code == 0
    finishing = sends(
        node_frame("hello", "running", attempt=2),
        logs_frame(2, 3),
        node_frame("hello", "succeeded", attempt=2),
        logs_frame(4, 4, node="a_longer_name"),
        execution_frame("succeeded"),
    )

    async def worker_then_finish(connection: ServerConnection, after: int) -> None:
        """Store what the worker would (the summary comes from the REST API), then the
        rest of the frames."""
        assert connection.request is not None
        execution_id = urlsplit(connection.request.path).path.rsplit("/", 1)[1]
        await asyncio.to_thread(store, rest, execution_id, 4, end="succeeded")
        await finishing(connection, after)

    fake = FakeLive(
        [
            sends(
                node_frame("hello", "running"),
                logs_frame(1, 2),
                node_frame("hello", "failed", error="exit status 3"),
                node_frame("hello", "running", attempt=2),
                close=None,
            ),
            worker_then_finish,
        ]
    )

    with live_server(fake, rest.ws_port):
        result = loom("trigger", name, "--follow")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("execution ") and lines[0].endswith(" queued")
    assert lines[1:6] == [
        "hello         | line 1",
        "hello         | line 2",
        "hello         | » failed (exit status 3)",
        "hello         | » attempt 2 started",
        "hello         | line 3",
    ]
    assert lines[6] == "a_longer_name | line 4"
    assert fake.afters == [0, 2]
    assert "lost the live logs (closed with 1006" in result.stderr
    assert "hello  succeeded  1         2.0s" in lines
    assert lines[-1] == f"{name} succeeded in 2.0s"


def test_logs_follow_json_prints_frames_as_json_lines(
    loom: Callable[..., Result], rest: Rest, tmp_path: Path
) -> None:
    execution_id = triggered(loom, tmp_path)
    fake = FakeLive([replays(2, then=[execution_frame("failed", error="boom")])])

    with live_server(fake, rest.ws_port):
        result = loom("logs", execution_id, "-f", "-o", "json")

    assert result.exit_code == 1, result.output
    items = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(i["type"], i.get("seq"), i.get("status")) for i in items] == [
        ("node", None, "running"),
        ("log", 1, None),
        ("log", 2, None),
        ("execution", None, "failed"),
    ]


def test_logs_follow_of_an_execution_the_service_does_not_know_exits_1(
    loom: Callable[..., Result], rest: Rest, tmp_path: Path
) -> None:
    execution_id = triggered(loom, tmp_path)

    with live_server(FakeLive([sends(close=4404)]), rest.ws_port):
        result = loom("logs", execution_id, "-f")

    assert result.exit_code == 1
    assert f"loom: Not Found: execution '{execution_id}' not found" in result.stderr


def test_ctrl_c_stops_following_with_130_and_no_traceback(
    loom: Callable[..., Result], rest: Rest, tmp_path: Path
) -> None:
    execution_id = triggered(loom, tmp_path)

    async def stay(connection: ServerConnection, after: int) -> None:
        await connection.send(logs_frame(1, 1))
        await connection.wait_closed()

    environ = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    environ["LOOM_CONFIG_DIR"] = str(tmp_path / "config")
    with live_server(FakeLive([stay]), rest.ws_port):
        process = subprocess.Popen(
            [sys.executable, "-m", "loom_cli", "logs", execution_id, "-f"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert first == b"hello         | line 1\n"
    assert process.returncode == 130
    assert b"Traceback" not in err
    assert f"interrupted: execution {execution_id} goes on".encode() in err


# --- the whole system: REST, worker and WebSocket services as processes -----------------


def _service_url(variable: str) -> str:
    url = os.environ.get(variable)
    if not url:
        if require_services():
            pytest.fail(f"{variable} is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip(f"{variable} is not set: the follow-through-a-restart test skipped")
    return url


@dataclass
class System:
    env: dict[str, str]
    tmp: Path
    rest_port: int
    ws_port: int
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *command: str, health_port: int | None = None) -> None:
        with (self.tmp / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, *command],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if health_port is not None:
            self.wait_healthy(name, health_port)

    def wait_healthy(self, name: str, port: int) -> None:
        deadline = time.monotonic() + 30
        while True:
            process = self.processes[name]
            assert process.poll() is None, f"{name} died:\n{self.log(name)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{name}: no /healthz in 30s:\n{self.log(name)}"
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    """PostgreSQL and RabbitMQ (work queue AND events: the services are separate
    processes); the REST service, a worker and the WebSocket service."""
    _service_url("LOOM_TEST_POSTGRES_URL")  # which fresh_postgres_database reads
    amqp = _service_url("LOOM_TEST_AMQP_URL")
    prefix = f"loomtest-follow-{uuid.uuid4().hex[:8]}"
    with fresh_postgres_database() as database_url:
        rest_port, ws_port, worker_port = free_port(), free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        env |= {
            "LOOM_DATABASE_URL": database_url,
            "LOOM_QUEUE_URL": amqp,
            "LOOM_EVENTS_URL": amqp,
            "LOOM_BROKER_PREFIX": prefix,
            "LOOM_SECRET_KEY": SECRET_KEY,
            "LOOM_ADMIN_PASSWORD": PASSWORD,
            "LOOM_REST_HOST": "127.0.0.1",
            "LOOM_REST_PORT": str(rest_port),
            "LOOM_REST_PUBLIC_WS_URL": f"ws://127.0.0.1:{ws_port}",
            "LOOM_WEBSOCKET_HOST": "127.0.0.1",
            "LOOM_WEBSOCKET_PORT": str(ws_port),
            "LOOM_WORKER_PORT": str(worker_port),
            "LOOM_WORKER_ID": "follow-worker",
            "LOOM_SHUTDOWN_GRACE": "2",
        }
        found = System(env, tmp_path, rest_port, ws_port)
        try:
            subprocess.run(
                [sys.executable, "-m", "loom_db", "upgrade"], env=env, check=True, timeout=120
            )
            found.start("rest", "-m", "loom_cli", "serve", "rest", health_port=rest_port)
            found.start("worker", "-m", "loom_cli", "serve", "worker", health_port=worker_port)
            found.start("websocket", "-m", "loom_websocket", health_port=ws_port)
            yield found
        finally:
            for process in found.processes.values():
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            asyncio.run(delete_prefix(amqp, prefix))


LINES = 60


@pytest.mark.slow
def test_trigger_follow_reconnects_across_a_websocket_service_restart(
    system: System, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{system.rest_port}"
    login = httpx.post(
        f"{base}/api/v1/auth/login", json={"username": "admin", "password": PASSWORD}
    )
    token = login.json()["access_token"]
    graph = tmp_path / "slow.yaml"
    graph.write_text(
        "name: slow-lines\nnodes:\n  hello:\n    run: |\n"
        f'      for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.1; done\n'
    )
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    cli_env |= {
        "LOOM_CONFIG_DIR": str(tmp_path / "config"),
        "LOOM_SERVER": base,
        "LOOM_TOKEN": token,
    }
    applied = subprocess.run(
        [sys.executable, "-m", "loom_cli", "apply", "-f", str(graph)],
        env=cli_env,
        capture_output=True,
        timeout=60,
    )
    assert applied.returncode == 0, applied.stderr

    with (tmp_path / "stderr").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "loom_cli", "trigger", "slow-lines", "--follow"],
            env=cli_env,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    seen: queue.Queue[bytes] = queue.Queue()
    out: list[bytes] = []

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            out.append(raw)
            seen.put(raw)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while b"line 10\n" not in b"".join(out):
            assert time.monotonic() < deadline, b"".join(out)
            seen.get(timeout=60)
        system.kill("websocket")
        time.sleep(1.5)  # lines keep coming meanwhile: the worker stores them
        system.start("websocket", "-m", "loom_websocket", health_port=system.ws_port)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
        assert process.stdout is not None
        process.stdout.close()

    text, err = b"".join(out).decode(), (tmp_path / "stderr").read_text()
    assert process.returncode == 0, f"{text}\n{err}\n{system.log('websocket')}"
    printed = [line for line in text.splitlines() if line.startswith("hello | ")]
    assert printed == [f"hello | line {i}" for i in range(1, LINES + 1)]
    assert "lost the live logs" in err
    assert text.splitlines()[-1].startswith("slow-lines succeeded")
