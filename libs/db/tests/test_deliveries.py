"""Webhook deliveries on both databases: recorded, listed newest first, the last N kept."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from loom_db.database import Database
from loom_db.deliveries import DELIVERIES_KEPT, list_deliveries, record_delivery
from loom_db.models import webhook_deliveries


async def test_a_delivery_is_recorded_with_its_outcome(db: Database) -> None:
    async with db.transaction() as conn:
        await record_delivery(
            conn,
            graph="deploy",
            hook="github",
            delivery_id="d-1",
            status_code=202,
            outcome="accepted",
            execution_id="e-1",
        )
        await record_delivery(
            conn,
            graph="deploy",
            hook="github",
            delivery_id="d-2",
            status_code=200,
            outcome="skipped",
            detail="event 'issues' is not in [push]",
        )
    async with db.read() as conn:
        items, cursor = await list_deliveries(conn, "deploy")
    assert cursor is None
    assert [(d.delivery_id, d.status_code, d.outcome, d.detail, d.execution_id) for d in items] == [
        ("d-2", 200, "skipped", "event 'issues' is not in [push]", None),
        ("d-1", 202, "accepted", None, "e-1"),
    ]
    assert items[0].received_at >= items[1].received_at
    assert items[0].received_at.tzinfo is not None


async def test_only_the_newest_deliveries_of_each_hook_are_kept(db: Database) -> None:
    for i in range(12):
        async with db.transaction() as conn:
            await record_delivery(
                conn,
                graph="deploy",
                hook="github",
                delivery_id=f"gh-{i}",
                status_code=202,
                outcome="accepted",
                keep=5,
            )
            if i < 3:
                await record_delivery(
                    conn,
                    graph="deploy",
                    hook="gitlab",
                    delivery_id=f"gl-{i}",
                    status_code=401,
                    outcome="unauthorized",
                    keep=5,
                )
    async with db.read() as conn:
        github, _ = await list_deliveries(conn, "deploy", hook="github")
        gitlab, _ = await list_deliveries(conn, "deploy", hook="gitlab")
        both, _ = await list_deliveries(conn, "deploy")
    assert [d.delivery_id for d in github] == [f"gh-{i}" for i in range(11, 6, -1)]
    # Trimming one hook never touches another's.
    assert [d.delivery_id for d in gitlab] == ["gl-2", "gl-1", "gl-0"]
    assert len(both) == 8


async def test_concurrent_deliveries_stay_within_the_stated_bound(db: Database) -> None:
    """After concurrent writers, at most keep + (writers - 1) rows; the next write trims
    back to keep."""
    keep, writers = 10, 8

    async def deliver(i: int) -> None:
        async with db.transaction() as conn:
            await record_delivery(
                conn,
                graph="g",
                hook="default",
                delivery_id=str(i),
                status_code=202,
                outcome="accepted",
                keep=keep,
            )

    for round_ in range(3):
        await asyncio.gather(*(deliver(round_ * 100 + i) for i in range(writers)))
        async with db.read() as conn:
            rows = (
                await conn.execute(select(func.count()).select_from(webhook_deliveries))
            ).scalar_one()
        assert rows <= keep + writers - 1
    await deliver(999)
    async with db.read() as conn:
        items, _ = await list_deliveries(conn, "g", limit=100)
    assert len(items) == keep
    assert items[0].delivery_id == "999"


async def test_deliveries_page_newest_first_without_skips_or_repeats(db: Database) -> None:
    async with db.transaction() as conn:
        for i in range(7):
            await record_delivery(
                conn,
                graph="deploy",
                hook="default",
                delivery_id=str(i),
                status_code=202,
                outcome="accepted",
            )
        await record_delivery(
            conn,
            graph="other",
            hook="default",
            delivery_id="x",
            status_code=202,
            outcome="accepted",
        )
    seen: list[str | None] = []
    cursor: str | None = None
    while True:
        async with db.read() as conn:
            items, cursor = await list_deliveries(conn, "deploy", limit=3, cursor=cursor)
        seen += [d.delivery_id for d in items]
        if len(seen) == 3:  # a delivery arriving between pages belongs to the first page
            async with db.transaction() as conn:
                await record_delivery(
                    conn,
                    graph="deploy",
                    hook="default",
                    delivery_id="late",
                    status_code=202,
                    outcome="accepted",
                )
        if cursor is None:
            break
    assert seen == ["6", "5", "4", "3", "2", "1", "0"]


async def test_bad_cursors_and_limits_are_refused(db: Database) -> None:
    async with db.read() as conn:
        for cursor in ("abc", "-1", "1.5", ""):
            with pytest.raises(ValueError, match="cursor"):
                await list_deliveries(conn, "deploy", cursor=cursor)
        with pytest.raises(ValueError, match="limit"):
            await list_deliveries(conn, "deploy", limit=0)
    assert DELIVERIES_KEPT == 1_000
