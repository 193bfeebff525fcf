"""The audit log on both databases: entries in the caller's transaction, newest first,
filtered, paged."""

from __future__ import annotations

import pytest

from loom_db.audit import SYSTEM_ACTOR, list_audit, record
from loom_db.database import Database


async def test_entries_are_listed_newest_first_with_their_detail(db: Database) -> None:
    async with db.transaction() as conn:
        await record(
            conn,
            actor="alice",
            action="graph.create",
            object_type="graph",
            object_id="deploy",
            detail={"version": 1},
        )
        await record(conn, actor=None, action="secret.rotate", object_type="secret", object_id="*")
    async with db.read() as conn:
        items, cursor = await list_audit(conn)
    assert cursor is None
    assert [(e.actor, e.action, e.object_type, e.object_id, e.detail) for e in items] == [
        (SYSTEM_ACTOR, "secret.rotate", "secret", "*", {}),
        ("alice", "graph.create", "graph", "deploy", {"version": 1}),
    ]
    assert items[0].ts >= items[1].ts and items[0].ts.tzinfo is not None


async def test_an_entry_exists_only_if_its_transaction_commits(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await record(conn, actor="a", action="graph.delete", object_type="graph", object_id="x")
            raise RuntimeError("the change failed")
    async with db.read() as conn:
        assert (await list_audit(conn))[0] == []


async def test_filters_by_actor_and_object(db: Database) -> None:
    async with db.transaction() as conn:
        for actor, object_type, object_id in [
            ("alice", "graph", "a"),
            ("bob", "graph", "a"),
            ("alice", "graph", "b"),
            ("alice", "secret", "a"),
        ]:
            await record(
                conn,
                actor=actor,
                action=f"{object_type}.update",
                object_type=object_type,
                object_id=object_id,
            )
    async with db.read() as conn:
        by_alice, _ = await list_audit(conn, actor="alice")
        graph_a, _ = await list_audit(conn, object_type="graph", object_id="a")
        alice_graphs, _ = await list_audit(conn, actor="alice", object_type="graph")
    assert [(e.object_type, e.object_id) for e in by_alice] == [
        ("secret", "a"),
        ("graph", "b"),
        ("graph", "a"),
    ]
    assert [e.actor for e in graph_a] == ["bob", "alice"]
    assert [e.object_id for e in alice_graphs] == ["b", "a"]


async def test_pages_neither_skip_nor_repeat_while_entries_are_written(db: Database) -> None:
    async with db.transaction() as conn:
        for i in range(10):
            await record(conn, actor="a", action="x.y", object_type="x", object_id=str(i))
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        async with db.read() as conn:
            items, cursor = await list_audit(conn, limit=4, cursor=cursor)
        pages += 1
        seen += [e.object_id for e in items]
        async with db.transaction() as conn:  # newer entries land before the first page
            await record(conn, actor="a", action="x.y", object_type="x", object_id="new")
        if cursor is None:
            break
    assert seen == [str(i) for i in range(9, -1, -1)]
    assert pages == 3


async def test_bad_cursors_and_limits_are_refused(db: Database) -> None:
    async with db.read() as conn:
        with pytest.raises(ValueError, match="cursor"):
            await list_audit(conn, cursor="'; drop table audit_log; --")
        with pytest.raises(ValueError, match="limit"):
            await list_audit(conn, limit=0)
