"""Log lines on both databases: append in batches, read back in seq order, page by page."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.database import Database
from loom_db.errors import Conflict, NotFound
from loom_db.logs import LogLineIn, append_logs, last_seq, read_logs
from loom_db.models import executions

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def add_execution(conn: AsyncConnection, execution_id: str) -> None:
    await conn.execute(
        insert(executions).values(
            id=execution_id,
            graph="g",
            graph_version=1,
            status="running",
            params={},
            trigger_type="manual",
            trigger_info={},
            created_at=T0,
        )
    )


def lines(first: int, count: int, *, nodes: tuple[str, ...] = ("build",)) -> list[LogLineIn]:
    return [
        LogLineIn(
            seq,
            nodes[seq % len(nodes)],
            "stderr" if seq % 7 == 0 else "stdout",
            T0 + timedelta(microseconds=seq),
            f"line {seq} " + "x" * (seq % 50),
        )
        for seq in range(first, first + count)
    ]


@pytest.mark.slow
async def test_100k_lines_in_batches_read_back_in_order_without_gaps(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn, "e1")
        await add_execution(conn, "other")
    total, batch = 100_000, 500
    for first in range(1, total + 1, batch):
        async with db.transaction() as conn:
            await append_logs(conn, "e1", lines(first, batch))
            if first == 1:
                await append_logs(conn, "other", lines(1, 10))

    seen: list[int] = []
    after = 0
    async with db.read() as conn:
        assert await last_seq(conn, "e1") == total
        while page := await read_logs(conn, "e1", after=after, limit=997):
            seen.extend(line.seq for line in page)
            after = page[-1].seq
    assert seen == list(range(1, total + 1))

    async with db.read() as conn:
        [line] = await read_logs(conn, "e1", after=41_999, limit=1)
    assert line == lines(42_000, 1)[0]  # every field round-trips, ts as aware UTC


async def test_the_node_filter_pages_through_one_node_only(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn, "e1")
        await append_logs(conn, "e1", lines(1, 300, nodes=("build[0]", "build[1]", "test")))
    got: list[int] = []
    after = 0
    async with db.read() as conn:
        while page := await read_logs(conn, "e1", after=after, node="build[1]", limit=40):
            assert {line.node for line in page} == {"build[1]"}
            got.extend(line.seq for line in page)
            after = page[-1].seq
    assert got == [seq for seq in range(1, 301) if seq % 3 == 1]


async def test_a_seq_stored_twice_is_a_conflict_and_the_batch_is_refused(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn, "e1")
        await append_logs(conn, "e1", lines(1, 10))
    with pytest.raises(Conflict):
        async with db.transaction() as conn:
            await append_logs(conn, "e1", lines(11, 5) + lines(10, 1))
    async with db.read() as conn:
        assert await last_seq(conn, "e1") == 10
        assert len(await read_logs(conn, "e1")) == 10


async def test_lines_of_an_unknown_execution_are_not_found(db: Database) -> None:
    with pytest.raises(NotFound):
        async with db.transaction() as conn:
            await append_logs(conn, "nope", lines(1, 3))


async def test_a_naive_timestamp_is_refused(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn, "e1")
    with pytest.raises(ValueError, match="naive datetime"):
        async with db.transaction() as conn:
            await append_logs(conn, "e1", [LogLineIn(1, "n", "stdout", datetime(2026, 1, 1), "x")])


async def test_nul_characters_are_stored_as_replacement_characters(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn, "e1")
        await append_logs(conn, "e1", [LogLineIn(1, "n", "stdout", T0, "a\x00b")])
    async with db.read() as conn:
        [line] = await read_logs(conn, "e1")
    assert line.text == "a\ufffdb"


async def test_an_execution_without_lines_has_last_seq_0_and_an_empty_page(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn, "e1")
        await append_logs(conn, "e1", [])
    async with db.read() as conn:
        assert await last_seq(conn, "e1") == 0
        assert await read_logs(conn, "e1") == []


async def test_a_naive_timestamp_is_refused_before_anything_is_written(db: Database) -> None:
    async with db.transaction() as conn:
        execution_id = "exec-naive-ts"
        await add_execution(conn, execution_id)
        good = LogLineIn(1, "a", "stdout", datetime.now(UTC), "ok")
        naive = LogLineIn(2, "a", "stdout", datetime.now(), "naive")
        with pytest.raises(ValueError, match="naive"):
            await append_logs(conn, execution_id, [good, naive])
        await append_logs(conn, execution_id, [good])  # the transaction is still usable
        assert [line.text for line in await read_logs(conn, execution_id)] == ["ok"]
        with pytest.raises(ValueError, match="limit"):
            await read_logs(conn, execution_id, limit=-1)
