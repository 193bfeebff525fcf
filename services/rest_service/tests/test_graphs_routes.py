"""The graph routes (DESIGN §5): documents in three media types, apply semantics, every
validation error with its line, body limits, pause/resume, delete, versions, validate,
webhook deliveries, trigger fire times and `graph.changed` on the control channel."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from loom_auth import hash_password, new_api_token
from loom_db import Database, deliveries, tokens, users
from loom_db.relay import OutboxRelay
from loom_rest import Runtime

YAML = {"Content-Type": "application/yaml"}
PASSWORD = "correct horse battery staple"

HELLO = """\
name: hello
description: say hello
params:
  who: {type: string, default: world}
nodes:
  greet:
    run: echo "hello ${{ params.who }}"
"""

TIMED = """\
name: timed
triggers:
  - cron: "0 0 1 1 *"
    timezone: Europe/Berlin
  - every: 15m
  - at: "2099-06-01T12:00:00Z"
  - at: "2001-01-01T00:00:00Z"
    id: long-ago
  - delay: 5m
  - webhook: {name: push, auth: none}
nodes:
  tick:
    run: echo tick
"""

# An error on line 17 (`retries: lots`), far from the top.
LINE_17 = """\
name: far
description: an error far down
params:
  who: {type: string, default: world}
nodes:
  a:
    run: echo a
  b:
    needs: [a]
    run: echo b
  c:
    needs: [b]
    run: echo c
  d:
    needs: [c]
    run: echo d
    retries: lots
"""


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)  # argon2 is slow on purpose: once per module


@pytest.fixture
async def api(
    runtime: Runtime, anonymous: httpx.AsyncClient, password_hash: str
) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """A client per role with an API token of a user of that role, over the app of
    `anonymous` (one app per runtime). Lighter than conftest's `clients`: no logins, one
    password hash per module."""
    app = anonymous._transport.app  # type: ignore[attr-defined]
    made: dict[str, httpx.AsyncClient] = {}
    async with runtime.database.transaction() as conn:
        for role in ("viewer", "editor"):
            user = await users.create_user(conn, role, password_hash, role, by=None)
            token = new_api_token()
            await tokens.create_api_token(
                conn,
                token_id=str(uuid.uuid4()),
                user_id=user.id,
                name=f"test-{role}",
                token_hash=token.token_hash,
                prefix=token.prefix,
                role=role,
                by=role,
            )
            made[role] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://loom.test",
                headers={"Authorization": f"Bearer {token.token}"},
            )
    try:
        yield made
    finally:
        for client in made.values():
            await client.aclose()


@pytest.fixture
def editor(api: dict[str, httpx.AsyncClient]) -> httpx.AsyncClient:
    return api["editor"]


@pytest.fixture
def viewer(api: dict[str, httpx.AsyncClient]) -> httpx.AsyncClient:
    return api["viewer"]


def problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    return body


def errors(answer: httpx.Response) -> list[tuple[str, int | None]]:
    return [(e["path"], e["line"]) for e in problem(answer, 422)["errors"]]


def parse_time(text: str) -> datetime:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


# --- create -----------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", ["application/yaml", "application/x-yaml", "text/yaml"])
async def test_post_creates_a_graph_from_yaml(editor: httpx.AsyncClient, media_type: str) -> None:
    answer = await editor.post(
        "/api/v1/graphs", content=HELLO, headers={"Content-Type": media_type}
    )

    assert answer.status_code == 201, answer.text
    graph = answer.json()
    assert graph["name"] == "hello"
    assert graph["version"] == graph["latest_version"] == 1
    assert graph["enabled"] is True
    assert graph["description"] == "say hello"
    assert graph["source"] == HELLO
    assert graph["spec"]["nodes"]["greet"]["run"] == 'echo "hello ${{ params.who }}"'
    assert graph["triggers"] == []
    assert graph["created_at"].endswith("Z")
    fetched = await editor.get("/api/v1/graphs/hello")
    assert fetched.json() == graph


async def test_post_creates_a_graph_from_json(editor: httpx.AsyncClient) -> None:
    document = {"name": "from-json", "nodes": {"a": {"run": "echo a"}, "b": {"needs": ["a"]}}}
    document["nodes"]["b"]["run"] = "echo b"  # type: ignore[index]

    answer = await editor.post("/api/v1/graphs", json=document)

    assert answer.status_code == 201, answer.text
    assert answer.json()["spec"]["nodes"]["b"] == {"needs": ["a"], "run": "echo b"}


async def test_post_creates_a_graph_from_a_multipart_upload(editor: httpx.AsyncClient) -> None:
    answer = await editor.post(
        "/api/v1/graphs", files={"file": ("hello.yaml", HELLO.encode(), "application/yaml")}
    )

    assert answer.status_code == 201, answer.text
    assert answer.json()["source"] == HELLO


async def test_a_multipart_upload_without_the_file_field_names_it(
    editor: httpx.AsyncClient,
) -> None:
    answer = await editor.post(
        "/api/v1/graphs", files={"graph": ("hello.yaml", HELLO.encode(), "application/yaml")}
    )

    assert errors(answer) == [("body.file", None)]


async def test_post_of_an_existing_name_is_a_conflict(editor: httpx.AsyncClient) -> None:
    assert (await editor.post("/api/v1/graphs", content=HELLO, headers=YAML)).status_code == 201

    again = await editor.post("/api/v1/graphs", content=HELLO + "# changed\n", headers=YAML)

    assert "hello" in problem(again, 409)["detail"]
    assert (await editor.get("/api/v1/graphs/hello")).json()["source"] == HELLO


async def test_a_viewer_can_read_but_not_write_graphs(
    editor: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    await editor.post("/api/v1/graphs", content=HELLO, headers=YAML)

    assert (await viewer.get("/api/v1/graphs/hello")).status_code == 200
    problem(await viewer.post("/api/v1/graphs", content=HELLO, headers=YAML), 403)
    problem(await viewer.put("/api/v1/graphs/hello", content=HELLO, headers=YAML), 403)
    problem(await viewer.patch("/api/v1/graphs/hello", json={"enabled": False}), 403)
    problem(await viewer.delete("/api/v1/graphs/hello"), 403)
    assert (await viewer.get("/api/v1/graphs/hello")).json()["enabled"] is True


async def test_graphs_need_a_token(anonymous: httpx.AsyncClient) -> None:
    problem(await anonymous.get("/api/v1/graphs"), 401)


# --- apply ------------------------------------------------------------------------------


async def test_put_creates_then_keeps_or_bumps_the_version(editor: httpx.AsyncClient) -> None:
    created = await editor.put("/api/v1/graphs/hello", content=HELLO, headers=YAML)
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1

    same = await editor.put("/api/v1/graphs/hello", content=HELLO, headers=YAML)
    assert same.status_code == 200
    assert same.json()["version"] == 1

    reformatted = HELLO.replace(
        "{type: string, default: world}", "\n    type: string\n    default: world"
    )
    assert (await editor.put("/api/v1/graphs/hello", content=reformatted, headers=YAML)).json()[
        "version"
    ] == 1

    changed = HELLO.replace("say hello", "say hello loudly")
    updated = await editor.put("/api/v1/graphs/hello", content=changed, headers=YAML)
    assert updated.status_code == 200
    assert updated.json()["version"] == 2
    assert updated.json()["description"] == "say hello loudly"

    old = await editor.get("/api/v1/graphs/hello", params={"version": 1})
    assert old.json()["version"] == 1
    assert old.json()["latest_version"] == 2
    assert old.json()["description"] == "say hello"


async def test_put_refuses_a_document_naming_another_graph(editor: httpx.AsyncClient) -> None:
    answer = await editor.put("/api/v1/graphs/other", content=HELLO, headers=YAML)

    assert errors(answer) == [("body.name", 1)]
    as_json = json.dumps({"nodes": {"a": {"run": "x"}}, "name": "hello"}, indent=2)
    answer = await editor.put(
        "/api/v1/graphs/other", content=as_json, headers={"Content-Type": "application/json"}
    )
    assert errors(answer) == [("body.name", 7)]
    problem(await editor.get("/api/v1/graphs/other"), 404)
    problem(await editor.get("/api/v1/graphs/hello"), 404)


async def test_versions_lists_every_version_newest_first(editor: httpx.AsyncClient) -> None:
    await editor.put("/api/v1/graphs/hello", content=HELLO, headers=YAML)
    await editor.put("/api/v1/graphs/hello", content=HELLO.replace("say", "said"), headers=YAML)

    answer = await editor.get("/api/v1/graphs/hello/versions")

    assert answer.status_code == 200
    page = answer.json()
    assert page["next_cursor"] is None
    assert [(v["version"], v["description"], v["created_by"]) for v in page["items"]] == [
        (2, "said hello", "editor"),
        (1, "say hello", "editor"),
    ]
    assert page["items"][0]["spec_hash"] != page["items"][1]["spec_hash"]
    problem(await editor.get("/api/v1/graphs/nope/versions"), 404)


async def test_get_of_an_unknown_or_malformed_version(editor: httpx.AsyncClient) -> None:
    await editor.post("/api/v1/graphs", content=HELLO, headers=YAML)

    assert "version 7" in problem(await editor.get("/api/v1/graphs/hello?version=7"), 404)["detail"]
    assert errors(await editor.get("/api/v1/graphs/hello?version=seven")) == [
        ("query.version", None)
    ]
    assert errors(await editor.get("/api/v1/graphs/hello?version=0")) == [("query.version", None)]
    problem(await editor.get("/api/v1/graphs/nope"), 404)


async def test_list_pages_through_graphs_by_name(editor: httpx.AsyncClient) -> None:
    for name in ("c-graph", "a-graph", "b-graph"):
        await editor.post("/api/v1/graphs", content=HELLO.replace("hello", name, 1), headers=YAML)

    first = (await editor.get("/api/v1/graphs", params={"limit": 2})).json()
    rest = (
        await editor.get("/api/v1/graphs", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()

    assert [g["name"] for g in first["items"]] == ["a-graph", "b-graph"]
    assert [g["name"] for g in rest["items"]] == ["c-graph"]
    assert rest["next_cursor"] is None
    assert errors(await editor.get("/api/v1/graphs?cursor=garbage")) == [("query.cursor", None)]


# --- validation errors ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["yaml", "multipart"])
async def test_an_error_on_line_17_names_line_17(editor: httpx.AsyncClient, how: str) -> None:
    if how == "yaml":
        answer = await editor.post("/api/v1/graphs", content=LINE_17, headers=YAML)
    else:
        answer = await editor.post("/api/v1/graphs", files={"file": ("far.yaml", LINE_17.encode())})

    assert errors(answer) == [("nodes.d.retries", 17)]
    problem(await editor.get("/api/v1/graphs/far"), 404)


async def test_a_yaml_syntax_error_is_a_422_with_its_line(editor: httpx.AsyncClient) -> None:
    broken = "name: broken\nnodes:\n  a:\n    run: echo a\n   bad: [\n"

    answer = await editor.put("/api/v1/graphs/broken", content=broken, headers=YAML)

    body = problem(answer, 422)
    assert [(e["path"], e["line"]) for e in body["errors"]] == [("(document)", 5)]
    assert "invalid YAML" in body["errors"][0]["message"]


async def test_every_error_is_listed_with_its_line(editor: httpx.AsyncClient) -> None:
    document = """\
name: many
nodes:
  a:
    needs: [b]
    rn: echo a
    run: echo a
  b:
    needs: [a]
    run: echo b
    timout: 5s
"""
    answer = await editor.post("/api/v1/graphs/validate", content=document, headers=YAML)

    body = problem(answer, 422)
    by_path = {e["path"]: e for e in body["errors"]}
    assert (by_path["nodes.a.rn"]["line"], by_path["nodes.b.timout"]["line"]) == (5, 10)
    assert "did you mean 'run'" in by_path["nodes.a.rn"]["message"]
    assert "did you mean 'timeout'" in by_path["nodes.b.timout"]["message"]
    assert "3 errors" in body["detail"]
    cycle = [e for e in body["errors"] if "cycle" in e["message"]]
    assert cycle, body
    assert cycle[0]["line"] in (4, 8)


async def test_a_cycle_alone_is_reported(editor: httpx.AsyncClient) -> None:
    document = "name: loop\nnodes:\n  a:\n    needs: [b]\n    run: x\n  b:\n    needs: [a]\n"
    document += "    run: y\n"

    body = problem(await editor.post("/api/v1/graphs", content=document, headers=YAML), 422)

    assert [(e["path"], e["line"]) for e in body["errors"]] == [("nodes.a.needs", 4)]
    assert "cycle: a -> b -> a" in body["errors"][0]["message"]


async def test_invalid_json_and_non_utf8_documents_are_422(editor: httpx.AsyncClient) -> None:
    bad_json = await editor.post(
        "/api/v1/graphs",
        content=b'{\n  "name": "x",\n  "nodes": {,}\n}',
        headers={"Content-Type": "application/json"},
    )
    assert errors(bad_json) == [("body", 3)]

    latin1 = "name: caf\xe9\nnodes: {a: {run: x}}\n".encode("latin-1")
    assert errors(await editor.post("/api/v1/graphs", content=latin1, headers=YAML)) == [
        ("body", None)
    ]
    upload = await editor.post("/api/v1/graphs", files={"file": ("g.yaml", latin1)})
    assert errors(upload) == [("body.file", None)]


async def test_another_media_type_is_415(editor: httpx.AsyncClient) -> None:
    answer = await editor.post(
        "/api/v1/graphs", content="name,nodes\n", headers={"Content-Type": "text/csv"}
    )

    assert "text/csv" in problem(answer, 415)["detail"]
    problem(await editor.put("/api/v1/graphs/x", content=HELLO), 415)  # no content type


async def test_a_malformed_multipart_body_is_400(editor: httpx.AsyncClient) -> None:
    answer = await editor.post(
        "/api/v1/graphs",
        content=b"no parts here",
        headers={"Content-Type": "multipart/form-data"},  # no boundary
    )

    problem(answer, 400)


# --- size limits ------------------------------------------------------------------------


async def test_an_11_mib_upload_is_413(editor: httpx.AsyncClient) -> None:
    big = HELLO + "#" + "x" * (11 * 1024 * 1024) + "\n"

    as_yaml = await editor.post("/api/v1/graphs", content=big, headers=YAML)
    as_upload = await editor.post("/api/v1/graphs", files={"file": ("big.yaml", big.encode())})

    assert "10,485,760" in problem(as_yaml, 413)["detail"]
    problem(as_upload, 413)
    problem(await editor.get("/api/v1/graphs/hello"), 404)


async def test_a_declared_length_over_the_limit_is_refused_unread(
    editor: httpx.AsyncClient,
) -> None:
    """The body is never received: the declared Content-Length alone decides."""
    app = editor._transport.app  # type: ignore[attr-defined]
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    token = editor.headers["Authorization"].encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/graphs",
        "raw_path": b"/api/v1/graphs",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"loom.test"),
            (b"authorization", token),
            (b"content-type", b"application/yaml"),
            (b"content-length", str(11 * 1024 * 1024).encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("loom.test", 80),
    }

    await app(scope, receive, send)

    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 413
    assert received == 0


# --- pause, resume, delete --------------------------------------------------------------


async def test_patch_pauses_and_resumes_the_triggers(editor: httpx.AsyncClient) -> None:
    await editor.post("/api/v1/graphs", content=TIMED, headers=YAML)

    paused = await editor.patch("/api/v1/graphs/timed", json={"enabled": False})

    assert paused.status_code == 200, paused.text
    assert paused.json()["enabled"] is False
    fetched = (await editor.get("/api/v1/graphs/timed")).json()
    assert fetched["enabled"] is False
    assert len(fetched["triggers"]) == 6  # still shown, none of them fires
    assert all(t["next_fire_time"] is None for t in fetched["triggers"])

    resumed = await editor.patch("/api/v1/graphs/timed", json={"enabled": True})

    assert resumed.json()["enabled"] is True
    fetched = (await editor.get("/api/v1/graphs/timed")).json()
    assert fetched["enabled"] is True
    cron = next(t for t in fetched["triggers"] if t["kind"] == "cron")
    assert cron["next_fire_time"] is not None


async def test_patch_validates_its_body_and_the_name(editor: httpx.AsyncClient) -> None:
    await editor.post("/api/v1/graphs", content=HELLO, headers=YAML)

    assert errors(await editor.patch("/api/v1/graphs/hello", json={"enabled": "maybe"})) == [
        ("body.enabled", None)
    ]
    assert errors(await editor.patch("/api/v1/graphs/hello", json={"enable": False})) == [
        ("body.enabled", None),
        ("body.enable", None),
    ]
    problem(await editor.patch("/api/v1/graphs/nope", json={"enabled": False}), 404)


async def test_delete_removes_the_graph(editor: httpx.AsyncClient) -> None:
    await editor.post("/api/v1/graphs", content=HELLO, headers=YAML)

    answer = await editor.delete("/api/v1/graphs/hello")

    assert answer.status_code == 204
    assert answer.content == b""
    problem(await editor.get("/api/v1/graphs/hello"), 404)
    problem(await editor.delete("/api/v1/graphs/hello"), 404)
    assert (await editor.get("/api/v1/graphs")).json()["items"] == []
    recreated = await editor.post("/api/v1/graphs", content=HELLO, headers=YAML)
    assert recreated.status_code == 201


# --- triggers ---------------------------------------------------------------------------


async def test_triggers_show_their_next_fire_time(editor: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    graph = (await editor.post("/api/v1/graphs", content=TIMED, headers=YAML)).json()
    after = datetime.now(UTC)

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for trigger in graph["triggers"]:
        by_kind.setdefault(trigger["kind"], []).append(trigger)
    (cron,), (every,), (delay,), (webhook,) = (
        by_kind[k] for k in ("cron", "every", "delay", "webhook")
    )
    # New Year's midnight in Berlin is 23:00 UTC on Dec 31.
    fire = parse_time(cron["next_fire_time"])
    assert (fire.month, fire.day, fire.hour, fire.minute) == (12, 31, 23, 0)
    assert before < fire <= before + timedelta(days=366)
    fire = parse_time(every["next_fire_time"])
    assert before < fire <= after + timedelta(minutes=15)
    assert fire.minute % 15 == 0 and fire.second == 0
    at = {t["id"]: t["next_fire_time"] for t in by_kind["at"]}
    assert at["long-ago"] is None
    assert [v for k, v in at.items() if k != "long-ago"] == ["2099-06-01T12:00:00Z"]
    assert delay["next_fire_time"] is None
    assert webhook == {"id": "webhook:push", "kind": "webhook", "next_fire_time": None}


async def test_an_old_version_shows_no_fire_times(editor: httpx.AsyncClient) -> None:
    await editor.put("/api/v1/graphs/timed", content=TIMED, headers=YAML)
    await editor.put("/api/v1/graphs/timed", content=TIMED + "description: v2\n", headers=YAML)

    old = (await editor.get("/api/v1/graphs/timed?version=1")).json()

    assert len(old["triggers"]) == 6
    assert all(t["next_fire_time"] is None for t in old["triggers"])


# --- validate ---------------------------------------------------------------------------


async def test_validate_answers_valid_without_storing(viewer: httpx.AsyncClient) -> None:
    answer = await viewer.post("/api/v1/graphs/validate", content=HELLO, headers=YAML)

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"valid": True, "name": "hello"}
    problem(await viewer.get("/api/v1/graphs/hello"), 404)
    assert (await viewer.get("/api/v1/graphs")).json()["items"] == []


async def test_validate_takes_json_and_uploads_too(viewer: httpx.AsyncClient) -> None:
    as_json = await viewer.post(
        "/api/v1/graphs/validate", json={"name": "j", "nodes": {"a": {"run": "x"}}}
    )
    upload = await viewer.post(
        "/api/v1/graphs/validate", files={"file": ("far.yaml", LINE_17.encode())}
    )

    assert as_json.json() == {"valid": True, "name": "j"}
    assert errors(upload) == [("nodes.d.retries", 17)]


async def test_get_of_validate_is_an_ordinary_graph_lookup(editor: httpx.AsyncClient) -> None:
    """`validate` is only a route for POST: GET looks for a graph of that name."""
    assert "validate" in problem(await editor.get("/api/v1/graphs/validate"), 404)["detail"]
    named = HELLO.replace("name: hello", "name: validate")
    assert (
        await editor.put("/api/v1/graphs/validate", content=named, headers=YAML)
    ).status_code == 201
    assert (await editor.get("/api/v1/graphs/validate")).json()["name"] == "validate"


# --- deliveries -------------------------------------------------------------------------


async def test_deliveries_are_listed_newest_first(
    db: Database, editor: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    await editor.post("/api/v1/graphs", content=HELLO, headers=YAML)
    async with db.transaction() as conn:
        for n, (hook, code, outcome) in enumerate(
            [("push", 202, "accepted"), ("push", 401, "unauthorized"), ("tag", 200, "duplicate")]
        ):
            await deliveries.record_delivery(
                conn,
                graph="hello",
                hook=hook,
                delivery_id=f"d{n}",
                status_code=code,
                outcome=outcome,
                detail="bad signature" if code == 401 else None,
            )
        await deliveries.record_delivery(
            conn, graph="other", hook="push", delivery_id="x", status_code=202, outcome="accepted"
        )

    first = (await viewer.get("/api/v1/graphs/hello/deliveries?limit=2")).json()
    rest = (
        await viewer.get(
            "/api/v1/graphs/hello/deliveries", params={"limit": 2, "cursor": first["next_cursor"]}
        )
    ).json()
    push = (await viewer.get("/api/v1/graphs/hello/deliveries?hook=push")).json()

    assert [(d["delivery_id"], d["status_code"], d["outcome"]) for d in first["items"]] == [
        ("d2", 200, "duplicate"),
        ("d1", 401, "unauthorized"),
    ]
    assert first["items"][1]["detail"] == "bad signature"
    assert first["items"][0]["received_at"].endswith("Z")
    assert [d["delivery_id"] for d in rest["items"]] == ["d0"]
    assert rest["next_cursor"] is None
    assert [d["delivery_id"] for d in push["items"]] == ["d1", "d0"]
    problem(await viewer.get("/api/v1/graphs/nope/deliveries"), 404)
    assert errors(await viewer.get("/api/v1/graphs/hello/deliveries?cursor=zz")) == [
        ("query.cursor", None)
    ]


# --- graph.changed ----------------------------------------------------------------------


async def test_each_change_reaches_the_control_channel(
    runtime: Runtime, editor: httpx.AsyncClient
) -> None:
    seen: list[dict[str, Any]] = []

    async def expect(count: int) -> None:
        async with asyncio.timeout(10):
            while len(seen) < count:
                message = await anext(messages)
                if message.type == "graph.changed":
                    seen.append(message.data)

    async with (
        runtime.broker.control.subscribe() as messages,
        OutboxRelay(runtime.database, runtime.broker.publishers()),
    ):
        await editor.put("/api/v1/graphs/hello", content=HELLO, headers=YAML)
        await expect(1)
        await editor.put("/api/v1/graphs/hello", content=HELLO, headers=YAML)  # unchanged
        await editor.patch("/api/v1/graphs/hello", json={"enabled": False})
        await expect(2)
        await editor.delete("/api/v1/graphs/hello")
        await expect(3)

    assert seen == [
        {"graph": "hello", "version": 1, "enabled": True, "deleted": False},
        {"graph": "hello", "version": 1, "enabled": False, "deleted": False},
        {"graph": "hello", "version": 1, "enabled": False, "deleted": True},
    ]


# --- the OpenAPI document ---------------------------------------------------------------


async def test_the_openapi_document_describes_the_graph_bodies(
    anonymous: httpx.AsyncClient,
) -> None:
    document = (await anonymous.get("/api/v1/openapi.json")).json()
    post = document["paths"]["/api/v1/graphs"]["post"]
    put = document["paths"]["/api/v1/graphs/{name}"]["put"]

    content = post["requestBody"]["content"]
    assert content["application/yaml"]["schema"] == {"type": "string"}
    assert content["application/json"]["schema"] == {"type": "object"}
    assert content["multipart/form-data"]["schema"]["properties"]["file"] == {
        "type": "string",
        "contentMediaType": "application/octet-stream",
    }
    assert {"201", "409", "413", "415", "422"} <= set(post["responses"])
    assert {"200", "201", "413", "422"} <= set(put["responses"])
    assert json.dumps(document)  # serializable as it is


@pytest.mark.parametrize(
    ("content", "media_type"),
    [(b"", "application/yaml"), (b"[1, 2]", "application/json"), (b"just text", "text/yaml")],
)
async def test_a_document_that_is_not_a_graph_is_422(
    editor: httpx.AsyncClient, content: bytes, media_type: str
) -> None:
    answer = await editor.post(
        "/api/v1/graphs/validate", content=content, headers={"Content-Type": media_type}
    )

    assert [path for path, _ in errors(answer)] == ["(document)"]
