"""The admin routes: the audit log (admin only, filters, cursors) and the dead-letter
queue (list with the reason and what the message was, replay, 404, broker down → 503), the
dead letters made for real on the memory broker and on RabbitMQ."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import orjson
import pytest

from loom_db import audit
from loom_messaging import encode
from loom_rest import Runtime
from loom_rest.routes.admin import PREVIEW_BYTES, body_preview


async def add_entries(runtime: Runtime) -> None:
    async with runtime.database.transaction() as conn:
        for actor, action, kind, object_id in [
            ("alice", "graph.create", "graph", "nightly"),
            ("bob", "graph.update", "graph", "nightly"),
            ("alice", "graph.create", "graph", "hourly"),
            ("alice", "secret.create", "secret", "TOKEN"),
            ("bob", "user.update", "user", "alice"),
        ]:
            await audit.record(
                conn, actor=actor, action=action, object_type=kind, object_id=object_id
            )


async def actions(clients: Any, query: str) -> list[str]:
    answer = await clients.admin.get(f"/api/v1/audit?{query}")
    assert answer.status_code == 200, answer.text
    return [f"{e['actor']} {e['action']} {e['object_id']}" for e in answer.json()["items"]]


# --- audit ------------------------------------------------------------------------------


async def test_audit_is_newest_first_and_filtered_by_actor_and_object(
    runtime: Runtime, clients: Any
) -> None:
    await add_entries(runtime)
    assert await actions(clients, "actor=alice") == [
        "alice secret.create TOKEN",
        "alice graph.create hourly",
        "alice graph.create nightly",
    ]
    assert await actions(clients, "object=graph") == [
        "alice graph.create hourly",
        "bob graph.update nightly",
        "alice graph.create nightly",
    ]
    assert await actions(clients, "object=graph:nightly") == [
        "bob graph.update nightly",
        "alice graph.create nightly",
    ]
    assert await actions(clients, "object=graph:nightly&actor=bob") == ["bob graph.update nightly"]
    assert await actions(clients, "actor=nobody") == []


async def test_audit_entries_have_their_fields(runtime: Runtime, clients: Any) -> None:
    async with runtime.database.transaction() as conn:
        await audit.record(
            conn,
            actor="alice",
            action="graph.create",
            object_type="graph",
            object_id="nightly",
            detail={"version": 1},
        )
    entry = (await clients.admin.get("/api/v1/audit?actor=alice")).json()["items"][0]
    assert entry["detail"] == {"version": 1}
    assert entry["object_type"] == "graph" and entry["ts"].endswith("Z")
    assert isinstance(entry["id"], int)


async def test_audit_pages_neither_repeat_nor_skip(runtime: Runtime, clients: Any) -> None:
    await add_entries(runtime)
    everything = await actions(clients, "limit=500")
    seen: list[str] = []
    cursor = None
    while True:
        url = "/api/v1/audit?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (await clients.admin.get(url)).json()
        seen += [f"{e['actor']} {e['action']} {e['object_id']}" for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == everything and len(seen) >= 5


@pytest.mark.parametrize(
    ("query", "path"),
    [("cursor=nope", "query.cursor"), ("limit=0", "query.limit"), ("actor=a%00b", "query.actor")],
)
async def test_audit_refuses_invalid_queries(clients: Any, query: str, path: str) -> None:
    answer = await clients.admin.get(f"/api/v1/audit?{query}")
    assert answer.status_code == 422
    assert [e["path"] for e in answer.json()["errors"]] == [path]


@pytest.mark.parametrize("who", ["anonymous", "viewer", "editor", "api-editor"])
async def test_audit_and_dead_letters_are_for_admins_only(clients: Any, who: str) -> None:
    expected = 401 if who == "anonymous" else 403
    client = clients.as_(who)
    assert (await client.get("/api/v1/audit")).status_code == expected
    assert (await client.get("/api/v1/dlq")).status_code == expected
    assert (await client.post("/api/v1/dlq/x/replay")).status_code == expected
    assert (await clients.api["admin"].get("/api/v1/audit")).status_code == 200


# --- dead letters -----------------------------------------------------------------------

BOTH_BROKERS = pytest.mark.parametrize("broker", ["memory", "rabbitmq"], indirect=True)
UNKNOWN_TYPE = {"type": "execution.exploded", "version": 1, "id": "m-1", "ts": "", "data": {"n": 1}}


async def dead_letter_three(runtime: Runtime) -> dict[str, Any]:
    """Dead-letter, for real, what a worker meets: a body that is not JSON and an envelope
    of an unknown type (both refused by the consumer), and a valid message its consumer
    gave up on. Returns the valid message's data."""
    queue = runtime.broker.queue
    message = {"execution_id": "e-1", "graph": "build"}
    await queue.publish(b"not json at all", "junk")
    await queue.publish(orjson.dumps(UNKNOWN_TYPE), "odd")
    await queue.publish(encode("execution.requested", message), "e-1")
    async with queue.consume() as deliveries:
        async with asyncio.timeout(10):
            delivery = await anext(aiter(deliveries))
        await delivery.dead_letter("graph 'build' is gone")
    deadline = time.monotonic() + 10  # a broker's consumer refuses the others on its own time
    while len(await queue.dead_letters()) < 3:
        assert time.monotonic() < deadline, await queue.dead_letters()
        await asyncio.sleep(0.05)
    return message


async def test_the_dead_letter_list_starts_empty(clients: Any) -> None:
    answer = await clients.admin.get("/api/v1/dlq")
    assert answer.status_code == 200
    assert answer.json() == {"items": [], "next_cursor": None}


@BOTH_BROKERS
async def test_dead_letters_are_listed_with_reason_and_what_the_message_was(
    runtime: Runtime, clients: Any
) -> None:
    message = await dead_letter_three(runtime)
    answer = await clients.admin.get("/api/v1/dlq")
    assert answer.status_code == 200
    by_key = {item["key"]: item for item in answer.json()["items"]}
    assert set(by_key) == {"junk", "odd", "e-1"}
    valid = by_key["e-1"]
    assert valid["reason"] == "graph 'build' is gone"
    assert valid["type"] == "execution.requested" and valid["data"] == message
    assert valid["preview"] is None and valid["size"] > 0
    assert valid["at"].endswith("Z") and valid["id"]
    odd = by_key["odd"]
    assert odd["reason"] == "unknown message type 'execution.exploded'"
    assert (odd["type"], odd["data"], odd["preview"]) == ("execution.exploded", {"n": 1}, None)
    junk = by_key["junk"]
    assert junk["type"] is None and junk["data"] is None and "JSON" in junk["reason"]
    assert (junk["preview"], junk["preview_encoding"], junk["size"]) == (
        "not json at all",
        "text",
        15,
    )
    assert answer.json()["next_cursor"] is None
    limited = (await clients.admin.get("/api/v1/dlq?limit=1")).json()["items"]
    assert len(limited) == 1


async def test_a_binary_dead_letter_is_previewed_as_base64(runtime: Runtime, clients: Any) -> None:
    body = b"\x00\xffbinary" * 200  # 1,600 bytes: the preview is the first 1,024
    await runtime.broker.queue.publish(body, "bin")
    async with runtime.broker.queue.consume() as deliveries:
        with pytest.raises(TimeoutError):  # refused, never delivered
            async with asyncio.timeout(0.2):
                await anext(aiter(deliveries))
    [item] = (await clients.admin.get("/api/v1/dlq")).json()["items"]
    assert item["preview_encoding"] == "base64" and item["size"] == 1600
    assert base64.b64decode(item["preview"]) == body[:PREVIEW_BYTES]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"plain text\n\tindented", ("plain text\n\tindented", "text")),
        (b"a" + "é".encode() * 600, ("a" + "é" * 511, "text")),  # a character cut in two: left out
        (b"bell\x07", (base64.b64encode(b"bell\x07").decode(), "base64")),
        (b"\xc3", (base64.b64encode(b"\xc3").decode(), "base64")),  # whole, yet not UTF-8
        (b"", ("", "text")),
    ],
)
def test_body_preview_is_text_only_when_it_reads_as_text(
    body: bytes, expected: tuple[str, str]
) -> None:
    assert body_preview(body) == expected


@BOTH_BROKERS
async def test_replay_puts_a_dead_letter_back_on_the_queue(runtime: Runtime, clients: Any) -> None:
    message = await dead_letter_three(runtime)
    listed = (await clients.admin.get("/api/v1/dlq")).json()["items"]
    letter = next(item for item in listed if item["key"] == "e-1")
    answer = await clients.admin.post(f"/api/v1/dlq/{letter['id']}/replay")
    assert answer.status_code == 202
    remaining = (await clients.admin.get("/api/v1/dlq")).json()["items"]
    assert sorted(item["key"] for item in remaining) == ["junk", "odd"]
    async with runtime.broker.queue.consume() as deliveries:
        async with asyncio.timeout(10):
            delivery = await anext(aiter(deliveries))
        await delivery.ack()
    assert (delivery.key, delivery.envelope.data) == ("e-1", message)
    entries = (await clients.admin.get("/api/v1/audit?object=dead_letter")).json()["items"]
    assert [(e["action"], e["actor"], e["object_id"]) for e in entries] == [
        ("dead_letter.replay", "admin", letter["id"])
    ]
    again = await clients.admin.post(f"/api/v1/dlq/{letter['id']}/replay")
    assert again.status_code == 404  # replayed once: it is no dead letter any more


@BOTH_BROKERS
@pytest.mark.parametrize("letter_id", ["no-such-letter", "%00", "x" * 300])
async def test_replay_of_an_unknown_dead_letter_is_404(clients: Any, letter_id: str) -> None:
    answer = await clients.admin.post(f"/api/v1/dlq/{letter_id}/replay")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")
    audit_log = (await clients.admin.get("/api/v1/audit?object=dead_letter")).json()
    assert audit_log["items"] == []


async def test_dead_letters_answer_503_while_the_broker_is_unreachable(
    runtime: Runtime, clients: Any
) -> None:
    await runtime.broker.close()
    answer = await clients.admin.get("/api/v1/dlq")
    assert answer.status_code == 503
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "broker" in answer.json()["detail"] and answer.headers["Retry-After"]
    assert (await clients.admin.post("/api/v1/dlq/x/replay")).status_code == 503
