"""Graphs on both databases: apply and its versions, the trigger index, enable/disable,
delete, listing, and the graph.changed messages and audit entries they write."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from loom_common import SpecError
from loom_db.audit import list_audit
from loom_db.database import Database
from loom_db.errors import Conflict, NotFound
from loom_db.graphs import (
    apply_graph,
    delete_graph,
    find_webhook,
    get_graph,
    list_graphs,
    list_triggers,
    list_versions,
    set_enabled,
)
from loom_db.models import executions, graph_versions, outbox, triggers
from loom_db.types import utcnow

DEPLOY = """\
name: deploy
description: Build and deploy
params:
  ref: {type: string, default: main}
triggers:
  - cron: "0 2 * * 1-5"
    timezone: Europe/Berlin
    id: nightly
  - every: 15m
  - webhook:
      name: github
      auth: github
      secret: GITHUB_HOOK_SECRET
      events: [push]
  - webhook: {auth: none}
nodes:
  build:
    run: make build REF=${{ params.ref }}
  deploy:
    needs: [build]
    run: make deploy
"""

# The same meaning: other layout, quoting, key order, comments, and defaults spelled out.
DEPLOY_REFORMATTED = """\
# reformatted by hand
name: "deploy"
nodes:
  build: {run: "make build REF=${{ params.ref }}"}
  deploy:
    run: make deploy
    needs:
      - build
    continue_on_failure: false
triggers:
  - {cron: "0 2 * * 1-5", timezone: Europe/Berlin, id: nightly, catch_up: latest}
  - {every: 15m}
  - webhook: {name: github, auth: github, secret: GITHUB_HOOK_SECRET, events: [push]}
  - webhook: {name: default, auth: none}
on_overlap: queue
params:
  ref:
    default: main
    type: string
description: Build and deploy
"""

DEPLOY_V2 = DEPLOY.replace("make deploy", "make deploy-all").replace(
    '"0 2 * * 1-5"', '"0 3 * * 1-5"'
)


def graph_source(name: str, command: str = "echo hi") -> str:
    return f"name: {name}\nnodes:\n  only:\n    run: {command}\n"


async def outbox_messages(conn: AsyncConnection) -> list[tuple[str, str, dict[str, Any]]]:
    rows = (await conn.execute(select(outbox).order_by(outbox.c.id))).all()
    result = []
    for row in rows:
        envelope = orjson.loads(row.envelope)
        assert row.channel == "control"
        result.append((envelope["type"], row.key, envelope["data"]))
    return result


async def count(conn: AsyncConnection, table: Any) -> int:
    return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def add_execution(conn: AsyncConnection, graph: str, version: int) -> str:
    execution_id = str(uuid.uuid4())
    await conn.execute(
        insert(executions).values(
            id=execution_id,
            graph=graph,
            graph_version=version,
            status="succeeded",
            params={},
            trigger_type="manual",
            trigger_info={},
            created_at=utcnow(),
        )
    )
    return execution_id


async def test_apply_creates_version_1_with_its_triggers_message_and_audit(db: Database) -> None:
    async with db.transaction() as conn:
        record, outcome = await apply_graph(conn, DEPLOY, by="alice")
    assert outcome == "created"
    assert (record.name, record.version, record.latest_version) == ("deploy", 1, 1)
    assert record.enabled is True
    assert record.description == "Build and deploy"
    assert record.source == DEPLOY
    assert record.spec["nodes"]["deploy"] == {"run": "make deploy", "needs": ["build"]}
    assert "on_overlap" not in record.spec  # defaults are left out of the normalized spec
    assert len(record.spec_hash) == 64
    assert record.created_at == record.updated_at
    assert [(t.id, t.kind) for t in record.triggers] == [
        ("nightly", "cron"),
        (record.triggers[1].id, "every"),
        ("webhook:github", "webhook"),
        ("webhook:default", "webhook"),
    ]
    assert record.triggers[1].id.startswith("every-")

    async with db.read() as conn:
        indexed = await list_triggers(conn)
        assert {(t.graph, t.id, t.kind, t.graph_version) for t in indexed} == {
            ("deploy", t.id, t.kind, 1) for t in record.triggers
        }
        assert await outbox_messages(conn) == [
            (
                "graph.changed",
                "deploy",
                {"graph": "deploy", "version": 1, "enabled": True, "deleted": False},
            )
        ]
        entries, _ = await list_audit(conn, object_type="graph", object_id="deploy")
    assert [(e.actor, e.action, e.detail["version"]) for e in entries] == [
        ("alice", "graph.create", 1)
    ]


async def test_identical_spec_is_unchanged_and_writes_nothing(db: Database) -> None:
    async with db.transaction() as conn:
        first, _ = await apply_graph(conn, DEPLOY)
    for source in (DEPLOY, DEPLOY_REFORMATTED):
        async with db.transaction() as conn:
            record, outcome = await apply_graph(conn, source, by="bob")
        assert outcome == "unchanged"
        assert record.version == 1
        assert record.source == DEPLOY  # the stored document stays the one of version 1
        assert record.spec_hash == first.spec_hash
    async with db.read() as conn:
        assert await count(conn, graph_versions) == 1
        assert await count(conn, outbox) == 1
        entries, _ = await list_audit(conn)
        assert [e.action for e in entries] == ["graph.create"]


async def test_a_changed_spec_adds_a_version_and_reindexes_its_triggers(db: Database) -> None:
    async with db.transaction() as conn:
        v1, _ = await apply_graph(conn, DEPLOY)
    async with db.transaction() as conn:
        v2, outcome = await apply_graph(conn, DEPLOY_V2, by="bob")
    assert outcome == "updated"
    assert (v2.version, v2.latest_version) == (2, 2)
    assert v2.created_at == v1.created_at and v2.updated_at > v1.updated_at
    async with db.read() as conn:
        old = await get_graph(conn, "deploy", version=1)
        assert (old.version, old.latest_version, old.source) == (1, 2, DEPLOY)
        assert (await get_graph(conn, "deploy")).source == DEPLOY_V2
        versions = await list_versions(conn, "deploy")
        assert [(v.version, v.created_by) for v in versions] == [(2, "bob"), (1, None)]
        indexed = await list_triggers(conn)
        assert {t.graph_version for t in indexed} == {2}
        assert len(indexed) == 4
        cron = await list_triggers(conn, kind="cron")
        assert [(t.id, t.spec["cron"], t.spec["timezone"]) for t in cron] == [
            ("nightly", "0 3 * * 1-5", "Europe/Berlin")
        ]
        assert {t.kind for t in await list_triggers(conn, kind=["cron", "every"])} == {
            "cron",
            "every",
        }
        messages = await outbox_messages(conn)
    assert messages[-1][2] == {"graph": "deploy", "version": 2, "enabled": True, "deleted": False}


async def test_a_changed_trigger_expression_replaces_its_index_row(db: Database) -> None:
    source = "name: tick\ntriggers:\n  - every: 1m\nnodes:\n  a: {run: echo}\n"
    async with db.transaction() as conn:
        v1, _ = await apply_graph(conn, source)
        v2, _ = await apply_graph(conn, source.replace("1m", "2m"))
        ids = [t.id for t in await list_triggers(conn)]
    assert ids == [v2.triggers[0].id] and ids != [v1.triggers[0].id]


async def test_create_only_refuses_an_existing_name_and_changes_nothing(db: Database) -> None:
    async with db.transaction() as conn:
        await apply_graph(conn, DEPLOY, create_only=True)
    with pytest.raises(Conflict, match="deploy"):
        async with db.transaction() as conn:
            await apply_graph(conn, DEPLOY_V2, create_only=True)
    async with db.read() as conn:
        assert (await get_graph(conn, "deploy")).version == 1
        assert await count(conn, outbox) == 1


async def test_an_invalid_document_raises_spec_error_and_stores_nothing(db: Database) -> None:
    with pytest.raises(SpecError):
        async with db.transaction() as conn:
            await apply_graph(conn, "name: bad\nnodes:\n  a: {run: x, needs: [nope]}\n")
    with pytest.raises(SpecError):
        async with db.transaction() as conn:
            await apply_graph(conn, "name: [unclosed\n")
    async with db.read() as conn:
        assert (await list_graphs(conn))[0] == []
        assert await count(conn, outbox) == 0


async def test_find_webhook_answers_only_for_enabled_graphs_and_known_hooks(db: Database) -> None:
    async with db.transaction() as conn:
        await apply_graph(conn, DEPLOY)
    async with db.read() as conn:
        hook = await find_webhook(conn, "deploy", "github")
        assert hook is not None
        assert (hook.id, hook.kind, hook.webhook_name, hook.graph_version) == (
            "webhook:github",
            "webhook",
            "github",
            1,
        )
        assert hook.spec["webhook"]["auth"] == "github"
        assert hook.spec["webhook"]["secret"] == "GITHUB_HOOK_SECRET"
        assert hook.spec["webhook"]["events"] == ["push"]
        default = await find_webhook(conn, "deploy", "default")
        assert default is not None and default.spec["webhook"]["auth"] == "none"
        assert await find_webhook(conn, "deploy", "gitlab") is None
        assert await find_webhook(conn, "unknown", "github") is None
    async with db.transaction() as conn:
        await set_enabled(conn, "deploy", False)
    async with db.read() as conn:
        assert await find_webhook(conn, "deploy", "github") is None


async def test_disabling_clears_the_index_and_enabling_restores_it(db: Database) -> None:
    async with db.transaction() as conn:
        await apply_graph(conn, DEPLOY)
    async with db.transaction() as conn:
        paused = await set_enabled(conn, "deploy", False, by="carol")
    assert paused.enabled is False
    assert len(paused.triggers) == 4  # a paused graph still shows its triggers
    async with db.read() as conn:
        assert await list_triggers(conn) == []
    # While paused, a new version is stored but not indexed.
    async with db.transaction() as conn:
        record, outcome = await apply_graph(conn, DEPLOY_V2)
    assert (outcome, record.version, record.enabled) == ("updated", 2, False)
    async with db.read() as conn:
        assert await list_triggers(conn) == []
    async with db.transaction() as conn:
        resumed = await set_enabled(conn, "deploy", True, by="carol")
    assert resumed.enabled is True
    async with db.read() as conn:
        indexed = await list_triggers(conn)
        assert {t.graph_version for t in indexed} == {2} and len(indexed) == 4
        assert (await find_webhook(conn, "deploy", "github")) is not None
        messages = [data for _, _, data in await outbox_messages(conn)]
        entries, _ = await list_audit(conn, actor="carol")
    assert messages == [
        {"graph": "deploy", "version": 1, "enabled": True, "deleted": False},
        {"graph": "deploy", "version": 1, "enabled": False, "deleted": False},
        {"graph": "deploy", "version": 2, "enabled": False, "deleted": False},
        {"graph": "deploy", "version": 2, "enabled": True, "deleted": False},
    ]
    assert [e.action for e in entries] == ["graph.enable", "graph.disable"]


async def test_setting_the_state_a_graph_has_writes_nothing(db: Database) -> None:
    async with db.transaction() as conn:
        await apply_graph(conn, DEPLOY)
        record = await set_enabled(conn, "deploy", True)
        assert record.enabled is True
        assert await count(conn, outbox) == 1
        with pytest.raises(NotFound):
            await set_enabled(conn, "nope", False)


async def test_delete_removes_versions_and_triggers_but_keeps_executions(db: Database) -> None:
    async with db.transaction() as conn:
        await apply_graph(conn, DEPLOY)
        await apply_graph(conn, DEPLOY_V2)
        execution_id = await add_execution(conn, "deploy", 2)
    async with db.transaction() as conn:
        await delete_graph(conn, "deploy", by="dave")
    async with db.read() as conn:
        with pytest.raises(NotFound):
            await get_graph(conn, "deploy")
        with pytest.raises(NotFound):
            await list_versions(conn, "deploy")
        assert await count(conn, graph_versions) == 0
        assert await count(conn, triggers) == 0
        kept = await conn.execute(select(executions.c.id).where(executions.c.graph == "deploy"))
        assert list(kept.scalars()) == [execution_id]
        assert (await outbox_messages(conn))[-1] == (
            "graph.changed",
            "deploy",
            {"graph": "deploy", "version": 2, "enabled": False, "deleted": True},
        )
        entries, _ = await list_audit(conn, actor="dave")
        assert [e.action for e in entries] == ["graph.delete"]
    with pytest.raises(NotFound):
        async with db.transaction() as conn:
            await delete_graph(conn, "deploy")


async def test_a_recreated_graph_never_reuses_a_version_its_executions_name(db: Database) -> None:
    async with db.transaction() as conn:
        await apply_graph(conn, DEPLOY)
        await apply_graph(conn, DEPLOY_V2)
        await add_execution(conn, "deploy", 2)
        await delete_graph(conn, "deploy")
    async with db.transaction() as conn:
        record, outcome = await apply_graph(conn, DEPLOY)
    assert (outcome, record.version) == ("created", 3)
    async with db.read() as conn:
        assert [v.version for v in await list_versions(conn, "deploy")] == [3]


async def test_unknown_graphs_and_versions_are_not_found(db: Database) -> None:
    async with db.transaction() as conn:
        await apply_graph(conn, DEPLOY)
    async with db.read() as conn:
        with pytest.raises(NotFound, match="'nope'"):
            await get_graph(conn, "nope")
        with pytest.raises(NotFound, match="version 7"):
            await get_graph(conn, "deploy", version=7)


async def test_list_graphs_pages_by_name_without_skips_or_repeats(db: Database) -> None:
    names = [f"graph-{i:02d}" for i in range(7)]
    async with db.transaction() as conn:
        for name in reversed(names):
            await apply_graph(conn, graph_source(name))
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        async with db.read() as conn:
            items, cursor = await list_graphs(conn, limit=3, cursor=cursor)
        seen += [g.name for g in items]
        pages += 1
        # A graph created between pages, before the cursor, is not seen; after it, is.
        if pages == 1:
            async with db.transaction() as conn:
                await apply_graph(conn, graph_source("graph-05a"))
                await apply_graph(conn, graph_source("aaa-first"))
        if cursor is None:
            break
    assert seen == sorted([*names, "graph-05a"])
    assert pages == 3
    async with db.read() as conn:
        items, cursor = await list_graphs(conn, limit=100)
    assert cursor is None and len(items) == 9
    assert all(g.version == 1 and g.source for g in items)
    with pytest.raises(ValueError):
        async with db.read() as conn:
            await list_graphs(conn, limit=0)


async def test_concurrent_applies_of_a_new_graph_create_it_once(db: Database) -> None:
    """Racing creators of one name: one creates it, the others see it (no error, one row)."""

    async def apply(source: str) -> str:
        async with db.transaction() as conn:
            _, outcome = await apply_graph(conn, source)
            await asyncio.sleep(0.01)  # hold the transaction open a little
            return outcome

    outcomes = await asyncio.gather(*(apply(graph_source("race")) for _ in range(8)))
    assert sorted(outcomes) == ["created"] + ["unchanged"] * 7
    async with db.read() as conn:
        assert [v.version for v in await list_versions(conn, "race")] == [1]

    changed = [graph_source("race", f"echo {i}") for i in range(5)]
    outcomes = await asyncio.gather(*(apply(source) for source in changed))
    assert outcomes == ["updated"] * 5
    async with db.read() as conn:
        assert [v.version for v in await list_versions(conn, "race")] == [6, 5, 4, 3, 2, 1]
