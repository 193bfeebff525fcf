"""One event-stream subscription per process, fanned out in memory (DESIGN §9).

The `Hub` reads `loom.events` once and hands each event to the followers of its
execution. A follower is either *in step* (it has sent every line before the batch that
arrives next) or *catching up* (its own task is sending the current state, replaying
stored lines or filling a gap from the database, and the hub buffers events for it).

For followers in step a `log.batch` is encoded ONCE and the same bytes are written to
every connection (`websockets.broadcast`); only a follower that has a gap (a batch lost
between the database and the broker, or a subscription that broke) leaves the group, and
its task fills the gap from the database before it rejoins. A follower whose unsent bytes
pass the high-water mark leaves the group too: its task waits for its connection to
drain (a burst is not a slow reader), and closes it with 4008 only when it does not drain
in time (the client resumes with `after`).

A channel that hears nothing for a while asks the database whether its execution has
moved on (a lost batch with nothing after it, a lost final status, an execution cancelled
without a worker): the followers are then sent what is stored, and closed with 1000 if
the execution has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State

from loom_db import Database, NotFound, executions, logs
from loom_db.executions import FINISHED_STATUSES
from loom_messaging import Envelope, EventStream
from loom_websocket.metrics import WebsocketMetrics

__all__ = ["SLOW", "Follower", "Hub", "Watcher", "execution_frame", "logs_frame", "node_frame"]

SLOW = 4008
"""The close code of a follower that fell too far behind (it resumes with `after`)."""

IDLE_CHECK = 5.0
"""Seconds without an event after which a channel asks the database (1 s while the
event subscription is down)."""

FRAMES_KEPT = 256
"""Encoded `logs` frames of recent batches kept for followers catching up."""

POLL = "loom.poll"
"""The type of the hub's own note to a follower: the database has moved on."""


def logs_frame(lines: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "logs", "lines": lines})


def node_frame(data: dict[str, Any]) -> bytes:
    frame = {
        "type": "node",
        "node": data["node"],
        "status": data["status"],
        "attempt": data["attempt"],
        "ts": data["ts"],
    }
    for key in ("exit_code", "error"):
        if data.get(key) is not None:
            frame[key] = data[key]
    return orjson.dumps(frame)


def execution_frame(data: dict[str, Any], *, with_id: bool = False) -> bytes:
    frame: dict[str, Any] = {"type": "execution", "status": data["status"], "ts": data["ts"]}
    if with_id:
        frame["execution_id"] = data["execution_id"]
        frame["graph"] = data.get("graph")
    if data.get("error"):
        frame["error"] = data["error"]
    return orjson.dumps(frame)


def _weight(lines: list[dict[str, Any]]) -> int:
    """About the bytes `lines` take once encoded (for the high-water mark)."""
    return sum(len(line["text"]) for line in lines) + 96 * len(lines)


@dataclass(eq=False)
class Follower:
    """One connection following one execution. `last_seq`: the last line sent."""

    conn: ServerConnection
    execution_id: str
    last_seq: int
    pending: deque[tuple[Envelope, int]] = field(default_factory=deque)
    pending_bytes: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    """Its unsent bytes passed the high-water mark: its task waits for them to drain."""

    def buffer(self, envelope: Envelope, weight: int) -> None:
        self.pending.append((envelope, weight))
        self.pending_bytes += weight
        self.wake.set()

    def compact(self) -> None:
        """Forget the buffered log batches (the database has every line: the follower's
        task fills the gap from it), keeping the status changes in their order."""
        self.pending = deque((e, w) for e, w in self.pending if e.type != "log.batch")
        self.pending_bytes = sum(w for _, w in self.pending)

    def take(self) -> Envelope | None:
        if not self.pending:
            return None
        envelope, weight = self.pending.popleft()
        self.pending_bytes -= weight
        return envelope


@dataclass(eq=False)
class Watcher:
    """One `/ws/events` connection; `graph` None: every graph."""

    conn: ServerConnection
    graph: str | None


@dataclass(eq=False)
class _Channel:
    in_step: set[Follower] = field(default_factory=set)
    catching: set[Follower] = field(default_factory=set)
    heard: float = field(default_factory=time.monotonic)
    checking: bool = False

    def __bool__(self) -> bool:
        return bool(self.in_step or self.catching)


class Hub:
    """The fan-out of one process. `run()` subscribes (and resubscribes after a broken
    subscription) until cancelled; `ready` is set while the subscription is live."""

    def __init__(
        self,
        events: EventStream,
        database: Database,
        metrics: WebsocketMetrics,
        *,
        high_water: int,
    ) -> None:
        self._events = events
        self._database = database
        self._metrics = metrics
        self.high_water = high_water
        self._channels: dict[str, _Channel] = {}
        self._watchers: set[Watcher] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._frames: OrderedDict[int, tuple[dict[str, Any], bytes]] = OrderedDict()
        self.ready = asyncio.Event()
        self._log = logging.getLogger("loom.websocket")

    # --- followers -------------------------------------------------------------------

    def follow(self, follower: Follower) -> None:
        """Register `follower` as catching up: from now on its events are buffered."""
        channel = self._channels.get(follower.execution_id)
        if channel is None:
            channel = self._channels[follower.execution_id] = _Channel()
        channel.catching.add(follower)

    def step_in(self, follower: Follower) -> bool:
        """Move `follower` into the broadcast group if nothing is buffered for it (no await
        between the caller's last send and this check, so nothing can slip between)."""
        if follower.pending:
            return False
        channel = self._channels[follower.execution_id]
        channel.catching.discard(follower)
        channel.in_step.add(follower)
        follower.wake.clear()
        return True

    def leave(self, follower: Follower) -> None:
        channel = self._channels.get(follower.execution_id)
        if channel is None:
            return
        channel.in_step.discard(follower)
        channel.catching.discard(follower)
        if not channel:
            del self._channels[follower.execution_id]

    def watch(self, watcher: Watcher) -> None:
        self._watchers.add(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def in_step(self, execution_id: str) -> int:
        """How many followers of `execution_id` are in the broadcast group."""
        channel = self._channels.get(execution_id)
        return 0 if channel is None else len(channel.in_step)

    @property
    def followers(self) -> int:
        return sum(len(c.in_step) + len(c.catching) for c in self._channels.values())

    # --- the subscription ------------------------------------------------------------

    async def run(self) -> None:
        delay = 0.2
        checks = asyncio.create_task(self._check_idle(), name="loom-websocket-idle")
        try:
            while True:
                try:
                    async with self._events.subscribe() as stream:
                        self.ready.set()
                        delay = 0.2
                        self._log.info("following the event stream")
                        # Whatever was missed while the subscription was down is filled
                        # from the database as soon as each execution is heard from.
                        async for envelope in stream:
                            self.dispatch(envelope)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._log.warning(
                        "event stream subscription failed (%s); retrying in %.1fs", exc, delay
                    )
                self.ready.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self.ready.clear()
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks

    def dispatch(self, envelope: Envelope) -> None:
        data = envelope.data
        execution_id = data.get("execution_id")
        if envelope.type == "execution.status" and self._watchers:
            self._tell_watchers(data)
        channel = self._channels.get(execution_id) if isinstance(execution_id, str) else None
        if channel is None:
            return
        channel.heard = time.monotonic()
        if envelope.type == "log.batch":
            weight = _weight(data["lines"])
        else:
            weight = 128
        for follower in channel.catching:
            follower.buffer(envelope, weight)
            if follower.pending_bytes > self.high_water:
                follower.compact()
        if not channel.in_step:
            return
        if envelope.type == "log.batch":
            self._lines(channel, envelope, weight)
        elif envelope.type == "node.status":
            self._send(channel.in_step, node_frame(data))
        elif envelope.type == "execution.status":
            if data.get("status") in FINISHED_STATUSES:
                # Each follower's task sends what is still stored, then this, then 1000.
                self._hand_back(channel, list(channel.in_step), envelope, weight)
            else:
                self._send(channel.in_step, execution_frame(data))

    def _lines(self, channel: _Channel, envelope: Envelope, weight: int) -> None:
        lines: list[dict[str, Any]] = envelope.data["lines"]
        if not lines:
            return
        first, last = lines[0]["seq"], lines[-1]["seq"]
        group: list[Follower] = []
        behind: list[Follower] = []
        for follower in channel.in_step:
            seen = follower.last_seq
            if seen == first - 1:
                group.append(follower)
            elif seen >= last:
                continue
            elif seen >= first:
                follower.last_seq = last
                self._send([follower], logs_frame([li for li in lines if li["seq"] > seen]))
            else:
                behind.append(follower)
        if behind:
            self._hand_back(channel, behind, envelope, weight)
        if group:
            for follower in group:
                follower.last_seq = last
            self._send(group, self.batch_frame(envelope))

    def batch_frame(self, envelope: Envelope) -> bytes:
        """The `logs` frame of a whole `log.batch`, encoded once for every follower that
        sends it (in step now, or catching up later from its buffer)."""
        key = id(envelope.data)
        known = self._frames.get(key)
        if known is not None and known[0] is envelope.data:
            return known[1]
        frame = logs_frame(envelope.data["lines"])
        self._frames[key] = (envelope.data, frame)
        if len(self._frames) > FRAMES_KEPT:
            self._frames.popitem(last=False)
        return frame

    def _hand_back(
        self, channel: _Channel, followers: list[Follower], envelope: Envelope, weight: int
    ) -> None:
        for follower in followers:
            channel.in_step.discard(follower)
            channel.catching.add(follower)
            follower.buffer(envelope, weight)

    def _send(self, followers: Iterable[Follower], frame: bytes) -> None:
        followers = list(followers)
        conns = [f.conn for f in followers]
        broadcast(conns, frame, text=True)
        self._metrics.sent(len(conns), len(frame))
        for follower in followers:
            if _unsent(follower.conn) > self.high_water:
                # Out of the group until its connection drains (its task waits for that,
                # and closes it with 4008 if it does not); what comes meanwhile is
                # buffered for it like for any follower catching up.
                channel = self._channels[follower.execution_id]
                channel.in_step.discard(follower)
                channel.catching.add(follower)
                follower.draining = True
                follower.wake.set()
                self._metrics.drain_waits.inc()

    def _tell_watchers(self, data: dict[str, Any]) -> None:
        graph = data.get("graph")
        frame = execution_frame(data, with_id=True)
        chosen = [w for w in self._watchers if w.graph is None or w.graph == graph]
        if not chosen:
            return
        conns = [w.conn for w in chosen]
        broadcast(conns, frame, text=True)
        self._metrics.sent(len(conns), len(frame))
        for watcher in chosen:
            if _unsent(watcher.conn) > self.high_water:
                self._watchers.discard(watcher)
                self._metrics.slow_closes.inc()
                task = asyncio.create_task(watcher.conn.close(SLOW, "too slow"))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    # --- the database as the safety net ----------------------------------------------

    async def _check_idle(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            limit = IDLE_CHECK if self.ready.is_set() else 1.0
            now = time.monotonic()
            for execution_id, channel in list(self._channels.items()):
                if channel.in_step and not channel.checking and now - channel.heard > limit:
                    channel.checking = True
                    channel.heard = now
                    task = asyncio.create_task(self._check(execution_id, channel))
                    self._tasks.add(task)  # a task nothing refers to may be collected
                    task.add_done_callback(self._tasks.discard)

    async def _check(self, execution_id: str, channel: _Channel) -> None:
        try:
            async with self._database.read() as conn:
                record = await executions.get_execution(conn, execution_id)
                stored = await logs.last_seq(conn, execution_id)
            ended = record.finished
        except NotFound:  # deleted (retention): each follower's task closes with 4404
            ended, stored = True, 0
        except Exception as exc:
            self._log.info("checking execution %s failed: %s", execution_id, exc)
            return
        finally:
            channel.checking = False
        behind = [f for f in channel.in_step if f.last_seq < stored or ended]
        if behind:
            note = Envelope(
                type=POLL,
                version=1,
                id="",
                ts="",
                trace={},
                data={"execution_id": execution_id},
            )
            self._hand_back(channel, behind, note, 0)


def _unsent(conn: ServerConnection) -> int:
    if conn.protocol.state is not State.OPEN:
        return 0
    return int(conn.transport.get_write_buffer_size())
