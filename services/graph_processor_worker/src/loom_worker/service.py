"""The worker service (DESIGN §4, §8): consume `execution.requested`, claim the execution's
lease, decide admission, ack, run the graph with the engine, store then publish what
happens, renew the lease, obey cancel requests, and hand executions back on SIGTERM.

The database owns an execution once it is claimed: the message is acked right after the
claim's commit, and a worker that dies is replaced through the lease (the timer
service's reaper requests the execution again; the next claimer resumes it: succeeded
nodes keep their outputs, running ones run again as attempt + 1, log `seq` continues).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import select

from loom_common import Graph, SpecError, encode_envelope, load_graph
from loom_db import (
    DatabaseUnavailable,
    NotFound,
    TransactionConflict,
    executions,
    graphs,
    logs,
    node_runs,
)
from loom_db import secrets as stored_secrets
from loom_db.errors import Conflict
from loom_db.executions import ExecutionRecord
from loom_db.models import executions as execution_rows
from loom_messaging import Delivery
from loom_runtime import Runtime, metrics_of
from loom_worker.children import ChildGraphs
from loom_worker.engine import Engine, Execution
from loom_worker.events import NODE_TERMINAL, PriorNode
from loom_worker.settings import WorkerSettings
from loom_worker.store import EXECUTION_FINAL, Batch, EventStore, publish_quietly

__all__ = ["Worker", "WorkerMetrics"]

_log = logging.getLogger("loom.worker")

_CLAIM_BACKOFF = (0.2, 5.0)
_GRAPH_CACHE = 256


@dataclass(slots=True)
class WorkerMetrics:
    executions: Counter
    nodes: Counter
    node_seconds: Histogram
    queue_lag: Histogram
    renewal_failures: Counter

    @classmethod
    def of(cls, registry: CollectorRegistry) -> WorkerMetrics:
        return cls(
            Counter(
                "loom_worker_executions",
                "Executions this worker ended or decided, by status",
                ["status"],
                registry=registry,
            ),
            Counter(
                "loom_worker_nodes", "Node attempts ended, by status", ["status"], registry=registry
            ),
            Histogram(
                "loom_worker_node_duration_seconds",
                "Duration of node attempts",
                registry=registry,
                buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
            ),
            Histogram(
                "loom_worker_queue_lag_seconds",
                "From an execution's creation to its claim by a worker",
                registry=registry,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300),
            ),
            Counter(
                "loom_worker_lease_renewal_failures",
                "Lease renewals that failed (database unreachable, or the lease was lost)",
                registry=registry,
            ),
        )


class _Run:
    """One execution this worker owns."""

    def __init__(self, worker: Worker, record: ExecutionRecord, execution: Execution) -> None:
        self.worker = worker
        self.record = record
        self.execution = execution
        self.releasing = False
        """Shutting down: the execution goes back to the queue, nothing more is stored."""
        self.lost = False
        self.ended = False
        """The final status is stored: the lease is gone by design (`finish` clears it)."""
        self.renewed = time.monotonic()
        self.started: dict[tuple[str, int], float] = {}
        self.store = EventStore(
            worker.database,
            worker.broker,
            record.id,
            record.graph,
            worker_id=worker.worker_id,
            lease_seconds=worker.lease_seconds,
            on_stored=self._stored,
            on_lost=self.lose,
        )
        execution.valve = self.store.valve  # a node outprinting the store waits for it

    def lose(self) -> None:
        """The lease is gone: stop the processes, store nothing more."""
        if not (self.lost or self.ended):
            self.lost = True
            self.store.abandon()
            self.execution.cancel()

    def _stored(self, batch: Batch) -> None:
        self.renewed = time.monotonic()
        metrics = self.worker.metrics
        for event in batch.nodes:
            key = (event.node, event.attempt)
            if event.status == "running":
                self.started[key] = time.monotonic()
            elif event.status in NODE_TERMINAL:
                metrics.nodes.labels(event.status).inc()
                began = self.started.pop(key, None)
                if began is not None:
                    metrics.node_seconds.observe(time.monotonic() - began)
        if batch.final is not None:
            self.ended = True
            metrics.executions.labels(batch.final.status).inc()

    async def run(self) -> None:
        try:
            async with self.execution:
                async for event in self.execution:
                    if self.releasing or self.lost:
                        continue  # the engine is stopping: what it says now is not stored
                    self.store.add(event)
            if self.releasing or self.lost:
                self.store.abandon()
            else:
                await self.store.close()
        except asyncio.CancelledError:
            self.store.abandon()
            raise
        except Exception:
            _log.exception("execution %s: the run broke", self.record.id)
            self.store.abandon()


class Worker:
    """Runs executions from the work queue until `stop` is set (see the module doc)."""

    def __init__(
        self, runtime: Runtime, settings: WorkerSettings, *, engine: Engine | None = None
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.database = runtime.database
        self.broker = runtime.event_broker
        self.queue = runtime.broker.queue
        self.control = runtime.broker.control
        self.keys = runtime.keys
        self.worker_id = settings.worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.lease_seconds = float(settings.lease_seconds)
        self.engine = engine
        self._own_engine = engine is None
        self.metrics = metrics_of(runtime.registry, WorkerMetrics.of)
        self.runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._graphs: OrderedDict[tuple[str, int], Graph] = OrderedDict()
        self.ready = asyncio.Event()
        """Set once the worker consumes (for tests and `/readyz`)."""

    # --- the life of the worker ----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`, then shut down as DESIGN §8 says: stop consuming, let
        the running executions finish for `LOOM_SHUTDOWN_GRACE`, hand the others back."""
        engine = self.engine or Engine(
            slots=self.settings.worker_slots,
            max_log_bytes=self.settings.max_log_bytes,
            graphs=ChildGraphs(self.database),
        )
        self.engine = engine
        try:
            consuming = asyncio.create_task(self._consume(), name="loom-worker-consume")
            helpers = [
                asyncio.create_task(self._renew_leases(), name="loom-worker-renew"),
                asyncio.create_task(self._follow_control(), name="loom-worker-control"),
            ]
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait([consuming, stopped], return_when=asyncio.FIRST_COMPLETED)
            consuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consuming
            stopped.cancel()
            await self._drain(self.settings.shutdown_grace)
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
        finally:
            if self._own_engine:
                await engine.aclose()

    async def _drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for the running executions, then give the rest back
        (lease released, `execution.requested` through the outbox: another worker
        resumes them)."""
        if self._tasks:
            _log.info("stopping: waiting up to %.0fs for %d execution(s)", grace, len(self._tasks))
            await asyncio.wait(set(self._tasks), timeout=grace)
        left = list(self.runs.values())
        for run in left:
            run.releasing = True
            run.store.abandon()
            run.execution.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for run in left:
            if run.lost:
                continue
            try:
                async with self.database.transaction() as conn:
                    await executions.release(conn, run.record.id, self.worker_id, requeue=True)
                self.database.notify_committed()
                _log.info("execution %s handed back to the queue", run.record.id)
            except (DatabaseUnavailable, TransactionConflict) as exc:
                # The lease expires and the reaper requests it again.
                _log.warning("could not hand %s back (%s): the reaper will", run.record.id, exc)

    async def _consume(self) -> None:
        async with self.queue.consume(prefetch=self.settings.worker_prefetch) as deliveries:
            self.ready.set()
            async for delivery in deliveries:
                await self._take(delivery)

    # --- one message -----------------------------------------------------------------------

    async def _take(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        execution_id = envelope.data.get("execution_id")
        if envelope.type != "execution.requested" or not isinstance(execution_id, str):
            await delivery.dead_letter(
                "a work message is execution.requested with a string execution_id, "
                f"not {envelope.type} with {sorted(envelope.data)}"
            )
            return
        if execution_id in self.runs:
            await delivery.ack()  # a duplicate request for what this worker already runs
            return
        delay = _CLAIM_BACKOFF[0]
        while True:
            try:
                started = await self._claim(execution_id)
                break
            except (DatabaseUnavailable, TransactionConflict) as exc:
                # The message stays unacked meanwhile: nothing is lost if this worker dies.
                _log.warning("claiming %s: %s (retrying in %.1fs)", execution_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _CLAIM_BACKOFF[1])
        await delivery.ack()
        if started is not None:
            self._start(*started)

    async def _claim(
        self, execution_id: str
    ) -> tuple[ExecutionRecord, Graph, dict[str, Any]] | None:
        """Claim and admit in one transaction; what a run needs if it runs now, else None
        (not ours to run, waiting, skipped, or refused)."""
        decided: str | None = None
        async with self.database.transaction() as conn:
            record = await executions.claim(conn, execution_id, self.worker_id, self.lease_seconds)
            if record is None:
                return None  # finished, missing, or leased by a live worker
            self.metrics.queue_lag.observe(max(0.0, time.time() - record.created_at.timestamp()))
            try:
                graph = await self._graph(conn, record.graph, record.graph_version)
            except (NotFound, SpecError) as exc:
                # Gone, or stored by an older Loom and no longer valid: the execution
                # fails saying why, the worker goes on.
                decided = "failed"
                reason = "no longer exists" if isinstance(exc, NotFound) else f"is invalid: {exc}"
                await executions.finish(
                    conn, execution_id, "failed", error=f"its graph version {reason}"
                )
            if decided is None:
                spec = graph.spec
                try:
                    admission = await executions.admit(
                        conn,
                        execution_id,
                        self.worker_id,
                        self.lease_seconds,
                        concurrency=spec.concurrency,
                        on_overlap=spec.on_overlap,
                    )
                except Conflict:
                    return None  # cancelled meanwhile
                if admission != "running":
                    decided = admission
                else:
                    run_inputs = await self._inputs(conn, record)
        self.database.notify_committed()
        if decided is not None:
            self.metrics.executions.labels(decided).inc()
            await self._announce(record, decided)
            return None
        await self._announce(record, "running")  # for dashboards (`/ws/events`)
        return record, graph, run_inputs

    async def _graph(self, conn: Any, name: str, version: int) -> Graph:
        key = (name, version)
        graph = self._graphs.get(key)
        if graph is None:
            stored = await graphs.get_graph(conn, name, version)
            graph = load_graph(stored.source)
            self._graphs[key] = graph
            if len(self._graphs) > _GRAPH_CACHE:
                self._graphs.popitem(last=False)
        return graph

    async def _inputs(self, conn: Any, record: ExecutionRecord) -> dict[str, Any]:
        """Prior node states (a resumed execution's own; a retry's origin's succeeded
        ones), the last stored log seq, and the secrets. `record` is the execution as the
        claim found it: one that was `queued` or `waiting` never ran, so it has neither
        node runs nor log lines to read."""
        prior: dict[str, PriorNode] = {}
        after_seq = 0
        if record.status == "running":
            prior = {
                node: PriorNode(state.status, state.outputs, state.attempt)  # type: ignore[arg-type]
                for node, state in (await node_runs.prior_states(conn, record.id)).items()
            }
            after_seq = await logs.last_seq(conn, record.id)
        if record.trigger_type == "retry" and record.origin_id is not None and not prior:
            origin = await node_runs.prior_states(conn, record.origin_id)
            prior = {
                node: PriorNode("succeeded", state.outputs, 0)
                for node, state in origin.items()
                if state.status == "succeeded"
            }
        secrets = await stored_secrets.all_secrets(conn, self.keys)
        return {"prior": prior, "after_seq": after_seq, "secrets": secrets}

    def _start(self, record: ExecutionRecord, graph: Graph, inputs: dict[str, Any]) -> None:
        assert self.engine is not None
        info = record.trigger_info or {}
        trigger = {"type": record.trigger_type, **info}
        execution = self.engine.start(
            graph,
            params=record.params,
            secrets=inputs["secrets"],
            execution_id=record.id,
            prior=inputs["prior"],
            after_seq=inputs["after_seq"],
            trigger=trigger,
        )
        run = _Run(self, record, execution)
        self.runs[record.id] = run
        task = asyncio.create_task(run.run(), name=f"loom-run-{record.id}")
        self._tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self.runs.pop(record.id, None)

        task.add_done_callback(done)

    async def _announce(self, record: ExecutionRecord, status: str) -> None:
        data = {
            "execution_id": record.id,
            "graph": record.graph,
            "status": status,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        body = encode_envelope("execution.status", data)
        await publish_quietly(self.broker.events.publish(body, record.id), record.id)

    # --- leases and cancel ---------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Every lease/3: renew each running execution's lease and read its cancel flag.
        A lease that cannot be renewed before it expires stops that execution."""
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            runs = [
                run for run in self.runs.values() if not (run.lost or run.releasing or run.ended)
            ]
            if not runs:
                continue
            try:
                async with self.database.transaction() as conn:
                    lost = [
                        run
                        for run in runs
                        if not await executions.renew(
                            conn, run.record.id, self.worker_id, self.lease_seconds
                        )
                    ]
                    if lost:
                        # One that ended since the list was made (its final batch
                        # committed: `finish` clears the lease) was not taken from us.
                        ended = set(
                            (
                                await conn.execute(
                                    select(execution_rows.c.id).where(
                                        execution_rows.c.id.in_([r.record.id for r in lost]),
                                        execution_rows.c.status.in_(EXECUTION_FINAL),
                                        execution_rows.c.worker_id.is_(None),
                                    )
                                )
                            ).scalars()
                        )
                        lost = [run for run in lost if run.record.id not in ended]
                    flagged = set(
                        (
                            await conn.execute(
                                select(execution_rows.c.id).where(
                                    execution_rows.c.id.in_([run.record.id for run in runs]),
                                    execution_rows.c.cancel_requested.is_(True),
                                )
                            )
                        ).scalars()
                    )
            except (DatabaseUnavailable, TransactionConflict) as exc:
                self.metrics.renewal_failures.inc()
                now = time.monotonic()
                for run in runs:
                    if now - run.renewed >= self.lease_seconds:
                        _log.error(
                            "execution %s: lease not renewed for %.0fs (%s): stopping it",
                            run.record.id,
                            now - run.renewed,
                            exc,
                        )
                        run.lose()
                continue
            now = time.monotonic()
            for run in runs:
                if run in lost:
                    self.metrics.renewal_failures.inc()
                    _log.warning("execution %s: the lease was taken: stopping it", run.record.id)
                    run.lose()
                else:
                    run.renewed = now
                    if run.record.id in flagged:
                        run.execution.cancel()

    async def _follow_control(self) -> None:
        """`execution.cancel` on the control channel: cancel at once (the database flag,
        read at each renewal, is the fallback when a message is missed)."""
        while True:
            try:
                async with self.control.subscribe() as messages:
                    async for envelope in messages:
                        if envelope.type != "execution.cancel":
                            continue
                        run = self.runs.get(str(envelope.data.get("execution_id")))
                        if run is not None:
                            _log.info("execution %s: cancel requested", run.record.id)
                            run.execution.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning("control channel: %s (subscribing again in 1s)", exc)
                await asyncio.sleep(1)
