"""Worker processes (`python -m loom_worker`) on a real PostgreSQL and RabbitMQ: two of
them share the work exactly once; one SIGKILLed in the middle of a chain is replaced by
the other (through the lease and the reaper); one stopped with SIGTERM hands its
execution back within its grace period. The test process plays the other services: it
creates the executions, runs the outbox relay and, where a test needs it, the reaper's
pass (as the timer service does)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loom_db import Database, create_database, executions, graphs, logs, node_runs
from loom_db.migrate import upgrade
from loom_db.relay import OutboxRelay
from loom_db.testing import fresh_postgres_database, require_services
from loom_messaging import open_broker

from .conftest import until

SECRET_KEY = "worker-process-secret-key-" + "p" * 30
LEASE = 3

pytestmark = pytest.mark.slow


def queue_url(backend: str) -> str:
    variable = {"rabbitmq": "LOOM_TEST_AMQP_URL", "kafka": "LOOM_TEST_KAFKA_URL"}[backend]
    url = os.environ.get(variable)
    if not url:
        if require_services():
            pytest.fail(f"{variable} is not set and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip(f"{variable} is not set: worker process tests on {backend} skipped")
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class System:
    database: Database
    url: str
    queue_url: str
    prefix: str
    tmp: Path
    workers: list[subprocess.Popen[bytes]]
    ports: dict[str, int] = field(default_factory=dict)

    def start_worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
        environment |= {
            "LOOM_DATABASE_URL": self.url,
            "LOOM_QUEUE_URL": self.queue_url,
            "LOOM_EVENTS_URL": "memory://",
            "LOOM_BROKER_PREFIX": self.prefix,
            "LOOM_SECRET_KEY": SECRET_KEY,
            "LOOM_WORKER_PORT": str(self.ports.setdefault(name, free_port())),
            "LOOM_WORKER_ID": name,
            "LOOM_WORKER_SLOTS": "4",
            "LOOM_LEASE_SECONDS": str(LEASE),
            "LOOM_SHUTDOWN_GRACE": "2",
            **env,
        }
        with (self.tmp / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "loom_worker"],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.workers.append(proc)
        return proc

    async def apply(self, source: str) -> None:
        async with self.database.transaction() as conn:
            await graphs.apply_graph(conn, source)

    async def trigger(self, graph: str) -> str:
        async with self.database.transaction() as conn:
            stored = await graphs.get_graph(conn, graph)
            record, _ = await executions.create_execution(
                conn,
                graph=graph,
                graph_version=stored.version,
                params={},
                trigger_type="manual",
                trigger_info={},
            )
        self.database.notify_committed()
        return record.id

    async def record(self, execution_id: str) -> executions.ExecutionRecord:
        async with self.database.read() as conn:
            return await executions.get_execution(conn, execution_id)


@contextmanager
def _database_url() -> Iterator[str]:
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def system(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[System]:
    """The database and the queue (RabbitMQ, or what the test names: `indirect`)."""
    queue = queue_url(getattr(request, "param", "rabbitmq"))
    prefix = f"loomtest-{uuid.uuid4().hex[:10]}"
    with _database_url() as url:
        database = create_database(url)
        await upgrade(database)
        found = System(database, url, queue, prefix, tmp_path, [])
        async with AsyncExitStack() as stack:
            broker = await stack.enter_async_context(open_broker(queue, prefix=prefix))
            await stack.enter_async_context(OutboxRelay(database, broker.publishers()))
            try:
                yield found
            finally:
                for proc in found.workers:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        await database.dispose()


async def reaper(system: System, stop: asyncio.Event) -> None:
    """The timer service's reaper pass, every second."""
    while not stop.is_set():
        async with system.database.transaction() as conn:
            await executions.reap(conn, queued_after_seconds=60)
        system.database.notify_committed()
        await asyncio.sleep(1)


@pytest.mark.parametrize("system", ["rabbitmq", "kafka"], indirect=True)
async def test_two_workers_run_fifty_executions_each_exactly_once(system: System) -> None:
    counters = system.tmp / "counters"
    counters.mkdir()
    nodes = "\n".join(
        f"  n{i}:\n"
        + (f"    needs: [n{i - 1}]\n" if i else "")
        + f'    run: echo "$LOOM_EXECUTION_ID" >> {counters}/n{i}'
        for i in range(5)
    )
    await system.apply(f"name: five\nnodes:\n{nodes}\n")
    system.start_worker("w1")
    system.start_worker("w2")

    ids = [await system.trigger("five") for _ in range(50)]

    async def all_done() -> bool:
        records = [await system.record(i) for i in ids]
        return all(r.finished for r in records)

    await until(all_done)
    records = [await system.record(i) for i in ids]
    assert {r.status for r in records} == {"succeeded"}
    metrics = "".join(_get(system.ports[name], "/metrics") for name in ("w1", "w2"))
    assert "loom_worker_executions_total" in metrics
    assert _get(system.ports["w1"], "/readyz").startswith('{"status":"ok"')
    for i in range(5):
        lines = (counters / f"n{i}").read_text().split()
        assert sorted(lines) == sorted(ids), f"node n{i} did not run once per execution"
    async with system.database.read() as conn:
        for execution_id in ids[:5]:
            runs = await node_runs.all_node_runs(conn, execution_id)
            assert [(r.node, r.attempt) for r in runs] == [(f"n{i}", 1) for i in range(5)]


async def test_a_worker_killed_mid_chain_is_replaced_and_nothing_runs_twice(
    system: System,
) -> None:
    trail = system.tmp / "trail"
    nodes = "\n".join(
        f"  s{i}:\n"
        + (f"    needs: [s{i - 1}]\n" if i else "")
        + f"    run: |\n      echo s{i} >> {trail}\n      echo line of s{i}\n      sleep 0.4"
        for i in range(10)
    )
    await system.apply(f"name: chain\nnodes:\n{nodes}\n")
    first = system.start_worker("first")
    execution_id = await system.trigger("chain")
    await until(lambda: trail.exists() and len(trail.read_text().split()) >= 4)

    os.killpg(first.pid, signal.SIGKILL)  # the worker and its node's processes
    first.wait()
    done_before = trail.read_text().split()
    # What the database says had succeeded when the worker died (a node whose success was
    # not stored yet may run again: at least once, DESIGN §8).
    async with system.database.read() as conn:
        stored_before = {
            r.node
            for r in await node_runs.all_node_runs(conn, execution_id)
            if r.status == "succeeded"
        }
    system.start_worker("second")
    stop = asyncio.Event()
    reaping = asyncio.create_task(reaper(system, stop))
    try:
        record = await until(
            lambda: _finished(system, execution_id),
        )
    finally:
        stop.set()
        await reaping

    assert record.status == "succeeded"
    assert record.worker_id is None
    ran = trail.read_text().split()
    # Every node succeeded before the kill ran once; the one running at the kill may have
    # run twice (at least once, DESIGN §8); every node ran.
    assert set(ran) == {f"s{i}" for i in range(10)}
    succeeded_before = {n for n in done_before if ran.count(n) >= 1}
    async with system.database.read() as conn:
        lines = await logs.read_logs(conn, execution_id, limit=1000)
        runs = await node_runs.all_node_runs(conn, execution_id)
    seqs = [line.seq for line in lines]
    assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate
    for node in stored_before:
        assert ran.count(node) == 1, f"{node} succeeded before the kill but ran again"
        assert [r.attempt for r in runs if r.node == node] == [1]
    assert stored_before and succeeded_before  # the kill really came in the middle
    assert ran.count("s9") == 1


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        body: bytes = answer.read()
        return body.decode()


async def _finished(system: System, execution_id: str) -> executions.ExecutionRecord | None:
    record = await system.record(execution_id)
    return record if record.finished else None


async def test_sigterm_hands_a_long_node_back_and_another_worker_finishes_it(
    system: System,
) -> None:
    marker = system.tmp / "went"
    await system.apply(
        "name: long\nnodes:\n"
        f"  slow:\n    run: |\n      if [ -e {marker} ]; then echo second; exit 0; fi\n"
        f"      touch {marker}; sleep 600\n"
    )
    first = system.start_worker("first")
    execution_id = await system.trigger("long")
    await until(marker.exists)

    began = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert time.monotonic() - began < 15  # the grace (2 s) plus stopping the node
    record = await system.record(execution_id)
    assert record.status == "running" and record.worker_id is None  # handed back

    system.start_worker("second")
    record = await until(lambda: _finished(system, execution_id))
    assert record.status == "succeeded"
    async with system.database.read() as conn:
        texts = [line.text for line in await logs.read_logs(conn, execution_id)]
    assert "second" in texts


async def test_an_execution_longer_than_the_consumer_timeout_is_not_redelivered(
    tmp_path: Path,
) -> None:
    """RabbitMQ closes the channel of a consumer that holds a message unacked longer than
    `consumer_timeout` and delivers the message again; the worker acks at claim, so an
    execution three times longer than the timeout runs once."""
    from loom_messaging.testing import RabbitNode, rabbitmq_installed

    if not rabbitmq_installed():
        if require_services():
            pytest.fail("rabbitmq-server is not installed and LOOM_TEST_REQUIRE_SERVICES=1")
        pytest.skip("rabbitmq-server is not installed")
    node = RabbitNode(consumer_timeout_ms=2000)
    node.start()
    try:
        with _database_url() as url:
            database = create_database(url)
            await upgrade(database)
            prefix = f"loomtest-{uuid.uuid4().hex[:10]}"
            system = System(database, url, node.url, prefix, tmp_path, [])
            trail = tmp_path / "trail"
            await system.apply(
                f"name: slow\nnodes:\n  nap: {{run: 'echo ran >> {trail}; sleep 6'}}\n"
            )
            async with open_broker(node.url, prefix=prefix) as broker:
                async with OutboxRelay(database, broker.publishers()):
                    system.start_worker("only")
                    execution_id = await system.trigger("slow")
                    record = await until(lambda: _finished(system, execution_id))
                    await asyncio.sleep(3)  # room for a redelivery to show itself
                    letters = await broker.queue.dead_letters()
            for proc in system.workers:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            await database.dispose()
        assert record.status == "succeeded"
        assert trail.read_text().split() == ["ran"]
        assert letters == []
    finally:
        node.remove()


def test_without_a_secret_key_the_worker_exits_2_saying_so(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    environment["LOOM_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/loom.db"

    done = subprocess.run(
        [sys.executable, "-m", "loom_worker"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert "LOOM_SECRET_KEY" in done.stderr
