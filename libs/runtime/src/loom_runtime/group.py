"""Group commit: what is submitted while one batch is being stored is stored together in
the next, so a service answering many concurrent requests (webhook deliveries, timer
ticks) pays a transaction's fixed cost once per batch, not once per request. The first
item after a quiet moment is stored at once, alone: batching only happens under load.

Each submitter waits for the commit of its own item. The drain runs in a task of its
own, so a submitter that is cancelled (a client went away) does not take the others'
commit with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Job(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class GroupCommit(Generic[T, R]):
    """`await group.submit(item)` returns what `commit` gave for it. `commit(items)`
    stores a batch and returns one result per item, in order (an `Exception` in place of
    a result is raised to that item's submitter alone); what `commit` raises goes to
    every submitter of the batch. A batch holds items whose `weight` adds up to at most
    `max_weight` (one item at least)."""

    def __init__(
        self,
        commit: Callable[[list[T]], Awaitable[list[R | Exception]]],
        *,
        max_weight: int,
        weight: Callable[[T], int] = lambda _: 1,
    ) -> None:
        self._commit = commit
        self._max_weight = max_weight
        self._weight = weight
        self._pending: list[_Job[T, R]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        job: _Job[T, R] = _Job(item, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await job.future

    def _take(self) -> list[_Job[T, R]]:
        batch: list[_Job[T, R]] = []
        total = 0
        while self._pending:
            weight = self._weight(self._pending[0].item)
            if batch and total + weight > self._max_weight:
                break
            batch.append(self._pending.pop(0))
            total += weight
        return batch

    async def _drain(self) -> None:
        while self._pending:
            batch = self._take()
            try:
                results = await self._commit([job.item for job in batch])
            except BaseException as exc:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for job, result in zip(batch, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
