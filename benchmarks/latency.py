"""B3 and B1d: the worker in a process of its own, on PostgreSQL + RabbitMQ, in one run.

B3   REST trigger -> first node running. One trigger at a time (the next one is sent when
     the previous execution has ended): `POST /api/v1/graphs/b3-trigger/executions` to
     `python -m loom_rest`, which commits the execution and its outbox row; its relay
     publishes `execution.requested` to RabbitMQ; `python -m loom_worker` consumes it,
     claims and admits the execution, acks, and starts the graph's only node
     (`run: "true"`). The figure is the moment of the node's `running` (the `ts` of its
     `node.status` event, which the worker takes from the system clock as the node starts:
     the same clock as the send, `time.time()` here; node_runs.started_at holds the same
     value) minus the moment the request was sent: p50 and p99 in ms over N triggers
     (500; --quick 100) after 20 for warm-up. Beside it: when the event was *received*
     here (the worker publishes it after committing it), when the 202 came back, a p50
     breakdown from the rows (send -> execution row created -> admitted by the worker ->
     node running), and the CPU each service spent per trigger.
     Baseline, interleaved with the triggers: a raw aio-pika round trip on the same
     RabbitMQ, one message at a time: publish (persistent, mandatory, publisher confirms)
     to a quorum queue with the work queue's arguments, until a consumer in this process
     receives it. Target (DESIGN §10): p50 <= 20 ms, p99 <= 100 ms.
B1d  A chain of 40 no-op `python` nodes (`json:dumps` with `{obj: 1}`: the worker's
     python processes import only what is installed, and see no PYTHONPATH) triggered
     through the same services; per-node cost = (finished_at - started_at) / 40 of the
     execution's row, best of K runs (5; --quick 3) after one for warm-up. Beside it, the
     "stored" cost: from started_at to the arrival here of the `execution.status` event the
     worker publishes after committing the final status, and the worker's CPU per node.
     Baseline, alternating with those runs: the same graph through
     `loom_worker.engine.Engine` in this process (no database, no broker; events
     dropped), best of K. Target: <= 2 ms per node.

`ratio` is ours / baseline for both (lower is better: how many times the bare path).

    uv run python benchmarks/latency.py [--quick] [--repeat K] [--triggers N]
        [--database-url URL] [--amqp-url URL] [--only B3,B1d]

Needs PostgreSQL (--database-url or LOOM_TEST_POSTGRES_URL, `postgresql+psycopg://...`)
and RabbitMQ (--amqp-url or LOOM_TEST_AMQP_URL). Creates a throwaway database (migrated,
dropped at the end) and uses its own broker prefix (`loombench-<random>`), whose queues
and exchanges it deletes at the end. Every execution must succeed with every node, or the
run fails (exit 1). An execution whose final `execution.status` event has not arrived
5 s after the trigger is looked up in the database instead; the figures count those
(`missing_final_events`): events are news, and a missing one is a finding, not a failure.
Prints one JSON object per line and figure (DESIGN §10).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from _httpload import LoadError, fetch, request  # type: ignore[import-not-found, unused-ignore]
from rest import (  # type: ignore[import-not-found, unused-ignore]
    HOST,
    BenchError,
    cpu_seconds,
    emit,
    free_port,
    login,
    rest_env,
    server,
)
from sqlalchemy.engine import URL, make_url

from loom_common import load_graph
from loom_db.testing import scratch_database
from loom_messaging import Envelope, encode, open_broker

B3_GRAPH = "b3-trigger"
B3_FIRST = "first"
B3_YAML = f"""\
name: {B3_GRAPH}
description: B3, REST trigger -> first node running
nodes:
  {B3_FIRST}:
    run: "true"
"""
CHAIN = 40
CHAIN_GRAPH = "b1d-chain"
CHAIN_TARGET = "json:dumps"
"""A no-op with keyword arguments that the worker's python processes can import (they
see only the installed packages: no PYTHONPATH, no benchmark directory)."""
WARM_TRIGGERS = 20
EVENT_GRACE = 5.0
"""Seconds to wait for an execution's final event before reading its row instead."""
WAIT = 30.0
"""Seconds any one execution may take before the run fails."""
FINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out", "skipped"})


def chain_yaml(n: int) -> str:
    lines = [f"name: {CHAIN_GRAPH}", "description: B1d, a chain of no-op python nodes", "nodes:"]
    for i in range(n):
        needs = f", needs: [n{i - 1}]" if i else ""
        lines.append(f"  n{i}: {{python: '{CHAIN_TARGET}', with: {{obj: 1}}{needs}}}")
    return "\n".join(lines) + "\n"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def conninfo(url: str) -> str:
    rendered: str = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    return rendered


def cpu_ms(pid: int) -> float:
    return float(cpu_seconds(pid)) * 1000


# --- the services ---------------------------------------------------------------------------


def broker_env(env: dict[str, str], amqp_url: str, prefix: str) -> dict[str, str]:
    env.update(
        LOOM_QUEUE_URL=amqp_url,
        LOOM_EVENTS_URL=amqp_url,
        LOOM_BROKER_PREFIX=prefix,
        LOOM_LOG_LEVEL="WARNING",
    )
    return env


def worker_env(url: str, amqp_url: str, prefix: str, secret_key: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_")}
    env.update(
        LOOM_DATABASE_URL=url,
        LOOM_SECRET_KEY=secret_key,
        LOOM_WORKER_HOST=HOST,
        LOOM_WORKER_PORT=str(port),
    )
    return broker_env(env, amqp_url, prefix)


@dataclass
class Api:
    """The REST service as the benchmark calls it (a new connection per request)."""

    port: int
    token: str

    def request(self, method: str, target: str, body: bytes, content_type: str) -> bytes:
        raw: bytes = request(
            method,
            HOST,
            self.port,
            target,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type},
            body=body,
        )
        return raw

    async def call(
        self, method: str, target: str, body: bytes, content_type: str, expect: int
    ) -> Any:
        raw = self.request(method, target, body, content_type)
        status, answer = await fetch(HOST, self.port, raw, WAIT)
        if status != expect:
            raise BenchError(
                f"{method} {target}: expected {expect}, got {status}: {answer[:500]!r}"
            )
        return orjson.loads(answer)

    def trigger_request(self, graph: str) -> bytes:
        target = f"/api/v1/graphs/{graph}/executions"
        return self.request("POST", target, b'{"params": {}}', "application/json")


# --- following executions on the event stream -----------------------------------------------


@dataclass
class Track:
    """What the event stream said about one execution."""

    running: asyncio.Future[tuple[datetime, float]]
    """The first node's `running`: (its `ts`, when it arrived here: time.time())."""
    final: asyncio.Future[tuple[str, float]]
    """The execution's final status and when it arrived here (time.time())."""


@dataclass
class Watcher:
    """Reads the event stream into `Track`s, by execution id; an execution's track may be
    made by the event before the trigger's answer names the execution, or after."""

    first_nodes: frozenset[str]
    """The names of the graphs' first nodes: their `running` is the one that counts."""
    tracks: dict[str, Track] = field(default_factory=dict)

    def track(self, execution_id: str) -> Track:
        track = self.tracks.get(execution_id)
        if track is None:
            loop = asyncio.get_running_loop()
            track = self.tracks[execution_id] = Track(loop.create_future(), loop.create_future())
        return track

    def seen(self, envelope: Envelope) -> None:
        now = time.time()
        data = envelope.data
        execution_id = data.get("execution_id")
        if not isinstance(execution_id, str):
            return
        if envelope.type == "execution.status" and data.get("status") in FINAL:
            final = self.track(execution_id).final
            if not final.done():
                final.set_result((str(data["status"]), now))
        elif envelope.type == "node.status" and data.get("status") == "running":
            running = self.track(execution_id).running
            if not running.done() and data.get("node") in self.first_nodes:
                running.set_result((datetime.fromisoformat(data["ts"]), now))


async def follow(events: Any, watcher: Watcher) -> None:
    async for envelope in events:
        watcher.seen(envelope)


@dataclass
class Context:
    """What every measurement needs: the API, the event stream, the database, the pids."""

    api: Api
    watcher: Watcher
    url: str
    rest_pid: int
    worker_pid: int
    missing_final: list[str] = field(default_factory=list)
    """Executions that ended (their row says so) without their final event arriving."""


async def stored_status(url: str, execution_id: str, deadline: float) -> str:
    """The execution's final status from its row, polling until `deadline` (monotonic)."""
    async with await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True) as conn:
        while True:
            cursor = await conn.execute(
                "SELECT status FROM executions WHERE id = %s", (execution_id,)
            )
            row = await cursor.fetchone()
            if row is not None and row[0] in FINAL:
                return str(row[0])
            if time.monotonic() >= deadline:
                state = "not stored" if row is None else row[0]
                raise BenchError(
                    f"execution {execution_id} did not end within {WAIT:.0f} s: {state}"
                )
            await asyncio.sleep(0.2)


async def run_one(ctx: Context, raw: bytes) -> tuple[str, float, float, float | None]:
    """Trigger once and wait for the execution's end: (execution id, sent, answered, final
    event's arrival or None when it never came), times from time.time()."""
    deadline = time.monotonic() + WAIT
    sent = time.time()
    status, body = await fetch(HOST, ctx.api.port, raw, WAIT)
    answered = time.time()
    if status != 202:
        raise BenchError(f"a trigger answered {status}, not 202: {body[:500]!r}")
    execution_id: str = orjson.loads(body)["id"]
    track = ctx.watcher.track(execution_id)
    arrived: float | None
    try:
        final, arrived = await asyncio.wait_for(asyncio.shield(track.final), EVENT_GRACE)
    except TimeoutError:
        final, arrived = await stored_status(ctx.url, execution_id, deadline), None
        ctx.missing_final.append(execution_id)
    if final != "succeeded":
        raise BenchError(f"execution {execution_id} ended {final}, not succeeded")
    return execution_id, sent, answered, arrived


# --- B3 --------------------------------------------------------------------------------------


@dataclass
class B3Sample:
    execution_id: str
    sent: float
    answered: float
    running: float
    received: float


RawTrip = Callable[[], Awaitable[float]]


async def raw_round_trip(
    amqp_url: str, prefix: str
) -> tuple[RawTrip, Callable[[], Awaitable[None]]]:
    """A function doing one raw aio-pika round trip (ms), and one closing it all."""
    import aio_pika

    name = f"{prefix}.raw"
    connection = await aio_pika.connect(amqp_url)
    publishing = await connection.channel(publisher_confirms=True)
    consuming = await connection.channel(publisher_confirms=False)
    await consuming.set_qos(prefetch_count=10)
    queue = await consuming.declare_queue(
        name,
        durable=True,
        arguments={  # the work queue's (loom_messaging.rabbitmq), on a queue of its own
            "x-queue-type": "quorum",
            "x-delivery-limit": 4,
            "x-dead-letter-exchange": f"{prefix}.dlx",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    waiting: dict[str, asyncio.Future[float]] = {}

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        orjson.loads(message.body)
        await message.ack()
        future = waiting.pop(message.message_id or "", None)
        if future is not None and not future.done():
            future.set_result(arrived)

    tag = await queue.consume(on_message)
    exchange = publishing.default_exchange

    async def trip() -> float:
        message_id = uuid.uuid4().hex
        body = encode("execution.requested", {"execution_id": message_id, "graph": "raw"})
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        waiting[message_id] = future
        start = time.perf_counter()
        await exchange.publish(
            aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id,
                headers={"x-loom-key": message_id},
            ),
            routing_key=name,
            mandatory=True,
        )
        arrived = await asyncio.wait_for(future, WAIT)
        return (arrived - start) * 1000

    async def close() -> None:
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()

    return trip, close


@dataclass
class B3Result:
    samples: list[B3Sample]
    baseline: list[float]
    rest_cpu_ms: float
    worker_cpu_ms: float
    missing_final: int


async def bench_b3(ctx: Context, amqp_url: str, prefix: str, n: int) -> B3Result:
    raw = ctx.api.trigger_request(B3_GRAPH)
    trip, close = await raw_round_trip(amqp_url, prefix)
    samples: list[B3Sample] = []
    baseline: list[float] = []
    missing_before = len(ctx.missing_final)
    try:
        for _ in range(WARM_TRIGGERS):
            await trip()
            await run_one(ctx, raw)
        cpu = cpu_ms(ctx.rest_pid), cpu_ms(ctx.worker_pid)
        for _ in range(n):
            baseline.append(await trip())
            execution_id, sent, answered, _ = await run_one(ctx, raw)
            running = ctx.watcher.track(execution_id).running
            if not running.done():
                raise BenchError(f"execution {execution_id}: no running event for its node")
            ts, received = running.result()
            samples.append(B3Sample(execution_id, sent, answered, ts.timestamp(), received))
        rest_cpu, worker_cpu = cpu_ms(ctx.rest_pid) - cpu[0], cpu_ms(ctx.worker_pid) - cpu[1]
    finally:
        await close()
    return B3Result(
        samples, baseline, rest_cpu / n, worker_cpu / n, len(ctx.missing_final) - missing_before
    )


def b3_breakdown(url: str, samples: list[B3Sample]) -> dict[str, float]:
    """p50 ms of each leg, from the rows (every time on this machine's system clock):
    send -> execution row created (REST), -> admitted (the relay, RabbitMQ, the worker's
    claim), -> first node running (the claim's commit, the ack, the engine's start).
    Checks every execution of the graph and its node succeeded."""
    by_id = {s.execution_id: s for s in samples}
    with psycopg.connect(conninfo(url)) as conn:
        rows = conn.execute(
            "SELECT e.id, e.status, e.created_at, e.started_at, n.started_at, n.status "
            "FROM executions e LEFT JOIN node_runs n "
            "ON n.execution_id = e.id AND n.node = %s AND n.attempt = 1 "
            "WHERE e.graph = %s",
            (B3_FIRST, B3_GRAPH),
        ).fetchall()
    if len(rows) != WARM_TRIGGERS + len(samples):
        raise BenchError(
            f"{WARM_TRIGGERS + len(samples)} triggers but {len(rows)} executions of {B3_GRAPH}"
        )
    legs: dict[str, list[float]] = {"created": [], "admitted": [], "running": []}
    for execution_id, status, created, admitted, node_started, node_status in rows:
        if status != "succeeded" or node_status != "succeeded":
            raise BenchError(f"execution {execution_id}: {status}, its node {node_status}")
        sample = by_id.get(execution_id)
        if sample is None:
            continue  # a warm-up one
        if abs(node_started.timestamp() - sample.running) > 0.001:
            raise BenchError(
                f"execution {execution_id}: node_runs.started_at {node_started} is not the "
                f"running event's ts ({sample.running})"
            )
        legs["created"].append((created.timestamp() - sample.sent) * 1000)
        legs["admitted"].append((admitted.timestamp() - created.timestamp()) * 1000)
        legs["running"].append((sample.running - admitted.timestamp()) * 1000)
    return {
        "send_to_row_created": round(statistics.median(legs["created"]), 2),
        "row_created_to_admitted": round(statistics.median(legs["admitted"]), 2),
        "admitted_to_node_running": round(statistics.median(legs["running"]), 2),
    }


def b3_figure(result: B3Result, breakdown: dict[str, float], quick: bool) -> dict[str, object]:
    samples, baseline = result.samples, result.baseline
    latencies = [(s.running - s.sent) * 1000 for s in samples]
    received = [(s.received - s.sent) * 1000 for s in samples]
    answered = [(s.answered - s.sent) * 1000 for s in samples]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    base50 = percentile(baseline, 50)
    return {
        "benchmark": "B3",
        "name": "REST trigger -> first node running, worker in another process, "
        "PostgreSQL + RabbitMQ",
        "value": round(p50, 2),
        "unit": "ms",
        "p50": round(p50, 2),
        "p99": round(p99, 2),
        "max": round(max(latencies), 2),
        "measured_by": "the node.status running event's ts (the worker's system clock, the "
        "same clock as the send: time.time(); node_runs.started_at holds the same value)",
        "baseline": round(base50, 3),
        "baseline_name": "raw aio-pika publish -> consume round trip",
        "baseline_p99": round(percentile(baseline, 99), 3),
        "ratio": round(p50 / base50, 2),
        "target": "p50 <= 20 ms, p99 <= 100 ms",
        "event_received_p50": round(percentile(received, 50), 2),
        "event_received_p99": round(percentile(received, 99), 2),
        "rest_answer_p50": round(percentile(answered, 50), 2),
        "rest_answer_p99": round(percentile(answered, 99), 2),
        "breakdown_p50_ms": breakdown,
        "rest_cpu_ms_per_trigger": round(result.rest_cpu_ms, 2),
        "worker_cpu_ms_per_trigger": round(result.worker_cpu_ms, 2),
        "missing_final_events": result.missing_final,
        "n": len(samples),
        "warm_up": WARM_TRIGGERS,
        "quick": quick,
    }


# --- B1d -------------------------------------------------------------------------------------


async def engine_chain(graph: Any, engine: Any) -> float:
    """One run of the chain straight through the engine, in ms per node."""
    execution = engine.start(graph, params={})
    start = time.perf_counter()
    async for _ in execution:
        pass
    elapsed = time.perf_counter() - start
    if execution.status != "succeeded":
        raise BenchError(f"the in-process engine's chain {execution.status}: {execution.error}")
    return elapsed / CHAIN * 1000


@dataclass
class B1dResult:
    runs: list[tuple[str, float | None]]
    """(execution id, its final event's arrival: time.time(), or None if it never came)."""
    direct: list[float]
    """The in-process engine, ms per node."""
    worker_cpu_ms: float
    """The worker's CPU per node over the measured runs."""
    missing_final: int


async def bench_b1d(ctx: Context, repeat: int) -> B1dResult:
    """One run of each side per round, alternating, after a warm-up round."""
    from loom_worker.engine import Engine

    graph = load_graph(chain_yaml(CHAIN))
    raw = ctx.api.trigger_request(CHAIN_GRAPH)
    runs: list[tuple[str, float | None]] = []
    direct: list[float] = []
    worker_cpu = 0.0
    missing_before = len(ctx.missing_final)
    async with Engine(slots=os.cpu_count() or 1) as engine:
        await engine_chain(graph, engine)
        await run_one(ctx, raw)
        for _ in range(repeat):
            direct.append(await engine_chain(graph, engine))
            before = cpu_ms(ctx.worker_pid)
            execution_id, _, _, arrived = await run_one(ctx, raw)
            worker_cpu += cpu_ms(ctx.worker_pid) - before
            runs.append((execution_id, arrived))
    return B1dResult(
        runs, direct, worker_cpu / (repeat * CHAIN), len(ctx.missing_final) - missing_before
    )


def b1d_figure(url: str, result: B1dResult, quick: bool) -> dict[str, object]:
    per_node: list[float] = []
    stored: list[float] = []
    with psycopg.connect(conninfo(url)) as conn:
        for execution_id, arrived in result.runs:
            row = conn.execute(
                "SELECT status, started_at, finished_at, "
                "(SELECT count(*) FROM node_runs n WHERE n.execution_id = e.id "
                "AND n.status = 'succeeded') FROM executions e WHERE id = %s",
                (execution_id,),
            ).fetchone()
            if row is None:
                raise BenchError(f"execution {execution_id} is not stored")
            status, started, finished, succeeded = row
            if status != "succeeded" or succeeded != CHAIN:
                raise BenchError(
                    f"execution {execution_id}: {status}, {succeeded} of {CHAIN} nodes succeeded"
                )
            per_node.append((finished - started).total_seconds() / CHAIN * 1000)
            if arrived is not None:
                stored.append((arrived - started.timestamp()) / CHAIN * 1000)
    ours, base = min(per_node), min(result.direct)
    return {
        "benchmark": "B1d",
        "name": f"chain of {CHAIN} no-op python nodes through the worker, PostgreSQL "
        "checkpoints (RabbitMQ)",
        "value": round(ours, 3),
        "unit": "ms/node",
        "measured_by": "(executions.finished_at - started_at) / nodes, best run",
        "median_ms_per_node": round(statistics.median(per_node), 3),
        "stored_ms_per_node": round(min(stored), 3) if stored else None,
        "stored_measured_by": "started_at -> the final execution.status event received "
        "(published after the final commit), / nodes, best run",
        "worker_cpu_ms_per_node": round(result.worker_cpu_ms, 3),
        "baseline": round(base, 3),
        "baseline_name": "the same chain through loom_worker.engine.Engine in-process "
        "(no database, no broker), ms/node",
        "ratio": round(ours / base, 2),
        "target": "<= 2 ms per node",
        "missing_final_events": result.missing_final,
        "n": CHAIN,
        "repeat": len(result.runs),
        "python_target": CHAIN_TARGET,
        "quick": quick,
    }


# --- the run ---------------------------------------------------------------------------------


async def bench(
    ctx: Context,
    amqp_url: str,
    prefix: str,
    *,
    only: set[str],
    triggers: int,
    repeat: int,
    quick: bool,
) -> list[dict[str, object]]:
    for yaml in (B3_YAML, chain_yaml(CHAIN)):
        await ctx.api.call("POST", "/api/v1/graphs", yaml.encode(), "application/yaml", 201)
    figures: list[dict[str, object]] = []
    async with open_broker(amqp_url, prefix=prefix) as broker:
        async with broker.events.subscribe() as events:
            following = asyncio.create_task(follow(events, ctx.watcher))
            try:
                if "B3" in only:
                    b3 = await bench_b3(ctx, amqp_url, prefix, triggers)
                    breakdown = b3_breakdown(ctx.url, b3.samples)
                    figures.append(b3_figure(b3, breakdown, quick))
                if "B1d" in only:
                    b1d = await bench_b1d(ctx, repeat)
                    figures.append(b1d_figure(ctx.url, b1d, quick))
            finally:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
    return figures


def run(
    base: URL,
    amqp_url: str,
    *,
    only: set[str],
    triggers: int,
    repeat: int,
    quick: bool,
) -> None:
    from loom_db.migrate import upgrade_sync
    from loom_messaging.rabbitmq import delete_prefix

    password = secrets.token_urlsafe(24)
    secret_key = secrets.token_urlsafe(48)
    prefix = f"loombench-{uuid.uuid4().hex[:10]}"
    try:
        with ExitStack() as stack:
            url = stack.enter_context(scratch_database(base, "loom_bench"))
            upgrade_sync(url)
            rest_port, worker_port = free_port(), free_port()
            env = broker_env(rest_env(url, rest_port, password, pool_size=5), amqp_url, prefix)
            env["LOOM_SECRET_KEY"] = secret_key
            rest = stack.enter_context(
                server([sys.executable, "-m", "loom_rest"], env, "the REST service", rest_port)
            )
            worker = stack.enter_context(
                server(
                    [sys.executable, "-m", "loom_worker"],
                    worker_env(url, amqp_url, prefix, secret_key, worker_port),
                    "the worker",
                    worker_port,
                )
            )
            ctx = Context(
                api=Api(rest_port, login(rest_port, password)),
                watcher=Watcher(first_nodes=frozenset({B3_FIRST, "n0"})),
                url=url,
                rest_pid=rest.pid,
                worker_pid=worker.pid,
            )
            figures = asyncio.run(
                bench(
                    ctx, amqp_url, prefix, only=only, triggers=triggers, repeat=repeat, quick=quick
                )
            )
    finally:
        asyncio.run(delete_prefix(amqp_url, prefix))
    for figure in figures:
        emit(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, for CI")
    parser.add_argument(
        "--repeat", type=int, default=None, help="B1d runs per side, best of (5; --quick 3)"
    )
    parser.add_argument(
        "--triggers", type=int, default=None, help="B3 triggers measured (500; --quick 100)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("LOOM_TEST_POSTGRES_URL"),
        help="a postgresql+psycopg:// URL of a server to create a scratch database on "
        "(default: LOOM_TEST_POSTGRES_URL)",
    )
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("LOOM_TEST_AMQP_URL"),
        help="RabbitMQ (default: LOOM_TEST_AMQP_URL)",
    )
    parser.add_argument("--only", default="B3,B1d", help="comma-separated figures to run")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("needs PostgreSQL: --database-url or LOOM_TEST_POSTGRES_URL")
    if not args.amqp_url:
        parser.error("needs RabbitMQ: --amqp-url or LOOM_TEST_AMQP_URL")
    only = set(args.only.split(","))
    if not only <= {"B3", "B1d"}:
        parser.error(f"--only: unknown figures {sorted(only - {'B3', 'B1d'})}")
    repeat = args.repeat or (3 if args.quick else 5)
    triggers = args.triggers or (100 if args.quick else 500)
    if repeat < 1 or triggers < 1:
        parser.error("--repeat and --triggers must be at least 1")
    base = make_url(args.database_url).set(drivername="postgresql+psycopg")
    try:
        run(base, args.amqp_url, only=only, triggers=triggers, repeat=repeat, quick=args.quick)
    except (BenchError, LoadError) as exc:
        print(f"latency benchmark failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
