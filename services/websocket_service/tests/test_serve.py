"""`python -m loom_websocket` as its image runs it: it answers health checks and follows an
execution, closes its followers with 1001 on SIGTERM and exits 0, and exits 2 saying why
without a secret key."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
from websockets.asyncio.client import connect

from loom_auth import hash_password
from loom_db import create_database, executions, graphs, node_runs, users
from loom_db.migrate import upgrade
from loom_messaging.testing import free_port

from .conftest import SECRET_KEY, WAIT, token, until


async def _prepared(url: str) -> str:
    """A migrated SQLite database with user admin and a queued execution (no worker)."""
    database = create_database(url)
    try:
        await upgrade(database)
        async with database.transaction() as conn:
            await users.create_user(
                conn, "admin", hash_password("long enough pass"), "viewer", by=None
            )
            record, _ = await graphs.apply_graph(conn, "name: idle\nnodes:\n  a: {run: 'true'}\n")
            execution, _ = await executions.create_execution(
                conn,
                graph="idle",
                graph_version=record.version,
                params={},
                trigger_type="manual",
                trigger_info={},
            )
            await node_runs.record_node(
                conn,
                execution.id,
                node="a",
                name="a",
                index=None,
                attempt=1,
                status="running",
                started_at=datetime.now(UTC),
            )
        return execution.id
    finally:
        await database.dispose()


def _environment(url: str, port: int, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env |= {
        "LOOM_DATABASE_URL": url,
        "LOOM_SECRET_KEY": SECRET_KEY,
        "LOOM_WEBSOCKET_PORT": str(port),
        "LOOM_QUEUE_URL": "memory://",
        "LOOM_EVENTS_URL": "memory://",
        **more,
    }
    return env


async def test_the_process_follows_and_on_sigterm_closes_with_1001_and_exits_0(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'loom.db'}"
    execution_id = await _prepared(url)
    port = free_port()
    with (tmp_path / "websocket.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 (starting it is all this test waits for)
            [sys.executable, "-m", "loom_websocket"],
            env=_environment(url, port),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await until(ready)
        headers = {"Authorization": f"Bearer {token()}"}
        async with connect(
            f"ws://127.0.0.1:{port}/ws/executions/{execution_id}", additional_headers=headers
        ) as ws:
            state = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
            assert state == {**state, "type": "node", "node": "a", "status": "running"}
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(ws.wait_closed(), WAIT)
        assert ws.close_code == 1001
        assert await asyncio.to_thread(proc.wait, WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_a_secret_key_it_exits_2_saying_so(tmp_path: Path) -> None:
    env = _environment(f"sqlite+aiosqlite:///{tmp_path / 'loom.db'}", free_port())
    del env["LOOM_SECRET_KEY"]
    done = subprocess.run(
        [sys.executable, "-m", "loom_websocket"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "LOOM_SECRET_KEY" in done.stderr
