"""Group commit: concurrent submissions share batches; errors reach the right callers."""

from __future__ import annotations

import asyncio

import pytest

from loom_runtime import GroupCommit


async def test_submissions_made_during_a_commit_share_the_next_batch() -> None:
    batches: list[list[int]] = []

    async def commit(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(commit, max_weight=100)

    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0.001)  # its commit is under way
    results = await asyncio.gather(first, *(group.submit(i) for i in range(1, 7)))

    assert results == [i * 10 for i in range(7)]
    assert batches == [[0], [1, 2, 3, 4, 5, 6]]  # the first alone, the rest together


async def test_a_batch_holds_at_most_max_weight_and_at_least_one_item() -> None:
    batches: list[list[int]] = []

    async def commit(items: list[int]) -> list[int | Exception]:
        batches.append(items)
        return items  # type: ignore[return-value]

    group: GroupCommit[int, int] = GroupCommit(commit, max_weight=5, weight=lambda n: n)

    await asyncio.gather(*(group.submit(n) for n in (1, 3, 3, 9, 1)))

    assert batches == [[1, 3], [3], [9], [1]]  # in order; 9 is over the limit, alone


async def test_an_item_error_reaches_its_submitter_and_a_batch_error_reaches_all() -> None:
    async def commit(items: list[int]) -> list[int | Exception]:
        if 99 in items:
            raise RuntimeError("the database went away")
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    group: GroupCommit[int, int] = GroupCommit(commit, max_weight=100)

    assert await group.submit(1) == 1
    with pytest.raises(ValueError, match="bad -1"):
        await group.submit(-1)
    with pytest.raises(RuntimeError, match="went away"):
        await group.submit(99)
    assert await group.submit(2) == 2  # the drain goes on after a failed batch
