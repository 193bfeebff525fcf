"""The execution routes: trigger (params, Idempotency-Key, under concurrency), list with
filters and cursors, one with its nodes, logs as JSON and text, cancel and retry — on
SQLite and PostgreSQL, with the memory broker behind the outbox relay."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from loom_db import executions, graphs, logs, node_runs
from loom_db.node_runs import NodeChange
from loom_db.relay import OutboxRelay
from loom_messaging import Envelope
from loom_rest import Runtime

GRAPH_YAML = """\
name: build
params:
  target: {type: string}
  count: {type: integer, default: 1}
  mode: {type: string, enum: [fast, slow], default: fast}
nodes:
  compile:
    run: echo compiling ${{ params.target }}
"""
OTHER_YAML = """\
name: deploy
nodes:
  push:
    run: echo pushing
"""
TRIGGER = "/api/v1/graphs/build/executions"


# --- helpers ----------------------------------------------------------------------------


async def add_graph(runtime: Runtime, source: str = GRAPH_YAML) -> None:
    async with runtime.database.transaction() as conn:
        await graphs.apply_graph(conn, source, by="editor")


async def trigger(
    client: httpx.AsyncClient, params: dict[str, Any] | None = None, graph: str = "build"
) -> dict[str, Any]:
    answer = await client.post(
        f"/api/v1/graphs/{graph}/executions",
        json={"params": {"target": "x"} if params is None else params},
    )
    assert answer.status_code == 202, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def run(runtime: Runtime, execution_id: str) -> None:
    """Make the execution `running`, as a worker that claimed and admitted it would."""
    async with runtime.database.transaction() as conn:
        assert await executions.claim(conn, execution_id, "worker-1", 30) is not None
        admission = await executions.admit(
            conn, execution_id, "worker-1", 30, concurrency=None, on_overlap="queue"
        )
        assert admission == "running"


async def end(runtime: Runtime, execution_id: str, status: str, error: str | None = None) -> None:
    await run(runtime, execution_id)
    async with runtime.database.transaction() as conn:
        await executions.finish(conn, execution_id, status, error=error)


async def next_matching(stream: AsyncIterator[Envelope], type_: str) -> Envelope:
    async with asyncio.timeout(10):
        async for envelope in stream:
            if envelope.type == type_:
                return envelope
    raise AssertionError(f"no {type_} message")


def error_paths(answer: httpx.Response) -> set[str]:
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    return {error["path"] for error in answer.json()["errors"]}


# --- trigger ----------------------------------------------------------------------------


async def test_trigger_is_accepted_listed_readable_and_requested_on_the_queue(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor, {"target": "linux", "count": 3})
    assert created["status"] == "queued"
    assert created["graph"] == "build" and created["graph_version"] == 1
    assert created["params"] == {"target": "linux", "count": 3, "mode": "fast"}
    assert created["trigger"]["type"] == "manual" and created["trigger"]["user"] == "editor"
    uuid.UUID(created["id"])

    listed = (await clients.viewer.get("/api/v1/executions")).json()
    assert [item["id"] for item in listed["items"]] == [created["id"]]
    assert listed["items"][0]["nodes"] is None
    read = await clients.viewer.get(f"/api/v1/executions/{created['id']}")
    assert read.status_code == 200
    assert read.json()["params"] == created["params"] and read.json()["nodes"] == []

    async with runtime.broker.queue.consume() as deliveries:
        async with OutboxRelay(runtime.database, runtime.broker.publishers(), poll_interval=0.05):
            async with asyncio.timeout(10):
                delivery = await anext(aiter(deliveries))
        await delivery.ack()
    assert delivery.envelope.type == "execution.requested"
    assert delivery.envelope.data["execution_id"] == created["id"]


async def test_trigger_is_audited(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    answer = await clients.admin.get(f"/api/v1/audit?object=execution:{created['id']}")
    entries = answer.json()["items"]
    assert [(e["action"], e["actor"]) for e in entries] == [("execution.create", "editor")]


async def test_trigger_names_every_bad_param(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    answer = await clients.editor.post(
        TRIGGER, json={"params": {"count": "three", "mode": "medium", "targte": "x"}}
    )
    assert error_paths(answer) == {
        "body.params.count",
        "body.params.mode",
        "body.params.targte",
        "body.params.target",
    }
    messages = {e["path"]: e["message"] for e in answer.json()["errors"]}
    assert "did you mean 'target'" in messages["body.params.targte"]
    assert (await clients.viewer.get("/api/v1/executions")).json()["items"] == []


async def test_trigger_refuses_nul_characters_in_params(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    answer = await clients.editor.post(TRIGGER, json={"params": {"target": "a\x00b"}})
    assert error_paths(answer) == {"body.params.target"}


async def test_trigger_refuses_unknown_fields_and_non_object_params(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    assert "body.parms" in error_paths(await clients.editor.post(TRIGGER, json={"parms": {}}))
    assert "body.params" in error_paths(await clients.editor.post(TRIGGER, json={"params": [1]}))


async def test_trigger_of_an_unknown_graph_is_404(runtime: Runtime, clients: Any) -> None:
    assert (await clients.editor.post(TRIGGER, json={})).status_code == 404
    answer = await clients.editor.post("/api/v1/graphs/NOT%20A%20NAME/executions", json={})
    assert answer.status_code == 404


async def test_trigger_of_a_paused_graph_is_409(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    async with runtime.database.transaction() as conn:
        await graphs.set_enabled(conn, "build", False, by="editor")
    answer = await clients.editor.post(TRIGGER, json={"params": {"target": "x"}})
    assert answer.status_code == 409
    assert "paused" in answer.json()["detail"]


async def test_trigger_needs_the_editor_role(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    answer = await clients.viewer.post(TRIGGER, json={"params": {"target": "x"}})
    assert answer.status_code == 403


# --- Idempotency-Key --------------------------------------------------------------------


async def test_same_idempotency_key_answers_200_with_the_same_execution(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    body = {"params": {"target": "x"}}
    headers = {"Idempotency-Key": "deploy-42"}
    first = await clients.editor.post(TRIGGER, json=body, headers=headers)
    again = await clients.editor.post(TRIGGER, json=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    listed = (await clients.viewer.get("/api/v1/executions")).json()["items"]
    assert len(listed) == 1


async def test_same_idempotency_key_with_other_params_is_422(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    headers = {"Idempotency-Key": "k"}
    first = await clients.editor.post(TRIGGER, json={"params": {"target": "x"}}, headers=headers)
    assert first.status_code == 202
    other = await clients.editor.post(TRIGGER, json={"params": {"target": "y"}}, headers=headers)
    assert error_paths(other) == {"body.params"}
    assert first.json()["id"] in other.json()["errors"][0]["message"]


async def test_idempotency_keys_belong_to_their_user(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    body, headers = {"params": {"target": "x"}}, {"Idempotency-Key": "k"}
    mine = await clients.editor.post(TRIGGER, json=body, headers=headers)
    theirs = await clients.admin.post(TRIGGER, json=body, headers=headers)
    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.json()["id"] != theirs.json()["id"]


@pytest.mark.parametrize("key", ["", "k" * 201, "a\tb"])
async def test_invalid_idempotency_key_is_422(runtime: Runtime, clients: Any, key: str) -> None:
    await add_graph(runtime)
    answer = await clients.editor.post(
        TRIGGER, json={"params": {"target": "x"}}, headers={"Idempotency-Key": key}
    )
    assert error_paths(answer) == {"header.Idempotency-Key"}


async def test_concurrent_triggers_with_one_key_make_one_execution(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    headers = {"Idempotency-Key": "once"}
    answers = await asyncio.gather(
        *(
            clients.editor.post(TRIGGER, json={"params": {"target": "x"}}, headers=headers)
            for _ in range(20)
        )
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] * 19 + [202], [a.text for a in answers if a.status_code >= 300]
    assert len({answer.json()["id"] for answer in answers}) == 1
    listed = (await clients.viewer.get("/api/v1/executions?limit=500")).json()["items"]
    assert [item["id"] for item in listed] == [answers[0].json()["id"]]


# --- list -------------------------------------------------------------------------------


async def test_list_pages_through_every_execution_once_newest_first(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    made = [(await trigger(clients.editor))["id"] for _ in range(7)]
    everything = (await clients.viewer.get("/api/v1/executions")).json()
    assert everything["next_cursor"] is None
    assert [item["id"] for item in everything["items"]] == list(reversed(made))

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        url = "/api/v1/executions?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await clients.viewer.get(url)).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == [item["id"] for item in everything["items"]]
    assert sorted(seen) == sorted(made)


async def test_list_filters_by_graph_status_and_trigger(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    await add_graph(runtime, OTHER_YAML)
    queued = await trigger(clients.editor)
    failed = await trigger(clients.editor)
    other = await trigger(clients.editor, {}, graph="deploy")
    await end(runtime, failed["id"], "failed", "boom")
    retried = (await clients.editor.post(f"/api/v1/executions/{failed['id']}/retry")).json()

    async def ids(query: str) -> set[str]:
        answer = await clients.viewer.get(f"/api/v1/executions?{query}")
        assert answer.status_code == 200, answer.text
        return {item["id"] for item in answer.json()["items"]}

    assert await ids("graph=deploy") == {other["id"]}
    assert await ids("graph=build") == {queued["id"], failed["id"], retried["id"]}
    assert await ids("status=failed") == {failed["id"]}
    assert await ids("status=queued&graph=build") == {queued["id"], retried["id"]}
    assert await ids("trigger=retry") == {retried["id"]}
    assert await ids("trigger=timer") == set()
    assert await ids("graph=nothing") == set()


async def test_listed_executions_have_the_shape_of_a_single_one(
    runtime: Runtime, clients: Any
) -> None:
    # The listing builds its JSON without the models: it must be what they would give.
    await add_graph(runtime)
    queued = await trigger(clients.editor, {"target": "caf\u00e9", "count": 2**62})
    failed = await trigger(clients.editor)
    await end(runtime, failed["id"], "failed", "boom")
    retried = (await clients.editor.post(f"/api/v1/executions/{failed['id']}/retry")).json()
    async with runtime.database.transaction() as conn:
        timer, _ = await executions.create_execution(
            conn,
            graph="build",
            graph_version=1,
            params={"target": "t", "nested": {"a": [1, 2.5, None, True]}},
            trigger_type="timer",
            trigger_info={"fire_time": "2030-01-01T00:00:00Z", "delivery_id": 7},
        )
    answer = await clients.viewer.get("/api/v1/executions")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    items = answer.json()["items"]
    assert [item["id"] for item in items] == [timer.id, retried["id"], failed["id"], queued["id"]]
    for item in items:
        single = (await clients.viewer.get(f"/api/v1/executions/{item['id']}")).json()
        assert item == {**single, "nodes": None}
    assert items[0]["trigger"] == {
        "type": "timer",
        "fire_time": "2030-01-01T00:00:00Z",
        "delivery_id": "7",
        "user": None,
        "origin_id": None,
    }
    assert items[1]["trigger"]["origin_id"] == failed["id"]
    assert items[2]["finished_at"].endswith("Z")
    assert items[3]["params"] == {"target": "caf\u00e9", "count": 2**62, "mode": "fast"}


@pytest.mark.parametrize(
    ("query", "path"),
    [
        ("status=exploded", "query.status"),
        ("trigger=cron", "query.trigger"),
        ("limit=0", "query.limit"),
        ("limit=501", "query.limit"),
        ("cursor=not-a-cursor", "query.cursor"),
        ("colour=red", "query.colour"),
    ],
)
async def test_list_refuses_invalid_queries(clients: Any, query: str, path: str) -> None:
    assert error_paths(await clients.viewer.get(f"/api/v1/executions?{query}")) == {path}


async def test_openapi_lists_the_status_and_trigger_filters_as_enums(clients: Any) -> None:
    document = (await clients.anonymous.get("/api/v1/openapi.json")).json()
    parameters = document["paths"]["/api/v1/executions"]["get"]["parameters"]
    schemas = {p["name"]: str(p["schema"]) for p in parameters}
    assert "timed_out" in schemas["status"] and "webhook" in schemas["trigger"]


# --- one execution ----------------------------------------------------------------------


async def test_get_shows_every_node_instance_at_its_latest_attempt(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    await run(runtime, created["id"])
    start = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    async with runtime.database.transaction() as conn:
        await node_runs.record_nodes(
            conn,
            created["id"],
            [
                NodeChange("compile", "compile", None, 1, "running", started_at=start),
                NodeChange("compile", "compile", None, 1, "failed", exit_code=2, error="oops"),
                NodeChange("compile", "compile", None, 2, "running", started_at=start),
                NodeChange(
                    "compile",
                    "compile",
                    None,
                    2,
                    "succeeded",
                    finished_at=start + timedelta(seconds=3),
                    exit_code=0,
                    outputs={"artifact": "a.out"},
                ),
                NodeChange("build[0]", "build", 0, 1, "running", started_at=start),
            ],
        )
        await node_runs.record_node(
            conn, created["id"], node="build[1]", name="build", index=1, attempt=1, status="pending"
        )
    answer = await clients.viewer.get(f"/api/v1/executions/{created['id']}")
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "running"
    nodes = {node["id"]: node for node in body["nodes"]}
    assert [node["id"] for node in body["nodes"]] == ["compile", "build[0]", "build[1]"]
    compile_ = nodes["compile"]
    assert (compile_["attempt"], compile_["status"], compile_["exit_code"]) == (2, "succeeded", 0)
    assert compile_["outputs"] == {"artifact": "a.out"} and compile_["error"] is None
    assert compile_["started_at"] == "2026-11-23T10:00:00Z"
    assert compile_["finished_at"] == "2026-11-23T10:00:03Z"
    assert (nodes["build[0]"]["node"], nodes["build[0]"]["index"]) == ("build", 0)
    assert nodes["build[1]"]["status"] == "pending"


@pytest.mark.parametrize(
    "bad_id", ["not-a-uuid", "x" * 300, "1234", "%00", "00000000-0000-0000-0000-000000000000"]
)
async def test_unknown_or_malformed_execution_ids_are_404(clients: Any, bad_id: str) -> None:
    for method, suffix in [("GET", ""), ("GET", "/logs"), ("POST", "/cancel"), ("POST", "/retry")]:
        client = clients.editor
        answer = await client.request(method, f"/api/v1/executions/{bad_id}{suffix}")
        assert answer.status_code == 404, (method, suffix, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")


async def test_an_upper_case_execution_id_finds_the_execution(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    answer = await clients.viewer.get(f"/api/v1/executions/{created['id'].upper()}")
    assert answer.status_code == 200 and answer.json()["id"] == created["id"]


# --- logs -------------------------------------------------------------------------------


@pytest.fixture
async def logged(runtime: Runtime, clients: Any) -> str:
    """An execution with five log lines of two node instances."""
    await add_graph(runtime)
    created = await trigger(clients.editor)
    ts = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
    lines = [
        logs.LogLineIn(1, "compile", "loom", ts, "starting"),
        logs.LogLineIn(2, "compile", "stdout", ts, "compiling linux"),
        logs.LogLineIn(3, "build[0]", "stdout", ts, "step one"),
        logs.LogLineIn(4, "compile", "stderr", ts, "warning: careful"),
        logs.LogLineIn(5, "build[0]", "stdout", ts, "step two"),
    ]
    async with runtime.database.transaction() as conn:
        await logs.append_logs(conn, created["id"], lines)
    return str(created["id"])


async def test_logs_as_json_after_a_seq(clients: Any, logged: str) -> None:
    answer = await clients.viewer.get(f"/api/v1/executions/{logged}/logs?after=2")
    assert answer.status_code == 200
    body = answer.json()
    assert [line["seq"] for line in body["items"]] == [3, 4, 5]
    assert body["items"][0] == {
        "seq": 3,
        "node": "build[0]",
        "stream": "stdout",
        "ts": "2026-11-23T10:00:00Z",
        "text": "step one",
    }
    assert body["next_after"] == 5
    page = (await clients.viewer.get(f"/api/v1/executions/{logged}/logs?limit=2")).json()
    assert [line["seq"] for line in page["items"]] == [1, 2] and page["next_after"] == 2


async def test_logs_of_one_node(clients: Any, logged: str) -> None:
    answer = await clients.viewer.get(f"/api/v1/executions/{logged}/logs?node=build[0]")
    assert [line["text"] for line in answer.json()["items"]] == ["step one", "step two"]


async def test_logs_past_the_end_keep_next_after(clients: Any, logged: str) -> None:
    body = (await clients.viewer.get(f"/api/v1/executions/{logged}/logs?after=9")).json()
    assert body == {"items": [], "next_after": 9}


async def test_logs_as_text_with_next_after_in_a_header(clients: Any, logged: str) -> None:
    answer = await clients.viewer.get(
        f"/api/v1/executions/{logged}/logs?after=1&node=compile",
        headers={"Accept": "text/plain"},
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.headers["Loom-Next-After"] == "4"
    assert answer.text == "compile | compiling linux\ncompile | warning: careful\n"
    whole = await clients.viewer.get(
        f"/api/v1/executions/{logged}/logs", headers={"Accept": "text/plain, */*;q=0.1"}
    )
    assert whole.text.splitlines()[0] == "compile | [loom] starting"


async def test_logs_prefer_json_when_the_client_does(clients: Any, logged: str) -> None:
    answer = await clients.viewer.get(
        f"/api/v1/executions/{logged}/logs",
        headers={"Accept": "text/plain;q=0.5, application/json"},
    )
    assert answer.headers["content-type"].startswith("application/json")
    assert len(answer.json()["items"]) == 5


@pytest.mark.parametrize("after", ["-1", str(2**63), "one"])
async def test_logs_refuse_an_after_out_of_range(clients: Any, logged: str, after: str) -> None:
    answer = await clients.viewer.get(f"/api/v1/executions/{logged}/logs?after={after}")
    assert error_paths(answer) == {"query.after"}


# --- cancel -----------------------------------------------------------------------------


async def test_cancel_of_a_queued_execution_ends_it(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    answer = await clients.editor.post(f"/api/v1/executions/{created['id']}/cancel")
    assert answer.status_code == 202
    assert answer.json()["status"] == "cancelled" and answer.json()["finished_at"] is not None
    read = (await clients.viewer.get(f"/api/v1/executions/{created['id']}")).json()
    assert read["status"] == "cancelled"
    audit = await clients.admin.get(f"/api/v1/audit?object=execution:{created['id']}")
    assert audit.json()["items"][0]["action"] == "execution.cancel"


async def test_cancel_of_a_running_execution_asks_its_worker(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    await run(runtime, created["id"])
    async with runtime.broker.control.subscribe() as control:
        async with OutboxRelay(runtime.database, runtime.broker.publishers(), poll_interval=0.05):
            answer = await clients.editor.post(f"/api/v1/executions/{created['id']}/cancel")
            message = await next_matching(control, "execution.cancel")
    assert answer.status_code == 202
    assert answer.json()["status"] == "running" and answer.json()["cancel_requested"] is True
    assert message.data == {"execution_id": created["id"], "by": "editor"}


async def test_cancel_of_a_finished_execution_leaves_it_unchanged(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    await end(runtime, created["id"], "succeeded")
    answer = await clients.editor.post(f"/api/v1/executions/{created['id']}/cancel")
    assert answer.status_code == 202
    assert answer.json()["status"] == "succeeded" and answer.json()["cancel_requested"] is False


async def test_cancel_needs_the_editor_role(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    answer = await clients.viewer.post(f"/api/v1/executions/{created['id']}/cancel")
    assert answer.status_code == 403
    read = (await clients.viewer.get(f"/api/v1/executions/{created['id']}")).json()
    assert read["status"] == "queued"


# --- retry ------------------------------------------------------------------------------


async def test_retry_of_a_failed_execution_starts_a_new_one_naming_its_origin(
    runtime: Runtime, clients: Any
) -> None:
    await add_graph(runtime)
    failed = await trigger(clients.editor, {"target": "arm", "count": 2})
    await end(runtime, failed["id"], "failed", "compile failed")
    # A newer version of the graph does not change what the retry runs.
    await add_graph(runtime, GRAPH_YAML.replace("echo compiling", "echo building"))
    answer = await clients.editor.post(f"/api/v1/executions/{failed['id']}/retry")
    assert answer.status_code == 202
    retry = answer.json()
    assert retry["id"] != failed["id"] and retry["status"] == "queued"
    assert retry["trigger"] == {
        "type": "retry",
        "fire_time": None,
        "delivery_id": None,
        "user": "editor",
        "origin_id": failed["id"],
    }
    assert retry["graph_version"] == 1 and retry["params"] == failed["params"]
    read = (await clients.viewer.get(f"/api/v1/executions/{retry['id']}")).json()
    assert read["trigger"]["origin_id"] == failed["id"]
    audit = (await clients.admin.get(f"/api/v1/audit?object=execution:{retry['id']}")).json()
    assert audit["items"][0]["action"] == "execution.retry"
    assert audit["items"][0]["detail"]["origin_id"] == failed["id"]


@pytest.mark.parametrize("status", ["queued", "running", "succeeded"])
async def test_retry_of_an_execution_that_did_not_fail_is_409(
    runtime: Runtime, clients: Any, status: str
) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    if status == "running":
        await run(runtime, created["id"])
    elif status == "succeeded":
        await end(runtime, created["id"], "succeeded")
    answer = await clients.editor.post(f"/api/v1/executions/{created['id']}/retry")
    assert answer.status_code == 409
    assert status in answer.json()["detail"]
    listed = (await clients.viewer.get("/api/v1/executions")).json()["items"]
    assert [item["id"] for item in listed] == [created["id"]]


async def test_retry_of_a_deleted_graph_is_409(runtime: Runtime, clients: Any) -> None:
    await add_graph(runtime)
    created = await trigger(clients.editor)
    await end(runtime, created["id"], "failed")
    async with runtime.database.transaction() as conn:
        await graphs.delete_graph(conn, "build", by="editor")
    answer = await clients.editor.post(f"/api/v1/executions/{created['id']}/retry")
    assert answer.status_code == 409
    assert "no longer exists" in answer.json()["detail"]
