"""`python -m loom_timer` as it runs in an image: three replicas on one PostgreSQL fire
every second of an `every: 1s` trigger exactly once, and stop on SIGTERM with exit 0; a
missing `LOOM_SECRET_KEY` stops it at start with exit 2 and one clear line."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from loom_db import Database, create_database, executions, graphs
from loom_db.migrate import upgrade
from loom_db.models import executions as execution_rows
from loom_db.testing import fresh_postgres_database

SECRET_KEY = "timer-serve-test-key-" + "s" * 32
GRAPH = """\
name: beat
triggers:
  - {id: clock, every: 1s, misfire_grace: 5s}
nodes:
  a: {run: echo}
"""
WINDOW = 20  # seconds every replica is up and firing
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timer_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOOM_")}
    env.update(values)
    return env


@contextmanager
def timer_process(directory: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m loom_timer`, its output in `directory/timer.log`; killed if still
    running at the end."""
    directory.mkdir()
    with (directory / "timer.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loom_timer"],
            cwd=directory,  # no loom.toml but its own
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert process.poll() is None, f"the timer exited: {log.read_text()}"
        try:
            if get(port, "/readyz")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"not ready: {log.read_text()}"
        time.sleep(0.1)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within:g}s: {what}"
        await asyncio.sleep(0.2)


async def timer_rows(db: Database) -> list[tuple[str, str | None]]:
    """(fire_time, idempotency key) of every timer execution, in time order."""
    async with db.read() as conn:
        rows = await conn.execute(
            select(execution_rows.c.trigger_info, execution_rows.c.idempotency_key).where(
                execution_rows.c.trigger_type == "timer"
            )
        )
        return sorted((info["fire_time"], key) for info, key in rows)


def fired_total(port: int) -> float:
    _, text = get(port, "/metrics")
    for family in text_string_to_metric_families(text):
        if family.name == "loom_timer_ticks_fired":
            return sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    raise AssertionError("no loom_timer_ticks_fired_total in /metrics")


async def test_three_timer_processes_fire_each_second_once_and_stop_on_sigterm(
    tmp_path: Path,
) -> None:
    with fresh_postgres_database() as url, ExitStack() as stack:
        await upgrade(url)
        db = create_database(url)
        try:
            async with db.transaction() as conn:
                await graphs.apply_graph(conn, GRAPH)
            ports = [free_port() for _ in range(3)]
            prefix = f"test-{uuid.uuid4().hex[:8]}"
            processes = [
                stack.enter_context(
                    timer_process(
                        tmp_path / f"timer{index}",
                        timer_env(
                            LOOM_DATABASE_URL=url,
                            LOOM_SECRET_KEY=SECRET_KEY,
                            LOOM_QUEUE_URL="memory://",
                            LOOM_EVENTS_URL="memory://",
                            LOOM_BROKER_PREFIX=prefix,
                            LOOM_TIMER_PORT=str(port),
                            LOOM_TIMER_RESYNC_SECONDS="2",
                            LOOM_DATABASE_POOL_SIZE="2",
                        ),
                    )
                )
                for index, port in enumerate(ports)
            ]
            for index, (port, process) in enumerate(zip(ports, processes, strict=True)):
                log = tmp_path / f"timer{index}" / "timer.log"
                await asyncio.to_thread(wait_ready, port, process, log)
            all_up = datetime.now(UTC).isoformat().replace("+00:00", "Z")

            async def window_fired() -> bool:
                return len([t for t, _ in await timer_rows(db) if t > all_up]) >= WINDOW

            await eventually(window_fired, f"{WINDOW} s of ticks", WINDOW + 40)
            # Pausing the graph stops the firing for good (a tick commits before the pause
            # or sees it), so every replica's count settles.
            async with db.transaction() as conn:
                await graphs.set_enabled(conn, "beat", False)
            rows = await timer_rows(db)

            async def counted() -> bool:
                return sum([await asyncio.to_thread(fired_total, p) for p in ports]) >= len(rows)

            await eventually(counted, "the replicas' counters settled", 30)
            created = sum([await asyncio.to_thread(fired_total, p) for p in ports])

            for process in processes:
                process.send_signal(signal.SIGTERM)
            codes = [await asyncio.to_thread(process.wait, 30) for process in processes]
        finally:
            await db.dispose()

    assert codes == [0, 0, 0]
    times = [fire_time for fire_time, _ in rows]
    assert len(times) == len(set(times)) >= WINDOW  # no second twice
    instants = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in times]
    assert all(b - a == timedelta(seconds=1) for a, b in zip(instants, instants[1:], strict=False))
    assert [key for _, key in rows] == [executions.timer_key("beat", "clock", t) for t in times]
    assert created == len(rows)  # the replicas created each once between them


def test_without_a_secret_key_the_timer_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    env = timer_env(LOOM_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'loom.db'}")
    done = subprocess.run(
        [sys.executable, "-m", "loom_timer"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "loom-timer" in lines[0] and "LOOM_SECRET_KEY" in lines[0]
