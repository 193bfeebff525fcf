"""`loom logs ID [-f]` and `loom trigger GRAPH --follow`: an execution's log lines, printed
as `loom run` prints them, from the REST API (the lines stored so far) or followed live
from the WebSocket service (DESIGN §9).

Following is a thin asyncio loop (`follow`) around a pure reader of the server's frames
(`Follower`) that decides what to print: each log line once (a line with a seq at or
below the last one printed is dropped, so the replay after a reconnect never repeats a
line) and each node or execution status change once. The loop reconnects with
`after=<last seq>` when the connection drops or cannot be made, when the server goes away
(1001) or finds us too slow (4008), backing off from 0.2 s to 5 s and giving up after
60 s without a connection. It ends when the server closes with 1000 (the execution ended
and every line was sent); the command then exits as `loom run` does: 0 succeeded, 1 not.
4401 refreshes the login once (through the REST API, as every command does) and tries
again; 4403 and 4404 end as the REST API's 403 and 404 do (exit 3 and 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast, get_args
from urllib.parse import quote

import click

from loom_cli.client import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_UNREACHABLE,
    Client,
    ClientError,
    Problem,
)
from loom_cli.console import Console
from loom_cli.local import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from loom_cli.remote import (
    EXIT_STATUS_HELP,
    NOT_LOOM,
    Remote,
    quoted,
    remote_options,
    remote_session,
)
from loom_common import Graph, SpecError, load_graph
from loom_worker.engine import Execution, NodeRecord
from loom_worker.events import (
    Event,
    ExecutionEvent,
    ExecutionStatus,
    LogEvent,
    NodeEvent,
    NodeStatus,
)

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection, connect

__all__ = [
    "Backoff",
    "Follower",
    "after_close",
    "follow",
    "follow_execution",
    "logs",
    "print_logs",
]

ACTIVE = frozenset({"queued", "waiting", "running"})
"""An execution in any other status has ended: its lines are all stored."""
PAGE = 1000
"""Log lines per REST page (the API's largest)."""
MAX_FRAME = 64 * 1024 * 1024
OPEN_TIMEOUT = 10.0

CLOSE_DONE = 1000
CLOSE_UNAUTHENTICATED, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_TOO_SLOW = 4401, 4403, 4404, 4008
CLOSE_RECONNECT = frozenset({1001, 1006, 1011, 1012, 1013, 1014, CLOSE_TOO_SLOW})
"""Going away, dropped, server error or restart, try again later, bad gateway, too slow:
the execution goes on, so does the following."""

LOGS_EXIT_HELP = (
    EXIT_STATUS_HELP + "\nWith -f, also 1 when the execution did not succeed; 130 Ctrl-C."
)

Item = dict[str, Any]
"""One thing to print: a log line (`type` "log") or a `node` or `execution` frame."""
CloseAction = Literal["done", "reconnect", "refresh"]


# --- the pure part: frames in, things to print out --------------------------------------


def _protocol_error(what: str) -> ClientError:
    return ClientError(
        f"the WebSocket service sent {what}: is the server's ws_url a Loom WebSocket service?",
        EXIT_UNREACHABLE,
    )


@dataclass
class Follower:
    """What one follow has printed: the last log seq, each node instance's status and
    attempt, the execution's status. `read` turns a frame into what is new in it."""

    last_seq: int = 0
    status: str | None = None
    """The execution's latest status (`running`, or how it ended)."""
    error: str | None = None
    _nodes: dict[str, tuple[str, int]] = field(default_factory=dict, init=False, repr=False)

    def read(self, message: str | bytes) -> list[Item]:
        """The items of one frame not printed before, in order. Unknown frame types are
        skipped (a newer server's). Raises `ClientError` for a frame that is not JSON or
        not shaped as DESIGN §9 says."""
        try:
            frame = json.loads(message)
        except ValueError:
            raise _protocol_error("a frame that is not JSON") from None
        if not isinstance(frame, dict):
            raise _protocol_error("a frame that is not a JSON object")
        kind = frame.get("type")
        if kind == "logs":
            return self._lines(frame.get("lines"))
        if kind == "node":
            return self._node(frame)
        if kind == "execution":
            return self._execution(frame)
        return []

    def _lines(self, lines: Any) -> list[Item]:
        if not isinstance(lines, list):
            raise _protocol_error("a logs frame without lines")
        new: list[Item] = []
        for line in lines:
            seq = line.get("seq") if isinstance(line, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise _protocol_error("a log line without a seq")
            if seq <= self.last_seq:
                continue  # sent before this reconnect, or twice: printed already
            self.last_seq = seq
            new.append({"type": "log", **line})
        return new

    def _node(self, frame: Item) -> list[Item]:
        node, status, attempt = frame.get("node"), frame.get("status"), frame.get("attempt", 0)
        if not isinstance(node, str) or not isinstance(status, str):
            raise _protocol_error("a node frame without node or status")
        state = (status, attempt if isinstance(attempt, int) else 0)
        if self._nodes.get(node) == state:
            return []  # the state a reconnect sends first: known already
        self._nodes[node] = state
        return [frame]

    def _execution(self, frame: Item) -> list[Item]:
        status = frame.get("status")
        if not isinstance(status, str):
            raise _protocol_error("an execution frame without a status")
        if status == self.status:
            return []
        self.status = status
        error = frame.get("error")
        self.error = error if isinstance(error, str) else None
        return [frame]


def after_close(code: int, reason: str, execution_id: str) -> CloseAction:
    """What to do when the server closed with `code`. Raises `ClientError` when following
    cannot go on (4403, 4404, or a code this client does not know)."""
    if code == CLOSE_DONE:
        return "done"
    if code == CLOSE_UNAUTHENTICATED:
        return "refresh"
    if code in CLOSE_RECONNECT:
        return "reconnect"
    if code == CLOSE_FORBIDDEN:
        raise ClientError(
            f"Forbidden: you may not read the logs of execution {execution_id}", EXIT_AUTH
        )
    if code == CLOSE_NOT_FOUND:
        raise ClientError(f"Not Found: execution {execution_id!r} not found", EXIT_FAILED)
    raise ClientError(
        f"the WebSocket service closed the connection with {code}"
        + (f" ({reason})" if reason else ""),
        EXIT_UNREACHABLE,
    )


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait between connection attempts, in seconds: `first`, multiplied by
    `factor` after each failure up to `longest`; back to `first` once connected. After
    `give_up` seconds without a connection, following stops."""

    first: float = 0.2
    factor: float = 2.0
    longest: float = 5.0
    give_up: float = 60.0


# --- the I/O shell ----------------------------------------------------------------------


async def follow(
    ws_url: str,
    execution_id: str,
    *,
    token: Callable[[], str | None],
    refresh: Callable[[], Awaitable[bool]],
    show: Callable[[Item], None],
    notice: Callable[[str], None],
    after: int = 0,
    backoff: Backoff = Backoff(),
) -> Follower:
    """Follow execution `execution_id` on the WebSocket service at `ws_url`, passing each
    new item to `show`, until the server closes with 1000; the `Follower` then holds the
    execution's status. `token()` is the bearer token of each attempt; `refresh()`
    renews it, True when it changed (called once after a 4401). `notice` gets one line
    when the connection is lost or cannot be made.

    Raises `ClientError`: 4403 (exit 3), 4404 (exit 1), a second 4401 in a row (exit 3),
    `give_up` seconds without a connection (exit 4), what `Follower.read` raises."""
    # Imported here: the commands that never follow need not pay for the client stack.
    from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI

    follower = Follower(last_seq=after)
    base = f"{ws_url.rstrip('/')}/ws/executions/{quote(execution_id, safe='')}"
    delay = backoff.first
    failing_since: float | None = None
    refreshed = False  # since the last connection the server took the token on
    connected = False
    while True:
        problem: str
        code: int | None = None
        reason = ""
        try:
            async with _connect(f"{base}?after={follower.last_seq}", token()) as connection:
                delay, failing_since, connected = backoff.first, None, True
                code, reason, taken = await _receive(connection, follower, show)
                refreshed = refreshed and not taken
        except InvalidURI as exc:
            raise ClientError(
                f"the server's ws_url {ws_url!r} is not valid: {exc}", EXIT_INVALID
            ) from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status < 500:  # refusals complete the handshake: this is not Loom's service
                raise ClientError(
                    f"the WebSocket service at {ws_url} answered HTTP {status}: is the "
                    "server's ws_url (LOOM_REST_PUBLIC_WS_URL) right?",
                    EXIT_UNREACHABLE,
                ) from None
            problem = f"HTTP {status}"
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            problem = str(exc) or type(exc).__name__
        if code is not None:
            action = after_close(code, reason, execution_id)
            if action == "done":
                return follower
            if action == "refresh":
                if refreshed or not await refresh():
                    raise ClientError(
                        f"the WebSocket service at {ws_url} refused your login (4401): run "
                        "`loom login` again",
                        EXIT_AUTH,
                    )
                refreshed = True
                continue
            problem = f"closed with {code}" + (f" ({reason})" if reason else "")
        now = time.monotonic()
        if failing_since is None:
            failing_since = now
            if not connected:
                notice(f"cannot reach the live logs at {ws_url} ({problem}): retrying")
            elif code != CLOSE_TOO_SLOW:  # that one is routine: resumed, nothing lost
                notice(f"lost the live logs ({problem}): reconnecting")
        elif now - failing_since >= backoff.give_up:
            raise ClientError(
                f"no connection to the WebSocket service at {ws_url} for "
                f"{backoff.give_up:g}s ({problem}); the execution goes on: "
                f"`loom logs {execution_id}` shows its lines",
                EXIT_UNREACHABLE,
            )
        await asyncio.sleep(delay)
        delay = min(delay * backoff.factor, backoff.longest)


def _connect(url: str, bearer: str | None) -> connect:
    from websockets.asyncio.client import connect

    return connect(
        url,
        additional_headers={"Authorization": f"Bearer {bearer}"} if bearer else {},
        compression=None,  # off on these endpoints (DESIGN §9)
        max_size=MAX_FRAME,
        open_timeout=OPEN_TIMEOUT,
        user_agent_header="loom-cli",
    )


async def _receive(
    connection: ClientConnection, follower: Follower, show: Callable[[Item], None]
) -> tuple[int, str, bool]:
    """Read frames until the connection closes: its close code (1006 when it dropped
    without one), the reason, and whether any frame came (the token was taken)."""
    from websockets.exceptions import ConnectionClosed

    taken = False
    while True:
        try:
            message = await connection.recv()
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return 1006, "", taken
            return closed.rcvd.code, closed.rcvd.reason, taken
        taken = True
        for item in follower.read(message):
            show(item)


# --- printing ---------------------------------------------------------------------------


def _when(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return datetime.now(UTC)


_NODE_STATUSES = frozenset(get_args(NodeStatus))
_EXECUTION_STATUSES = frozenset(get_args(ExecutionStatus))


def to_event(item: Item, execution_id: str) -> Event | None:
    """`item` as the event `loom run`'s console prints; None for a status it does not
    know (a newer server's)."""
    kind, ts = item.get("type"), _when(item.get("ts"))
    if kind == "log":
        return LogEvent(
            execution_id,
            int(item["seq"]),
            str(item.get("node", "")),
            str(item.get("stream", "stdout")),
            ts,
            str(item.get("text", "")),
        )
    status = item.get("status")
    error = item.get("error")
    if kind == "node" and status in _NODE_STATUSES:
        node = str(item["node"])
        index = item.get("index")
        retry_in = item.get("retry_in")
        exit_code = item.get("exit_code")
        return NodeEvent(
            execution_id,
            node,
            name=node.split("[", 1)[0],
            index=index if isinstance(index, int) else None,
            status=cast(NodeStatus, status),
            attempt=int(item.get("attempt") or 0),
            ts=ts,
            exit_code=exit_code if isinstance(exit_code, int) else None,
            error=error if isinstance(error, str) else None,
            retry_in=float(retry_in) if isinstance(retry_in, int | float) else None,
            fanout=item.get("fanout") is True,
        )
    if kind == "execution" and status in _EXECUTION_STATUSES:
        return ExecutionEvent(
            execution_id,
            cast(ExecutionStatus, status),
            ts,
            error if isinstance(error, str) else None,
        )
    return None


class Printer:
    """Prints items: as `loom run` does (`Console`), or one JSON object per line."""

    def __init__(self, execution_id: str, console: Console | None) -> None:
        self.execution_id = execution_id
        self.console = console

    def show(self, item: Item) -> None:
        if self.console is None:
            sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
            sys.stdout.flush()
            return
        event = to_event(item, self.execution_id)
        if event is not None:
            self.console.event(event)

    def notice(self, text: str) -> None:
        if self.console is not None:
            self.console.notice(text)
        else:
            click.echo(f"loom: {text}", err=True)


@dataclass
class _Ended:
    """An ended execution as `Console.summary` reads one (it reads no more than this)."""

    graph: Graph
    status: str
    error: str | None
    records: dict[str, NodeRecord]


def _summary(console: Console, execution: Item) -> None:
    nodes = [n for n in execution.get("nodes") or [] if isinstance(n, dict)]
    instances = {(str(n.get("node")), n.get("index") is not None) for n in nodes}
    records: dict[str, NodeRecord] = {}
    for n in nodes:
        name, index = str(n.get("node")), n.get("index")
        started, finished = n.get("started_at"), n.get("finished_at")
        records[str(n.get("id"))] = NodeRecord(
            node=str(n.get("id")),
            name=name,
            index=index if isinstance(index, int) else None,
            status=n.get("status") or "pending",
            attempt=int(n.get("attempt") or 0),
            error=n.get("error"),
            started_at=_when(started) if started else None,
            finished_at=_when(finished) if finished else None,
            fanout=index is None and (name, True) in instances,
        )
    ended = _Ended(console.graph, str(execution.get("status")), execution.get("error"), records)
    console.summary(cast(Execution, ended))


def _graph(client: Client, execution: Item) -> Graph:
    """The graph version `execution` ran, for the console's node names; when it was
    deleted since, one made of the node names the execution has."""
    name, version = str(execution.get("graph")), execution.get("graph_version")
    try:
        stored = client.get(f"/graphs/{quoted(name)}", {"version": version})
        return load_graph(str(stored["source"]))
    except Problem as exc:
        if exc.status != 404:
            raise
    except (SpecError, KeyError, TypeError):
        pass  # a newer server's spec: the node names below do
    names = {str(n.get("node")) for n in execution.get("nodes") or [] if isinstance(n, dict)}
    nodes = {node: {"run": "true"} for node in sorted(names) or ["node"]}
    return load_graph(json.dumps({"name": name, "nodes": nodes}))


def _print_stored(client: Client, execution_id: str, printer: Printer) -> None:
    after = 0
    while True:
        page = client.get(
            f"/executions/{quoted(execution_id)}/logs", {"after": after, "limit": PAGE}
        )
        items = page.get("items") if isinstance(page, dict) else None
        if not isinstance(items, list):
            raise ClientError(NOT_LOOM, EXIT_UNREACHABLE)
        for line in items:
            printer.show({"type": "log", **line})
        if len(items) < PAGE:
            return
        after = int(page["next_after"])


@contextmanager
def _terminal_exits(execution_id: str) -> Iterator[None]:
    """Ctrl-C ends the command with 130 (the execution goes on), a closed pipe (`| head`)
    with 141, neither with a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        click.echo(
            f"\nloom: interrupted: execution {execution_id} goes on "
            f"(`loom cancel {execution_id}` stops it)",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Python would complain about flushing stdout at exit: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


def _execution(client: Client, execution_id: str) -> Item:
    execution = client.get(f"/executions/{quoted(execution_id)}")
    if not isinstance(execution, dict) or not isinstance(execution.get("status"), str):
        raise ClientError(NOT_LOOM, EXIT_UNREACHABLE)
    return execution


def follow_execution(remote: Remote, execution_id: str) -> int:
    """Print execution `execution_id`'s lines, those stored then the new ones as they come,
    until it ends; a summary as `loom run`'s; its exit status (0 succeeded, 1 not).
    Raises `ClientError`."""
    client = remote.client
    with _terminal_exits(execution_id):
        execution = _execution(client, execution_id)
        console = None if remote.json_output else Console(_graph(client, execution))
        printer = Printer(execution_id, console)
        if execution["status"] in ACTIVE:
            index = client.get("/", auth=False)
            ws_url = index.get("ws_url") if isinstance(index, dict) else None
            if not isinstance(ws_url, str):
                raise ClientError(NOT_LOOM, EXIT_UNREACHABLE)

            async def refresh() -> bool:
                before = client.token
                # Any authenticated call refreshes an expired token (and stores the pair).
                await asyncio.to_thread(client.get, f"/executions/{quoted(execution_id)}")
                return client.token != before

            follower = asyncio.run(
                follow(
                    ws_url,
                    execution_id,
                    token=lambda: client.token,
                    refresh=refresh,
                    show=printer.show,
                    notice=printer.notice,
                )
            )
            status = follower.status
            if console is not None or status is None or status in ACTIVE:
                execution = _execution(client, execution_id)
            if status is None or status in ACTIVE:  # closed with 1000 before saying how
                status = execution["status"]
        else:
            status = execution["status"]
            _print_stored(client, execution_id, printer)
            if console is None:
                printer.show(
                    {
                        "type": "execution",
                        "status": execution["status"],
                        "ts": execution.get("finished_at"),
                        "error": execution.get("error"),
                    }
                )
        if console is not None:
            _summary(console, execution)
    return EXIT_OK if status == "succeeded" else EXIT_FAILED


def print_logs(remote: Remote, execution_id: str) -> int:
    """Print the lines stored so far of execution `execution_id`. Raises `ClientError`."""
    client = remote.client
    with _terminal_exits(execution_id):
        execution = _execution(client, execution_id)
        console = None if remote.json_output else Console(_graph(client, execution))
        _print_stored(client, execution_id, Printer(execution_id, console))
    return EXIT_OK


@click.command("logs", epilog=LOGS_EXIT_HELP)
@click.argument("execution_id", metavar="ID")
@click.option(
    "-f",
    "--follow",
    "following",
    is_flag=True,
    help="Go on printing lines as they come until the execution ends, then exit with its "
    "status (0 succeeded, 1 not) as `loom run` does.",
)
@remote_options
def logs(
    execution_id: str, following: bool, server: str | None, token: str | None, output: str | None
) -> None:
    """Print execution ID's log lines, prefixed by node as `loom run` prints them.

    With -f, follow it live (reconnecting when the connection drops, without repeating a
    line); Ctrl-C stops following (exit 130), not the execution. With -o json, one JSON
    object per line: {"type": "log", "seq", "node", "stream", "ts", "text"}, and with
    -f also the server's "node" and "execution" status frames.
    """
    with remote_session(server, token, output) as remote:
        if following:
            sys.exit(follow_execution(remote, execution_id))
        sys.exit(print_logs(remote, execution_id))
