"""Node runs on both databases: upserts per attempt, the latest attempt per instance, and
the prior states a resumed execution starts from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_db.database import Database
from loom_db.models import executions
from loom_db.node_runs import (
    NodeChange,
    PriorState,
    all_node_runs,
    latest_node_runs,
    prior_states,
    record_node,
    record_nodes,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def add_execution(conn: AsyncConnection, execution_id: str = "e1") -> None:
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


async def test_a_status_change_updates_its_attempt_and_keeps_the_start(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn)
        await record_node(
            conn, "e1", node="test", name="test", index=None, attempt=1, status="running",
            started_at=at(1),
        )  # fmt: skip
    async with db.transaction() as conn:
        await record_node(
            conn, "e1", node="test", name="test", index=None, attempt=1, status="succeeded",
            finished_at=at(2), exit_code=0, outputs={"version": "1.2", "n": [1, 2]},
        )  # fmt: skip
    async with db.read() as conn:
        [run] = await all_node_runs(conn, "e1")
    assert (run.node, run.attempt, run.status) == ("test", 1, "succeeded")
    assert (run.started_at, run.finished_at) == (at(1), at(2))
    assert (run.exit_code, run.outputs, run.error) == (0, {"version": "1.2", "n": [1, 2]}, None)


async def test_each_attempt_is_a_row_and_the_latest_one_counts(db: Database) -> None:
    changes = [
        NodeChange("a", "a", None, 1, "running", started_at=at(1)),
        NodeChange("b", "b", None, 1, "running", started_at=at(2)),
        NodeChange("c", "c", None, 1, "running", started_at=at(3)),
        NodeChange("b", "b", None, 1, "failed", finished_at=at(4), exit_code=2, error="exit 2"),
        NodeChange("a", "a", None, 1, "succeeded", finished_at=at(5), exit_code=0),
        NodeChange("b", "b", None, 2, "running", started_at=at(6)),
    ]
    async with db.transaction() as conn:
        await add_execution(conn)
        await record_nodes(conn, "e1", changes)
    async with db.read() as conn:
        latest = await latest_node_runs(conn, "e1")
        every = await all_node_runs(conn, "e1")
    # instances in the order they first started, b's retry does not move it to the end
    assert [(r.node, r.attempt, r.status) for r in latest] == [
        ("a", 1, "succeeded"),
        ("b", 2, "running"),
        ("c", 1, "running"),
    ]
    assert [(r.node, r.attempt, r.status) for r in every] == [
        ("a", 1, "succeeded"),
        ("b", 1, "failed"),
        ("b", 2, "running"),
        ("c", 1, "running"),
    ]
    failed = every[1]
    assert (failed.started_at, failed.finished_at, failed.error) == (at(2), at(4), "exit 2")


async def test_a_later_change_keeps_the_child_execution_and_start(db: Database) -> None:
    """A `graph` node names its child when it starts; its end need not repeat it."""
    async with db.transaction() as conn:
        await add_execution(conn)
        await record_node(conn, "e1", node="sub", name="sub", index=None, attempt=1,
                          status="running", started_at=at(1), child_execution_id="c1")  # fmt: skip
    async with db.transaction() as conn:
        await record_node(conn, "e1", node="sub", name="sub", index=None, attempt=1,
                          status="failed", finished_at=at(2), outputs={"status": "failed"},
                          error="the child execution failed")  # fmt: skip
    async with db.read() as conn:
        [run] = await latest_node_runs(conn, "e1")
    assert (run.status, run.outputs, run.error) == (
        "failed",
        {"status": "failed"},
        "the child execution failed",
    )
    assert (run.started_at, run.finished_at, run.child_execution_id) == (at(1), at(2), "c1")


async def test_prior_states_give_each_instance_its_latest_attempt(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn)
        await add_execution(conn, "other")
        await record_nodes(
            conn,
            "e1",
            [
                NodeChange("config", "config", None, 1, "succeeded", at(1), at(2), None,
                           {"body": {"version": "7"}}),
                NodeChange("build[0]", "build", 0, 1, "succeeded", at(3), at(4), 0, {"a": "b"}),
                NodeChange("build[1]", "build", 1, 1, "failed", at(3), at(4), 1, None, "exit 1"),
                NodeChange("build[1]", "build", 1, 2, "running", at(5)),
                NodeChange("deploy", "deploy", None, 0, "skipped"),
            ],
        )  # fmt: skip
        await record_node(conn, "other", node="x", name="x", index=None, attempt=1,
                          status="running")  # fmt: skip
    async with db.read() as conn:
        prior = await prior_states(conn, "e1")
        latest = await latest_node_runs(conn, "e1")
    assert prior == {
        "config": PriorState("succeeded", {"body": {"version": "7"}}, 1),
        "build[0]": PriorState("succeeded", {"a": "b"}, 1),
        "build[1]": PriorState("running", None, 2),
        "deploy": PriorState("skipped", None, 0),
    }
    assert [(r.node, r.name, r.index) for r in latest] == [
        ("config", "config", None),
        ("build[0]", "build", 0),
        ("build[1]", "build", 1),
        ("deploy", "deploy", None),
    ]


async def test_an_execution_without_node_runs_has_none(db: Database) -> None:
    async with db.transaction() as conn:
        await add_execution(conn)
        await record_nodes(conn, "e1", [])
    async with db.read() as conn:
        assert await latest_node_runs(conn, "e1") == []
        assert await all_node_runs(conn, "e1") == []
        assert await prior_states(conn, "e1") == {}
