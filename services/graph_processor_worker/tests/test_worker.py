"""The worker service in-process over a real database (SQLite and PostgreSQL) and the
memory brokers: claim, admission, store-then-publish, cancel, retry from failure, resume.
The cross-process faults (SIGKILL, SIGTERM, two workers) are in test_worker_processes.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from loom_db import Database, executions, graphs, logs, node_runs
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
from loom_worker.service import Worker
from loom_worker.settings import WorkerSettings

from .conftest import WAIT, until

SECRET_KEY = "worker-test-secret-key-" + "k" * 30


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with open_broker(f"memory://worker-{uuid.uuid4().hex}") as opened:
        yield opened


def settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {"secret_key": SECRET_KEY, "worker_slots": 4, "lease_seconds": 6}
    values.update(overrides)
    return WorkerSettings(**values)


class Running:
    """A worker, with the outbox relay that feeds its queue, until `stop()`."""

    def __init__(self, db: Database, broker: Broker, **overrides: Any) -> None:
        self.settings = settings(**overrides)
        self.runtime = Runtime(
            settings=self.settings, database=db, broker=broker, keys=derive_keys(SECRET_KEY)
        )
        self.worker = Worker(self.runtime, self.settings)
        self.stop_event = asyncio.Event()
        self.relay = OutboxRelay(db, broker.publishers())

    async def __aenter__(self) -> Running:
        await self.relay.start()
        self.task = asyncio.create_task(self.worker.run(self.stop_event))
        await asyncio.wait_for(self.worker.ready.wait(), WAIT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, WAIT)
        await self.relay.aclose()


async def apply(db: Database, source: str) -> int:
    async with db.transaction() as conn:
        record, _ = await graphs.apply_graph(conn, source)
    return record.version


async def trigger(db: Database, graph: str, params: dict[str, Any] | None = None, **kw: Any) -> str:
    async with db.transaction() as conn:
        stored = await graphs.get_graph(conn, graph)
        record, _ = await executions.create_execution(
            conn,
            graph=graph,
            graph_version=stored.version,
            params=params or {},
            trigger_type=kw.pop("trigger_type", "manual"),
            trigger_info={},
            **kw,
        )
    db.notify_committed()
    return record.id


async def finished(db: Database, execution_id: str) -> executions.ExecutionRecord:
    async def ended() -> executions.ExecutionRecord | None:
        async with db.read() as conn:
            record = await executions.get_execution(conn, execution_id)
        return record if record.finished else None

    result: executions.ExecutionRecord = await until(ended)
    return result


HELLO = """
name: hello
params: {who: {type: string, default: world}}
nodes:
  greet:
    run: |
      echo "hello ${{ params.who }}"
      echo "answer=42" >> "$LOOM_OUTPUT"
  shout:
    needs: [greet]
    run: echo "the answer is ${{ nodes.greet.outputs.answer }}"
"""


async def test_an_execution_runs_to_success_and_its_rows_and_events_say_so(
    db: Database, broker: Broker
) -> None:
    await apply(db, HELLO)
    async with broker.events.subscribe() as events, Running(db, broker):
        execution_id = await trigger(db, "hello", {"who": "loom"})
        record = await finished(db, execution_id)
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(WAIT):
            async for envelope in events:
                seen.append({"type": envelope.type, **envelope.data})
                if envelope.type == "execution.status" and envelope.data["status"] == "succeeded":
                    break

    assert record.status == "succeeded"
    async with db.read() as conn:
        runs = await node_runs.latest_node_runs(conn, execution_id)
        lines = await logs.read_logs(conn, execution_id)
    assert [(r.node, r.status) for r in runs] == [("greet", "succeeded"), ("shout", "succeeded")]
    assert runs[0].outputs == {"answer": "42"}
    texts = [line.text for line in lines]
    assert "hello loom" in texts and "the answer is 42" in texts
    assert [line.seq for line in lines] == list(range(1, len(lines) + 1))
    statuses = [(e["node"], e["status"]) for e in seen if e["type"] == "node.status"]
    assert ("greet", "running") in statuses and ("shout", "succeeded") in statuses
    published = [line["seq"] for e in seen if e["type"] == "log.batch" for line in e["lines"]]
    assert published == [line.seq for line in lines]


async def test_a_poisonous_message_is_dead_lettered_with_the_reason(
    db: Database, broker: Broker
) -> None:
    from loom_common import encode_envelope

    async with Running(db, broker):
        await broker.queue.publish(encode_envelope("graph.changed", {"graph": "x"}), "x")
        letters = await until(broker.queue.dead_letters)

    assert "execution.requested" in letters[0].reason


async def test_cancel_kills_the_whole_process_tree(
    db: Database, broker: Broker, tmp_path: Path
) -> None:
    marker = f"loom-cancel-{uuid.uuid4().hex}"
    await apply(
        db,
        f"""
name: sleepy
nodes:
  wait:
    run: |
      bash -c 'exec -a {marker} sleep 600' &
      echo started
      wait
  after:
    needs: [wait]
    if: ${{{{ always() }}}}
    run: echo never
""",
    )
    async with Running(db, broker):
        execution_id = await trigger(db, "sleepy")
        await until(lambda: _processes(marker))
        async with db.transaction() as conn:
            await executions.request_cancel(conn, execution_id, "test")
        db.notify_committed()
        record = await finished(db, execution_id)
        await until(lambda: not _processes(marker))

    assert record.status == "cancelled"
    async with db.read() as conn:
        runs = {r.node: r.status for r in await node_runs.latest_node_runs(conn, execution_id)}
    assert runs["wait"] == "cancelled"


def _processes(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return [pid for pid in found.stdout.split() if int(pid) != os.getpid()]


@pytest.mark.parametrize("on_overlap", ["queue", "skip", "cancel_running"])
async def test_concurrency_one_under_ten_simultaneous_triggers(
    db: Database, broker: Broker, on_overlap: str
) -> None:
    await apply(
        db,
        f"""
name: single
concurrency: 1
on_overlap: {on_overlap}
nodes:
  work: {{run: "sleep 0.2"}}
""",
    )
    async with Running(db, broker):
        ids = await asyncio.gather(*(trigger(db, "single") for _ in range(10)))
        records = [await finished(db, i) for i in ids]

    statuses = sorted(r.status for r in records)
    if on_overlap == "queue":
        assert statuses == ["succeeded"] * 10
        spans = sorted(
            (r.started_at.timestamp(), r.finished_at.timestamp())
            for r in records
            if r.started_at and r.finished_at
        )
        assert len(spans) == 10
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # one at a time
    elif on_overlap == "skip":
        assert "succeeded" in statuses and set(statuses) <= {"succeeded", "skipped"}
        assert statuses.count("skipped") >= 1
    else:
        assert statuses.count("succeeded") >= 1
        assert set(statuses) <= {"succeeded", "cancelled"}


async def test_retry_from_failure_reuses_the_succeeded_nodes(
    db: Database, broker: Broker, tmp_path: Path
) -> None:
    counter = tmp_path / "counter"
    flag = tmp_path / "fail"
    flag.write_text("1")
    await apply(
        db,
        f"""
name: flaky
nodes:
  first:
    run: |
      echo ran >> {counter}
      echo "value=7" >> "$LOOM_OUTPUT"
  second:
    needs: [first]
    run: |
      test ! -e {flag}
      echo "got ${{{{ nodes.first.outputs.value }}}}"
""",
    )
    async with Running(db, broker):
        origin = await finished(db, await trigger(db, "flaky"))
        flag.unlink()
        retry_id = await trigger(db, "flaky", trigger_type="retry", origin_id=origin.id)
        retry = await finished(db, retry_id)
        async with db.read() as conn:
            lines = [line.text for line in await logs.read_logs(conn, retry_id)]

    assert (origin.status, retry.status) == ("failed", "succeeded")
    assert counter.read_text().splitlines() == ["ran"]  # `first` did not run again
    assert "got 7" in lines


async def test_a_resumed_execution_keeps_succeeded_nodes_and_continues_the_seq(
    db: Database, broker: Broker, tmp_path: Path
) -> None:
    """What a crash leaves behind -- `first` succeeded, `second` was running, lines 1..3
    stored, the lease expired -- is resumed: `first` is not re-run, `second` runs as
    attempt 2, the seq continues at 4."""
    from datetime import UTC, datetime, timedelta

    from loom_db.logs import LogLineIn
    from loom_db.node_runs import NodeChange

    counter = tmp_path / "counter"
    await apply(
        db,
        f"""
name: resumable
nodes:
  first: {{run: "echo first >> {counter}"}}
  second:
    needs: [first]
    run: echo second | tee -a {counter}
""",
    )
    execution_id = await trigger(db, "resumable")
    now = datetime.now(UTC)
    async with db.transaction() as conn:
        assert await executions.claim(conn, execution_id, "dead-worker", 1) is not None
        await executions.admit(
            conn, execution_id, "dead-worker", 1, concurrency=None, on_overlap="queue"
        )
        await node_runs.record_nodes(
            conn,
            execution_id,
            [
                NodeChange("first", "first", None, 1, "succeeded", now, now),
                NodeChange("second", "second", None, 1, "running", now),
            ],
        )
        await logs.append_logs(
            conn, execution_id, [LogLineIn(i, "first", "stdout", now, f"l{i}") for i in (1, 2, 3)]
        )
        # The dead worker's lease expired and the reaper requested it again.
        await executions.reap(conn, now=now + timedelta(seconds=5), queued_after_seconds=0)
    db.notify_committed()
    async with Running(db, broker):
        record = await finished(db, execution_id)

    assert record.status == "succeeded"
    assert counter.read_text().splitlines() == ["second"]
    async with db.read() as conn:
        attempts = [
            (r.node, r.attempt, r.status) for r in await node_runs.all_node_runs(conn, execution_id)
        ]
        seqs = [line.seq for line in await logs.read_logs(conn, execution_id)]
    assert ("second", 2, "succeeded") in attempts
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 3


async def test_sigterm_path_hands_a_long_execution_back_to_the_queue(
    db: Database, broker: Broker
) -> None:
    await apply(db, "name: long\nnodes:\n  nap: {run: 'sleep 600'}\n")
    worker = Running(db, broker, shutdown_grace=0.5)
    async with worker:
        execution_id = await trigger(db, "long")
        await until(lambda: execution_id in worker.worker.runs)
        await asyncio.sleep(0.3)

    async with db.read() as conn:
        record = await executions.get_execution(conn, execution_id)
    assert record.status == "running" and record.worker_id is None

    # Handed back through the outbox: the next worker takes it over.
    async with Running(db, broker, shutdown_grace=0.5) as second:
        await until(lambda: execution_id in second.worker.runs)
        async with db.read() as conn:
            record = await executions.get_execution(conn, execution_id)
        assert record.worker_id == second.worker.worker_id
        async with db.transaction() as conn:
            await executions.request_cancel(conn, execution_id, "test")
        db.notify_committed()
        assert (await finished(db, execution_id)).status == "cancelled"


@pytest.mark.slow
async def test_postgres_stopped_for_ten_seconds_neither_crashes_the_worker_nor_runs_twice(
    tmp_path: Path,
) -> None:
    from loom_db import create_database
    from loom_db.migrate import upgrade
    from loom_db.testing import private_postgres

    trail = tmp_path / "trail"
    with private_postgres() as server:
        database = create_database(server.url)
        try:
            await upgrade(database)
            await apply(
                database,
                "name: steady\nnodes:\n"
                + "\n".join(
                    f"  s{i}:\n"
                    + (f"    needs: [s{i - 1}]\n" if i else "")
                    + f"    run: |\n      echo s{i} | tee -a {trail}\n      sleep 1"
                    for i in range(6)
                )
                + "\n",
            )
            async with open_broker(f"memory://worker-{uuid.uuid4().hex}") as broker:
                async with Running(database, broker, lease_seconds=30) as running:
                    execution_id = await trigger(database, "steady")
                    await until(lambda: trail.exists())
                    server.stop()
                    await asyncio.sleep(10)
                    server.start()
                    record = await finished(database, execution_id)
                    assert not running.task.done()  # the worker lived through it

            assert record.status == "succeeded"
            assert trail.read_text().split() == [f"s{i}" for i in range(6)]
            async with database.read() as conn:
                seqs = [line.seq for line in await logs.read_logs(conn, execution_id)]
            assert seqs == list(range(1, 7))
        finally:
            await database.dispose()


CHILD = """
name: child
params: {n: {type: integer}}
nodes:
  work:
    run: |
      echo "child got ${{ params.n }}"
      test "${{ params.n }}" != 13
"""


async def test_a_graph_node_runs_its_child_on_a_single_slot_worker(
    db: Database, broker: Broker
) -> None:
    await apply(db, CHILD)
    await apply(
        db,
        """
name: parent
nodes:
  call:
    graph: child
    with: {n: 7}
  after:
    needs: [call]
    run: echo "child ${{ nodes.call.outputs.execution_id }} ${{ nodes.call.outputs.status }}"
""",
    )
    async with Running(db, broker, worker_slots=1):
        parent = await finished(db, await trigger(db, "parent"))
        async with db.read() as conn:
            runs = {r.node: r for r in await node_runs.latest_node_runs(conn, parent.id)}
            child_id = runs["call"].outputs["execution_id"]
            child = await executions.get_execution(conn, child_id)
            child_lines = [line.text for line in await logs.read_logs(conn, child_id)]

    assert parent.status == "succeeded"
    assert runs["call"].outputs == {"execution_id": child_id, "status": "succeeded"}
    assert (child.status, child.trigger_type, child.params) == ("succeeded", "graph", {"n": 7})
    assert child.trigger_info == {"parent_execution_id": parent.id, "node": "call"}
    assert "child got 7" in child_lines


async def test_a_graph_node_fails_with_its_child_and_says_why(db: Database, broker: Broker) -> None:
    await apply(db, CHILD)
    await apply(
        db,
        "name: parent\nnodes:\n  bad: {graph: child, with: {n: 13}}\n"
        "  missing: {graph: nope}\n  typed: {graph: child, with: {n: seven}}\n",
    )
    async with Running(db, broker):
        parent = await finished(db, await trigger(db, "parent"))
        async with db.read() as conn:
            runs = {r.node: r for r in await node_runs.latest_node_runs(conn, parent.id)}

    assert parent.status == "failed"
    assert runs["bad"].status == "failed" and runs["bad"].outputs["status"] == "failed"
    assert "no graph named 'nope'" in (runs["missing"].error or "")
    assert "expected integer" in (runs["typed"].error or "")


async def test_cancelling_the_parent_cancels_the_child(db: Database, broker: Broker) -> None:
    await apply(db, "name: slow-child\nnodes:\n  nap: {run: 'sleep 600'}\n")
    await apply(db, "name: parent\nnodes:\n  call: {graph: slow-child}\n")
    async with Running(db, broker):
        parent_id = await trigger(db, "parent")

        async def child_running() -> str | None:
            async with db.read() as conn:
                found, _ = await executions.list_executions(conn, graph="slow-child")
            return found[0].id if found and found[0].status == "running" else None

        child_id = await until(child_running)
        async with db.transaction() as conn:
            await executions.request_cancel(conn, parent_id, "test")
        db.notify_committed()
        parent = await finished(db, parent_id)
        child = await finished(db, child_id)

    assert (parent.status, child.status) == ("cancelled", "cancelled")


async def test_a_resumed_graph_node_re_attaches_to_its_running_child(
    db: Database, broker: Broker
) -> None:
    """The worker running `call` died while its child ran: the resumed node (attempt 2)
    waits for that child instead of starting a second one."""
    from datetime import UTC, datetime, timedelta

    from loom_db.node_runs import NodeChange
    from loom_worker.children import child_key

    await apply(db, CHILD)
    await apply(db, "name: parent\nnodes:\n  call: {graph: child, with: {n: 5}}\n")
    parent_id = await trigger(db, "parent")
    now = datetime.now(UTC)
    async with db.transaction() as conn:
        await executions.claim(conn, parent_id, "dead-worker", 1)
        await executions.admit(
            conn, parent_id, "dead-worker", 1, concurrency=None, on_overlap="queue"
        )
        await node_runs.record_nodes(
            conn, parent_id, [NodeChange("call", "call", None, 1, "running", now)]
        )
        stored = await graphs.get_graph(conn, "child")
        child, _ = await executions.create_execution(
            conn,
            graph="child",
            graph_version=stored.version,
            params={"n": 5},
            trigger_type="graph",
            trigger_info={"parent_execution_id": parent_id, "node": "call"},
            idempotency_key=child_key(parent_id, "call", 1),
        )
        await executions.reap(conn, now=now + timedelta(seconds=5), queued_after_seconds=0)
    db.notify_committed()
    async with Running(db, broker):
        parent = await finished(db, parent_id)
        async with db.read() as conn:
            children, _ = await executions.list_executions(conn, graph="child")
            runs = {r.node: r for r in await node_runs.latest_node_runs(conn, parent_id)}

    assert parent.status == "succeeded"
    assert [c.id for c in children] == [child.id]  # no second child
    assert runs["call"].attempt == 2 and runs["call"].outputs["execution_id"] == child.id


async def test_a_stored_graph_that_no_longer_validates_fails_its_execution_not_the_worker(
    db: Database, broker: Broker
) -> None:
    from sqlalchemy import update

    from loom_db.models import graph_versions

    await apply(db, HELLO)
    await apply(db, "name: broken\nnodes:\n  a: {run: 'true'}\n")
    async with db.transaction() as conn:  # as if written by a Loom with other rules
        await conn.execute(
            update(graph_versions)
            .where(graph_versions.c.graph == "broken")
            .values(source="name: broken\nnodes:\n  a: {run: 'true', needs: [ghost]}\n")
        )
    async with Running(db, broker):
        broken = await finished(db, await trigger(db, "broken"))
        healthy = await finished(db, await trigger(db, "hello", {"who": "x"}))

    assert broken.status == "failed"
    assert broken.error is not None and "its graph version is invalid" in broken.error
    assert "ghost" in broken.error
    assert healthy.status == "succeeded", healthy.error  # the worker went on


async def test_a_node_printing_faster_than_its_lines_are_stored_is_held_not_buffered(
    db: Database, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store holds the node's pipes past HOLD_LINES waiting lines: what waits in
    memory stays bounded however fast the node prints, and every line is stored."""
    from loom_worker import store as store_module

    most = 0
    add = store_module.EventStore.add

    def counting(self: store_module.EventStore, event: Any) -> None:
        nonlocal most
        add(self, event)
        most = max(most, len(self._pending.lines))

    monkeypatch.setattr(store_module.EventStore, "add", counting)
    await apply(db, "name: chatty\nnodes:\n  talk: {run: 'seq 1 100000'}\n")
    async with Running(db, broker):
        execution_id = await trigger(db, "chatty")
        record = await finished(db, execution_id)
    assert record.status == "succeeded"
    async with db.read() as conn:
        last = await logs.last_seq(conn, execution_id)
        tail = await logs.read_logs(conn, execution_id, after=99_990)
    assert last == 100_000 and [line.text for line in tail] == [
        str(i) for i in range(99_991, 100_001)
    ]
    # One pipe read (64 KiB) may land after the valve closed; never the whole output.
    assert store_module.HOLD_LINES <= most < store_module.HOLD_LINES + 65_536 // 2
