"""The engine: runs one validated graph and yields what happens, as events.

It is the pure core of the worker — no database, no broker. Given a `Graph`, params,
secrets and optionally the prior state of some nodes (how a resumed or retried execution
continues), it starts each node as soon as its needs are done, at most `slots` at once
(nodes that only wait, like `http`, take none), and yields `ExecutionEvent`s,
`NodeEvent`s and `LogEvent`s (per-execution `seq` 1, 2, 3, ... continuing after
`after_seq`).

Semantics (DESIGN §3, §4): `if` with the status functions, skips that propagate,
`for_each` fan-out with `max_parallel`, outputs passed downstream, retries with
exponential backoff and full jitter, node and execution timeouts, cancellation,
`continue_on_failure`, secret values masked as `***`, a log cap per execution and lines
over 16 KiB split.

Executors are thin (`executors/`); the engine owns none of the scheduling in them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from loom_common import (
    STATUS_FUNCTIONS,
    CompiledNode,
    ExpressionError,
    Graph,
    bind_log_context,
    format_duration,
    render_shell,
    render_value,
    to_text,
)
from loom_worker.events import (
    NODE_TERMINAL,
    Event,
    ExecutionEvent,
    ExecutionStatus,
    LogEvent,
    NodeEvent,
    NodeStatus,
    PriorNode,
)
from loom_worker.executors import (
    HttpExecutor,
    NodeCall,
    NodeFailed,
    PythonPool,
    ShellExecutor,
    SqlExecutor,
)
from loom_worker.executors._process import Valve
from loom_worker.executors.base import LogSink, NodeResult
from loom_worker.executors.sql import render_sql

__all__ = ["Engine", "Execution", "GraphRunner", "NodeRecord"]

_log = logging.getLogger("loom.engine")

MAX_LINE_BYTES = 16 * 1024
DEFAULT_MAX_LOG_BYTES = 100 * 1024 * 1024
_FAILED = frozenset({"failed", "timed_out"})


class GraphRunner(Protocol):
    """What runs a `graph` node: start the child execution of `graph` with `params` (once
    per node attempt, and found again after a resume) and wait for it without holding a
    slot. Returns outputs `{execution_id, status}`; raises `NodeFailed` when the child did
    not succeed."""

    async def run(
        self, call: NodeCall, graph: str, params: dict[str, Any], *, log: LogSink
    ) -> NodeResult: ...


def _now() -> datetime:
    return datetime.now(UTC)


class Engine:
    """Runs executions. One per worker process: it holds the slots and the executors,
    which every execution it starts shares.

    Executors not given are created (and closed by `aclose`)."""

    def __init__(
        self,
        *,
        slots: int | None = None,
        shell: ShellExecutor | None = None,
        python: PythonPool | None = None,
        http: HttpExecutor | None = None,
        sql: SqlExecutor | None = None,
        workspace: Path | None = None,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
        python_path: tuple[str, ...] = (),
        graphs: GraphRunner | None = None,
    ) -> None:
        self.slots = slots or os.cpu_count() or 1
        self.graphs = graphs
        """Runs `graph` nodes (the worker service gives one: it needs the database)."""
        self._slots = asyncio.Semaphore(self.slots)
        self._owned: list[Any] = []
        self.shell = shell or ShellExecutor()
        if python is None:
            python = PythonPool(self.slots, sys_path=python_path)
            self._owned.append(python)
        self.python = python
        if http is None:
            http = HttpExecutor()
            self._owned.append(http)
        self.http = http
        self.sql = sql or SqlExecutor()  # holds nothing between queries: nothing to close
        self._workspace = workspace
        self.max_log_bytes = max_log_bytes

    async def aclose(self) -> None:
        for executor in reversed(self._owned):
            await executor.aclose()
        self._owned.clear()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(
        self,
        graph: Graph,
        *,
        params: Mapping[str, Any],
        secrets: Mapping[str, str] | None = None,
        execution_id: str | None = None,
        prior: Mapping[str, PriorNode] | None = None,
        after_seq: int = 0,
        trigger: Mapping[str, Any] | None = None,
    ) -> Execution:
        """An execution of `graph`; it starts when iterated (`async for event in ...`).
        Use it as `async with engine.start(...) as execution:` so that leaving the block
        early cancels it.

        `params` must already be resolved (`loom_common.params.resolve_params`).
        `prior` maps node instance names (`build`, `build[0]`) to their earlier state.
        """
        return Execution(
            self,
            graph,
            execution_id=execution_id or str(uuid.uuid4()),
            params=dict(params),
            secrets=dict(secrets or {}),
            prior=dict(prior or {}),
            after_seq=after_seq,
            trigger=dict(trigger or {"type": "manual"}),
        )


@dataclass(slots=True)
class NodeRecord:
    """The latest state of one node instance (or of a fan-out as a whole)."""

    node: str
    name: str
    index: int | None
    status: NodeStatus = "pending"
    attempt: int = 0
    outputs: Any = None
    exit_code: int | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    fanout: bool = False


class _ExecutionCancelled(Exception):
    pass


@dataclass(slots=True)
class _NodeState:
    status: NodeStatus = "pending"
    outputs: Any = None
    public: dict[str, Any] = field(default_factory=dict)


class _UpstreamView(Mapping[str, Any]):
    """`nodes` as a template sees it: only the nodes upstream of the reader."""

    __slots__ = ("_allowed", "_states")

    def __init__(self, states: Mapping[str, _NodeState], allowed: frozenset[str]) -> None:
        self._states = states
        self._allowed = allowed

    def __getitem__(self, key: str) -> Any:
        if key not in self._allowed:
            raise KeyError(key)
        return self._states[key].public

    def __iter__(self) -> Iterator[str]:
        return iter(self._allowed)

    def __len__(self) -> int:
        return len(self._allowed)


class Execution:
    """One running graph. Iterate it for events; `cancel()` stops it; after the last event
    `status` and `records` hold the outcome."""

    def __init__(
        self,
        engine: Engine,
        graph: Graph,
        *,
        execution_id: str,
        params: dict[str, Any],
        secrets: dict[str, str],
        prior: dict[str, PriorNode],
        after_seq: int,
        trigger: dict[str, Any],
        valve: Valve | None = None,
    ) -> None:
        self.engine = engine
        self.valve = valve
        """Given by a consumer that may fall behind the nodes' output (the worker's store)."""
        self.graph = graph
        self.id = execution_id
        self.params = params
        self.secrets = secrets
        self.prior = prior
        self.trigger = trigger
        self.status: ExecutionStatus | None = None
        self.error: str | None = None
        self.records: dict[str, NodeRecord] = {}
        self.last_seq = after_seq
        self._log_bytes = 0
        self._log_capped = False
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._exhausted = False
        self._node_tasks: set[asyncio.Task[None]] = set()
        self._cleanups: set[asyncio.Task[None]] = set()
        self._states = {node_id: _NodeState() for node_id in graph.order}
        self._cancel_requested = False
        self._timed_out = False
        self._started_at = _now()
        self._base_context: dict[str, Any] | None = None
        self._env_values: dict[str, str] = {}
        self._mask = _Masker(secrets.values())
        self._workspace: Path | None = None

    # --- public -----------------------------------------------------------------------

    def __aiter__(self) -> Execution:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"loom-execution-{self.id}")
        return self

    async def __anext__(self) -> Event:
        if self._exhausted:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._exhausted = True
            assert self._task is not None
            await self._task  # re-raises what broke the run, if anything did
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        """Cancel the execution if it is still running and wait until it has ended."""
        if self._task is not None and not self._task.done():
            self.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> Execution:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def cancel(self) -> None:
        """Stop the execution: running processes are killed, pending nodes cancelled."""
        if self._cancel_requested:
            return
        self._cancel_requested = True
        for task in list(self._node_tasks):
            task.cancel()

    # --- the run ----------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self._queue.put_nowait(event)

    async def _run(self) -> None:
        graph = self.graph
        # This task's context (and its node tasks', copied from it) carries the ids into
        # every log record; DESIGN: ids bound where known.
        bind_log_context(execution_id=self.id, graph=graph.name)
        _log.debug("execution started")
        self._emit(ExecutionEvent(self.id, "running", self._started_at))
        try:
            self._prepare_context()
            timeout = graph.spec.timeout.total_seconds() if graph.spec.timeout else None
            async with asyncio.timeout(timeout):
                await self._schedule()
        except TimeoutError:
            self._timed_out = True
            assert graph.spec.timeout is not None
            self.error = f"the execution's timeout of {format_duration(graph.spec.timeout)} elapsed"
            await self._stop_nodes()
        except ExpressionError as exc:
            self.error = f"graph env: {exc}"
        finally:
            await self._stop_nodes()
            if self._cleanups:
                await asyncio.gather(*self._cleanups, return_exceptions=True)
            if self._workspace is not None:
                await asyncio.to_thread(shutil.rmtree, self._workspace, True)
        self.status = self._final_status()
        _log.debug("execution %s", self.status, extra={"error": self.error} if self.error else None)
        self._emit(ExecutionEvent(self.id, self.status, _now(), self.error))
        self._queue.put_nowait(None)

    def _final_status(self) -> ExecutionStatus:
        if self._timed_out:
            return "timed_out"
        if self._cancel_requested:
            return "cancelled"
        if self.error is not None:
            return "failed"
        for node_id, state in self._states.items():
            node = self.graph.nodes[node_id]
            if state.status in _FAILED and not node.spec.continue_on_failure:
                return "failed"
            if state.status == "cancelled":
                return "cancelled"
        return "succeeded"

    def _prepare_context(self) -> None:
        trigger = self.trigger
        self._base_context = {
            "params": self.params,
            "secrets": self.secrets,
            "execution": {
                "id": self.id,
                "graph": self.graph.name,
                "trigger": trigger.get("type", "manual"),
                "started_at": self._started_at.isoformat().replace("+00:00", "Z"),
            },
            "trigger": {
                "type": trigger.get("type", "manual"),
                "payload": trigger.get("payload"),
                "fire_time": trigger.get("fire_time"),
                "delivery_id": trigger.get("delivery_id"),
            },
        }
        env = {k: to_text(render_value(v, self._base_context)) for k, v in self.graph.env.items()}
        self._env_values = env
        self._base_context["env"] = env

    async def _schedule(self) -> None:
        graph = self.graph
        remaining = {node_id: len(graph.nodes[node_id].needs) for node_id in graph.order}
        done: asyncio.Queue[str] = asyncio.Queue()
        pending = set(graph.order)

        def finished(node_id: str) -> None:
            pending.discard(node_id)
            for child in graph.dependents[node_id]:
                remaining[child] -= 1
                if remaining[child] == 0:
                    launch(child)

        def launch(node_id: str) -> None:
            prior = self.prior.get(node_id)
            if prior is not None and prior.status in NODE_TERMINAL and prior.status != "cancelled":
                state = self._states[node_id]
                state.status = prior.status
                state.outputs = prior.outputs
                state.public = {"status": prior.status, "outputs": prior.outputs}
                finished(node_id)
                return
            task = asyncio.create_task(self._run_node(graph.nodes[node_id]))
            self._node_tasks.add(task)
            task.add_done_callback(self._node_tasks.discard)
            task.add_done_callback(lambda _: done.put_nowait(node_id))

        for node_id in [n for n in graph.order if remaining[n] == 0]:
            launch(node_id)
        while pending:
            if not self._node_tasks and done.empty():
                break  # only reachable when every remaining node was resumed as done
            node_id = await done.get()
            if node_id in pending:
                finished(node_id)

    async def _stop_nodes(self) -> None:
        tasks = list(self._node_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for node_id, state in self._states.items():
            if state.status == "pending":
                state.status = "cancelled"
                node = self.graph.nodes[node_id]
                record = self._record(node_id, node_id, None)
                record.status = "cancelled"
                self._emit(NodeEvent(self.id, node_id, node_id, None, "cancelled", 0, _now()))
                del node

    # --- one node ---------------------------------------------------------------------

    def _record(self, instance: str, name: str, index: int | None) -> NodeRecord:
        record = self.records.get(instance)
        if record is None:
            record = self.records[instance] = NodeRecord(instance, name, index)
        return record

    def _context(
        self, node: CompiledNode, item: Any = None, index: int | None = None
    ) -> dict[str, Any]:
        assert self._base_context is not None
        context = dict(self._base_context)
        context["nodes"] = _UpstreamView(self._states, self.graph.ancestors[node.id])
        if index is not None:
            context["item"] = item
            context["index"] = index
        return context

    def _status_functions(self, node: CompiledNode) -> dict[str, Any]:
        """GitHub Actions' status functions: `success()` looks at the needs (a skip
        propagates through them), `failure()` and `cancelled()` at every ancestor."""
        needs = [
            (self._states[n].status, self.graph.nodes[n].spec.continue_on_failure)
            for n in node.needs
        ]
        states = self._states
        ancestors = self.graph.ancestors[node.id]  # read only when asked: long chains

        def success() -> bool:
            return all(s == "succeeded" or (s in _FAILED and cof) for s, cof in needs)

        def failure() -> bool:
            return any(states[n].status in _FAILED for n in ancestors)

        def always() -> bool:
            return True

        def cancelled() -> bool:
            return self._cancel_requested or any(states[n].status == "cancelled" for n in ancestors)

        return {"success": success, "failure": failure, "always": always, "cancelled": cancelled}

    def _finish_node(self, node: CompiledNode, status: NodeStatus, outputs: Any) -> None:
        state = self._states[node.id]
        state.status = status
        state.outputs = outputs
        state.public = {"status": status, "outputs": outputs}

    async def _run_node(self, node: CompiledNode) -> None:
        try:
            if self._cancel_requested:
                raise _ExecutionCancelled
            functions = self._status_functions(node)
            if node.if_ is None:
                run = functions["success"]()
            else:
                # As in GitHub Actions, an `if` without a status function means
                # `success() && (if)`.
                implicit = not (node.if_.exprs[0].names & STATUS_FUNCTIONS)
                try:
                    run = (not implicit or functions["success"]()) and bool(
                        node.if_.render({**self._context(node), **functions})
                    )
                except ExpressionError as exc:
                    self._note(node.id, f"`if` failed: {exc}")
                    self._node_event(node, node.id, None, "failed", 0, error=f"`if`: {exc}")
                    self._finish_node(node, "failed", None)
                    return
            if not run:
                self._node_event(node, node.id, None, "skipped", 0)
                self._finish_node(node, "skipped", None)
                return
            if node.for_each is None:
                status, outputs = await self._run_instance(node, node.id, None, None)
                self._finish_node(node, status, outputs)
                return
            await self._run_fanout(node)
        except (asyncio.CancelledError, _ExecutionCancelled):
            if self._states[node.id].status == "pending":
                self._node_event(node, node.id, None, "cancelled", 0)
                self._finish_node(node, "cancelled", None)
        except Exception as exc:  # never leave a node pending: the execution would hang
            _log.exception("node failed unexpectedly")
            if self._states[node.id].status == "pending":
                error = f"internal error: {type(exc).__name__}: {exc}"
                self._node_event(node, node.id, None, "failed", 0, error=error)
                self._finish_node(node, "failed", None)

    async def _run_fanout(self, node: CompiledNode) -> None:
        try:
            items = render_value(node.for_each, self._context(node))
        except ExpressionError as exc:
            items = exc
        if not isinstance(items, list):
            error = (
                f"for_each: {items}"
                if isinstance(items, ExpressionError)
                else (f"for_each must give a list, got {type(items).__name__}")
            )
            self._note(node.id, error)
            self._node_event(node, node.id, None, "failed", 0, error=error, fanout=True)
            self._finish_node(node, "failed", None)
            return
        limit = asyncio.Semaphore(node.spec.max_parallel or len(items) or 1)

        async def one(index: int, item: Any) -> tuple[NodeStatus, Any]:
            async with limit:
                return await self._run_instance(node, f"{node.id}[{index}]", index, item)

        tasks = [asyncio.create_task(one(i, item)) for i, item in enumerate(items)]
        try:
            if tasks:
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            # Let every instance end and say so before the fan-out as a whole does.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        results: list[tuple[NodeStatus, Any]] = []
        for index, task in enumerate(tasks):
            if task.cancelled() or task.exception() is not None:
                instance = f"{node.id}[{index}]"
                if self.records.get(instance) is None or self.records[instance].status in (
                    "pending",
                    "running",
                ):
                    status: NodeStatus = "timed_out" if self._timed_out else "cancelled"
                    self._node_event(node, instance, index, status, 0)
                results.append(("cancelled", None))
            else:
                results.append(task.result())
        statuses = [status for status, _ in results]
        if all(s == "succeeded" for s in statuses):
            status = "succeeded"
        elif any(s in _FAILED for s in statuses):
            status = "failed"
        elif all(s == "skipped" for s in statuses):
            status = "skipped"
        else:
            status = "cancelled"
        outputs = [out for _, out in results]
        self._node_event(node, node.id, None, status, 0, outputs=outputs, fanout=True)
        self._finish_node(node, status, outputs)

    async def _run_instance(
        self, node: CompiledNode, instance: str, index: int | None, item: Any
    ) -> tuple[NodeStatus, Any]:
        bind_log_context(node=instance)  # node tasks and gather's children each own a context
        prior = self.prior.get(instance)
        attempt = 0
        if prior is not None:
            if prior.status in NODE_TERMINAL and prior.status != "cancelled":
                record = self._record(instance, node.id, index)
                record.status, record.outputs, record.attempt = (
                    prior.status,
                    prior.outputs,
                    prior.attempt,
                )
                return prior.status, prior.outputs
            attempt = prior.attempt
        # A resumed node keeps the tries it had left, and always gets at least one.
        tries = max(1, node.retries + 1 - attempt)
        for try_number in range(1, tries + 1):
            attempt += 1
            status, outputs, exit_code, error, retryable = await self._attempt(
                node, instance, index, item, attempt
            )
            last = try_number == tries or not retryable or status == "cancelled"
            _log.debug("attempt %d %s", attempt, status, extra={"error": error} if error else None)
            retry_in: float | None = None
            if not (status == "succeeded" or last):
                cap = min(node.retry_max_delay, node.retry_delay * 2 ** (try_number - 1))
                retry_in = random.uniform(0, cap)  # exponential backoff, full jitter
            self._node_event(
                node,
                instance,
                index,
                status,
                attempt,
                exit_code=exit_code,
                error=error,
                outputs=outputs,
                retry_in=retry_in,
            )
            if retry_in is None:
                return status, outputs
            self._note(
                instance, f"attempt {attempt} {status}: {error}; retrying in {retry_in:.2f}s"
            )
            await asyncio.sleep(retry_in)
        raise AssertionError("unreachable: the last try returns")

    async def _attempt(
        self, node: CompiledNode, instance: str, index: int | None, item: Any, attempt: int
    ) -> tuple[NodeStatus, Any, int | None, str | None, bool]:
        """One attempt: (status, outputs, exit code, error, retryable)."""
        takes_slot = node.kind in ("run", "python")
        if takes_slot:
            await self.engine._slots.acquire()
        workdir: Path | None = None
        try:
            self._node_event(node, instance, index, "running", attempt)
            log = self._sink(instance)
            try:
                if node.kind == "run":
                    workdir = self._workdir(instance, attempt)
                call = NodeCall(
                    self.id,
                    instance,
                    attempt,
                    self._node_env(node, item, index),
                    workdir,
                    self.valve,
                )
                async with asyncio.timeout(node.timeout):
                    result = await self._execute(node, call, item, index, log)
            except TimeoutError:
                error = f"timed out after {node.timeout:g}s"
                self._note(instance, error)
                return "timed_out", None, None, error, True
            except NodeFailed as exc:
                return "failed", exc.outputs or None, exc.exit_code, exc.error, exc.retryable
            except ExpressionError as exc:
                self._note(instance, str(exc))
                return "failed", None, None, str(exc), False
            except asyncio.CancelledError:
                if self._timed_out:
                    return "timed_out", None, None, "the execution timed out", False
                return "cancelled", None, None, "cancelled", False
            except Exception as exc:  # a bug or an unexpected OS error: fail, never hang
                _log.exception("node attempt failed unexpectedly")
                error = f"internal error: {type(exc).__name__}: {exc}"
                self._note(instance, error)
                return "failed", None, None, error, False
            return "succeeded", result.outputs, result.exit_code, None, False
        finally:
            if takes_slot:
                self.engine._slots.release()
            if workdir is not None:
                # In the background: awaiting here would let the next node take the slot
                # before this one's status is out, and events would show more than `slots`.
                cleanup = asyncio.create_task(asyncio.to_thread(shutil.rmtree, workdir, True))
                self._cleanups.add(cleanup)
                cleanup.add_done_callback(self._cleanups.discard)

    def _node_env(self, node: CompiledNode, item: Any, index: int | None) -> dict[str, str]:
        if not node.env:
            return self._env_values
        rendered = render_value(node.env, self._context(node, item, index))
        return {**self._env_values, **{k: to_text(v) for k, v in rendered.items()}}

    async def _execute(
        self, node: CompiledNode, call: NodeCall, item: Any, index: int | None, log: Any
    ) -> Any:
        engine = self.engine
        if node.kind == "run":
            script, extra = render_shell(node.body, self._context(node, item, index))
            return await engine.shell.run(
                call, script, extra_env=extra, shell=node.spec.shell, log=log
            )
        if node.kind == "python":
            kwargs = render_value(node.body, self._context(node, item, index)) if node.body else {}
            assert node.spec.python is not None
            return await engine.python.call(node.spec.python, kwargs, call=call, log=log)
        if node.kind == "http":
            spec = render_value(node.body, self._context(node, item, index))
            return await engine.http.request(spec, call=call, log=log)
        if node.kind == "sql":
            spec = render_sql(node.body, self._context(node, item, index))
            dsn = self.secrets.get(spec["connection"])
            if dsn is None:
                raise NodeFailed(f"secret '{spec['connection']}' is not available", retryable=False)
            return await engine.sql.query(spec, dsn=dsn, call=call, log=log)
        if node.kind == "graph" and engine.graphs is not None:
            given = render_value(node.body, self._context(node, item, index)) if node.body else {}
            assert node.spec.graph is not None
            return await engine.graphs.run(call, node.spec.graph, given or {}, log=log)
        raise NodeFailed(
            f"`{node.kind}` nodes run in the worker service (loom serve worker), "
            "which has the database they need; `loom run` cannot run them",
            retryable=False,
        )

    def _workdir(self, instance: str, attempt: int) -> Path:
        if self._workspace is None:
            root = self.engine._workspace
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            self._workspace = Path(tempfile.mkdtemp(prefix=f"loom-{self.id[:8]}-", dir=root))
        # mkdtemp: `build[0]` and `build_0_` must not share a directory.
        prefix = f"{re.sub(r'[^A-Za-z0-9_-]', '_', instance)}-{attempt}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self._workspace))

    # --- events and logs --------------------------------------------------------------

    def _node_event(
        self,
        node: CompiledNode,
        instance: str,
        index: int | None,
        status: NodeStatus,
        attempt: int,
        *,
        exit_code: int | None = None,
        error: str | None = None,
        outputs: Any = None,
        retry_in: float | None = None,
        fanout: bool = False,
    ) -> None:
        ts = _now()
        if self._mask.active:  # what is shown and stored never holds a secret
            error = self._mask(error) if error else error
            outputs = self._mask.value(outputs)
        record = self._record(instance, node.id, index)
        record.status, record.attempt, record.fanout = status, attempt, fanout
        if status == "running":
            record.started_at, record.finished_at = ts, None
            record.exit_code = record.error = record.outputs = None
        elif status in NODE_TERMINAL:
            record.finished_at = ts
            record.exit_code, record.error, record.outputs = exit_code, error, outputs
        self._emit(
            NodeEvent(
                self.id,
                instance,
                node.id,
                index,
                status,
                attempt,
                ts,
                exit_code,
                error,
                outputs,
                retry_in,
                fanout,
            )
        )

    def _note(self, instance: str, text: str) -> None:
        self._log(instance, "loom", text)

    def _sink(self, instance: str) -> Any:
        def sink(stream: str, text: str) -> None:
            self._log(instance, stream, text)

        return sink

    def _log(self, instance: str, stream: str, text: str) -> None:
        if self._log_capped:
            return
        text = self._mask(text)
        size = len(text)
        if size > MAX_LINE_BYTES // 4:
            size = len(text.encode("utf-8", "replace"))
        if self._log_bytes + size > self.engine.max_log_bytes:
            self._log_capped = True
            text = (
                f"log limit of {self.engine.max_log_bytes} bytes reached: "
                "further lines of this execution are dropped"
            )
            stream = "loom"
        self._log_bytes += size
        ts = _now()
        for chunk in _split_line(text) if size > MAX_LINE_BYTES else (text,):
            self.last_seq += 1
            self._emit(LogEvent(self.id, self.last_seq, instance, stream, ts, chunk))


class _Masker:
    """Replaces every secret value with `***` (longest first, so overlaps mask fully).
    A multi-line secret (a PEM key) is also masked line by line, since logs are lines."""

    def __init__(self, values: Any) -> None:
        pieces: set[str] = set()
        for value in values:
            if isinstance(value, str) and value:
                pieces.add(value)
                pieces.update(line.strip() for line in value.splitlines() if len(line.strip()) >= 4)
        secrets = sorted(pieces, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(s) for s in secrets)) if secrets else None

    @property
    def active(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub("***", text)

    def value(self, value: Any) -> Any:
        """`value` with every string inside it masked."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value


def _split_line(text: str) -> list[str]:
    """Split `text` into pieces of at most 16 KiB of UTF-8, never inside a character."""
    data = text.encode("utf-8", "replace")
    pieces: list[str] = []
    start = 0
    while start < len(data):
        end = min(start + MAX_LINE_BYTES, len(data))
        while end < len(data) and (data[end] & 0xC0) == 0x80:
            end -= 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces
