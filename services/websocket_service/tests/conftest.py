"""Fixtures of the websocket service's tests: a real worker (in-process) and the service
over one real database (SQLite and PostgreSQL, from `loom_db.testing`) and one memory
broker, and followers that are real `websockets` clients."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from loom_auth import hash_password, new_access_token
from loom_db import Database, executions, graphs, users
from loom_db.keys import derive_keys
from loom_db.relay import OutboxRelay
from loom_db.testing import (  # noqa: F401  (fixtures, found by pytest by name)
    _postgres_schema,
    _sqlite_template,
    postgres_url,
)
from loom_db.testing import db as db  # the fixture, re-exported under its own name
from loom_messaging import Broker, open_broker
from loom_runtime import Runtime
from loom_websocket import LiveLogs, WebsocketSettings
from loom_worker.service import Worker
from loom_worker.settings import WorkerSettings

SECRET_KEY = "websocket-test-secret-key-" + "s" * 30
KEYS = derive_keys(SECRET_KEY)
WAIT = 90.0
PASSWORD_HASH = hash_password("a long enough password")


async def until(check: Callable[[], Any], timeout: float = WAIT) -> Any:  # noqa: ASYNC109
    """`check()`'s first truthy answer (awaited when a coroutine), polled until `timeout`."""
    async with asyncio.timeout(timeout):
        while True:
            answer = check()
            if asyncio.iscoroutine(answer):
                answer = await answer
            if answer:
                return answer
            await asyncio.sleep(0.05)


def token(role: str = "viewer", *, lifetime: int = 600, now: float | None = None) -> str:
    return new_access_token(KEYS.signing_key, "admin", role, lifetime=lifetime, now=now).token


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with open_broker(f"memory://websocket-{uuid.uuid4().hex}") as opened:
        yield opened


class System:
    """A worker (with the outbox relay feeding it) and the websocket service, until
    `stop()`; `url(execution_id, after)` is where a follower connects."""

    def __init__(
        self, db: Database, broker: Broker, *, worker: bool = True, **overrides: Any
    ) -> None:
        self.with_worker = worker
        self.db = db
        self.broker = broker
        self.ws_settings = WebsocketSettings(secret_key=SECRET_KEY, websocket_port=0, **overrides)  # type: ignore[arg-type]
        self.runtime = Runtime(settings=self.ws_settings, database=db, broker=broker, keys=KEYS)
        worker_settings = WorkerSettings(secret_key=SECRET_KEY, worker_slots=4, lease_seconds=6)  # type: ignore[arg-type]
        self.worker = Worker(
            Runtime(settings=worker_settings, database=db, broker=broker, keys=KEYS),
            worker_settings,
        )
        self.live = LiveLogs(self.runtime, self.ws_settings)
        self.relay = OutboxRelay(db, broker.publishers())
        self.stop_worker = asyncio.Event()
        self.stop_live = asyncio.Event()

    async def __aenter__(self) -> System:
        async with self.db.transaction() as conn:
            await users.create_user(conn, "admin", PASSWORD_HASH, "viewer", by=None)
        await self.relay.start()
        self.worker_task = asyncio.create_task(
            self.worker.run(self.stop_worker) if self.with_worker else self.stop_worker.wait()
        )
        self.live_task = asyncio.create_task(self.live.serve(self.stop_live))
        if self.with_worker:
            await asyncio.wait_for(self.worker.ready.wait(), WAIT)
        await asyncio.wait_for(self.live.started.wait(), WAIT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop_worker.set()
        self.stop_live.set()
        await asyncio.wait_for(self.worker_task, WAIT)
        await asyncio.wait_for(self.live_task, WAIT)
        await self.relay.aclose()

    @property
    def base(self) -> str:
        return f"ws://127.0.0.1:{self.live.port}"

    def url(self, execution_id: str, after: int | None = None) -> str:
        query = "" if after is None else f"?after={after}"
        return f"{self.base}/ws/executions/{execution_id}{query}"

    async def apply(self, source: str) -> None:
        async with self.db.transaction() as conn:
            await graphs.apply_graph(conn, source)

    async def trigger(self, graph: str) -> str:
        async with self.db.transaction() as conn:
            stored = await graphs.get_graph(conn, graph)
            record, _ = await executions.create_execution(
                conn,
                graph=graph,
                graph_version=stored.version,
                params={},
                trigger_type="manual",
                trigger_info={},
            )
        self.db.notify_committed()
        return record.id


@dataclass
class Received:
    """What one follower was sent, and how its connection ended."""

    seqs: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    execution: list[dict[str, Any]] = field(default_factory=list)
    code: int | None = None
    reason: str = ""

    def take(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "logs":
            for line in frame["lines"]:
                self.seqs.append(line["seq"])
                self.texts.append(line["text"])
        elif frame["type"] == "node":
            self.nodes.append(frame)
        else:
            self.execution.append(frame)


async def follow(
    url: str, *, bearer: str | None = None, received: Received | None = None, **kw: Any
) -> Received:
    """Read every frame until the server closes the connection."""
    received = received or Received()
    headers = {} if bearer is None else {"Authorization": f"Bearer {bearer}"}
    async with connect(
        url, additional_headers=headers, compression=None, max_size=None, **kw
    ) as ws:
        await _read(ws, received)
    return received


async def _read(ws: ClientConnection, received: Received) -> None:
    try:
        async for message in ws:
            received.take(orjson.loads(message))
    except ConnectionClosed:
        pass
    assert ws.close_code is not None
    received.code = ws.close_code
    received.reason = ws.close_reason or ""


def printing(name: str, lines: int, *, width: int = 0, pause_every: int = 0) -> str:
    """A graph whose one node prints `lines` numbered lines (padded to `width`)."""
    pad = "x" * width
    pause = f"; [ $((i % {pause_every})) -eq 0 ] && sleep 0.2" if pause_every else ""
    return f"""
name: {name}
nodes:
  talk:
    run: 'for i in $(seq 1 {lines}); do echo "line $i {pad}"{pause}; done; true'
"""
