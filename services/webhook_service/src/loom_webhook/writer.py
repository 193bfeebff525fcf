"""Group commit: the deliveries that arrive while one transaction commits are stored
together in the next, with the same few statements whatever their number.

A webhook delivery's answer waits for its commit (a 202 is never sent for an execution
that was not stored). One transaction per delivery would spend most of the service's CPU
on statement overhead; here (`loom_runtime.GroupCommit`) the pending deliveries' executions,
outbox rows and delivery-log lines are written with multi-row statements in ONE
transaction, and each delivery is answered from it. The first delivery after a quiet
moment is committed at once, alone: batching only happens under load, where it pays.

Each execution is created only if its graph is still enabled at the version the hook was
read from (a shared lock on the graph's row: a pause commits before or after the batch,
never in between); otherwise the delivery learns that its hook is `GONE` (paused or
deleted: 404) or `STALE` (a new version: read the hook again).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from loom_db import Database, deliveries, executions, graphs
from loom_db.deliveries import DELIVERIES_KEPT, NewDelivery
from loom_db.executions import NewExecution
from loom_runtime import GroupCommit

__all__ = ["GONE", "STALE", "Accepted", "Creation", "DeliveryWriter"]

GONE: Literal["gone"] = "gone"
STALE: Literal["stale"] = "stale"
MAX_BATCH = 200
"""Deliveries per transaction at most."""
TRIM_EVERY = 100
"""Deliveries of a hook between two trims of its log (so a log holds at most
`DELIVERIES_KEPT` plus this many, per replica)."""


@dataclass(frozen=True, slots=True)
class Creation:
    """An execution to create for a delivery, and the delivery's log line."""

    execution: NewExecution
    hook: str
    delivery_id: str | None


@dataclass(frozen=True, slots=True)
class Accepted:
    execution_id: str
    created: bool


Outcome = Accepted | Literal["gone", "stale"] | None


class DeliveryWriter:
    """Stores `Creation`s and log-only `NewDelivery`s in shared transactions."""

    def __init__(self, database: Database, *, max_batch: int = MAX_BATCH) -> None:
        self._database = database
        self._group: GroupCommit[Creation | NewDelivery, Outcome] = GroupCommit(
            self._commit, max_weight=max_batch
        )
        self._since_trim: Counter[tuple[str, str]] = Counter()

    async def create(self, creation: Creation) -> Accepted | Literal["gone", "stale"]:
        """Store the execution and its log line: `Accepted(id, created)` (`created`
        False for a delivery id stored before), or `GONE` / `STALE`. Raises what the
        database raises (`DatabaseUnavailable`, ...): nothing of the batch was stored."""
        outcome = await self._group.submit(creation)
        assert outcome is not None
        return outcome

    async def log(self, delivery: NewDelivery) -> None:
        """Store a log line of an outcome without an execution (401, skipped, ...)."""
        await self._group.submit(delivery)

    async def _commit(self, items: list[Creation | NewDelivery]) -> list[Outcome | Exception]:
        outcomes: list[Outcome | Exception] = [None] * len(items)
        logs: list[NewDelivery] = []
        creations = [(i, item) for i, item in enumerate(items) if isinstance(item, Creation)]
        async with self._database.transaction() as conn:
            states: dict[str, tuple[int, bool]] = {}
            if creations:
                states = await graphs.lock_states(conn, (i.execution.graph for _, i in creations))
            ready: list[tuple[int, Creation]] = []
            for index, item in creations:
                state = states.get(item.execution.graph)
                if state is None or not state[1]:
                    outcomes[index] = GONE
                elif state[0] != item.execution.graph_version:
                    outcomes[index] = STALE
                else:
                    ready.append((index, item))
            answers = await executions.create_executions(
                conn, [item.execution for _, item in ready]
            )
            for (index, item), (record, created) in zip(ready, answers, strict=True):
                execution_id = record.id
                outcomes[index] = Accepted(execution_id, created)
                logs.append(
                    NewDelivery(
                        graph=item.execution.graph,
                        hook=item.hook,
                        delivery_id=item.delivery_id,
                        status_code=202 if created else 200,
                        outcome="accepted" if created else "duplicate",
                        execution_id=execution_id,
                    )
                )
            logs.extend(item for item in items if isinstance(item, NewDelivery))
            await deliveries.record_deliveries(conn, logs)
            for graph, hook in self._due_for_trim(logs):
                await deliveries.trim_deliveries(conn, graph, hook, DELIVERIES_KEPT)
        if any(isinstance(o, Accepted) and o.created for o in outcomes):
            self._database.notify_committed()
        return outcomes

    def _due_for_trim(self, logs: list[NewDelivery]) -> list[tuple[str, str]]:
        due = []
        for key, count in Counter((d.graph, d.hook) for d in logs).items():
            self._since_trim[key] += count
            if self._since_trim[key] >= TRIM_EVERY:
                self._since_trim[key] = 0
                due.append(key)
        return sorted(due)
