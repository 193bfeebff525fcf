"""The secret routes: values go in and never come out (not in lists, not in the audit
log); names are listed, replaced, deleted; names are checked."""

from __future__ import annotations

from typing import Any

import pytest

from loom_db import secrets
from loom_rest import Runtime

VALUE = "hunter2-very-secret-value"


async def test_a_stored_secret_is_listed_by_name_and_never_shown(
    runtime: Runtime, clients: Any
) -> None:
    answer = await clients.editor.put("/api/v1/secrets/DEPLOY_TOKEN", json={"value": VALUE})
    assert answer.status_code == 204 and answer.content == b""
    listed = await clients.editor.get("/api/v1/secrets")
    assert listed.status_code == 200
    assert listed.json() == {"items": [{"name": "DEPLOY_TOKEN"}], "next_cursor": None}
    assert VALUE not in listed.text
    async with runtime.database.read() as conn:
        assert await secrets.get_secret(conn, runtime.keys, "DEPLOY_TOKEN") == VALUE


async def test_putting_a_secret_again_replaces_its_value(runtime: Runtime, clients: Any) -> None:
    await clients.editor.put("/api/v1/secrets/TOKEN", json={"value": "old"})
    answer = await clients.editor.put("/api/v1/secrets/TOKEN", json={"value": "new"})
    assert answer.status_code == 204
    async with runtime.database.read() as conn:
        assert await secrets.get_secret(conn, runtime.keys, "TOKEN") == "new"
    listed = (await clients.editor.get("/api/v1/secrets")).json()["items"]
    assert listed == [{"name": "TOKEN"}]


async def test_secret_changes_are_audited_without_their_values(clients: Any) -> None:
    await clients.editor.put("/api/v1/secrets/TOKEN", json={"value": VALUE})
    await clients.editor.put("/api/v1/secrets/TOKEN", json={"value": VALUE + "2"})
    await clients.editor.delete("/api/v1/secrets/TOKEN")
    answer = await clients.admin.get("/api/v1/audit?object=secret:TOKEN")
    actions = [(e["action"], e["actor"]) for e in answer.json()["items"]]
    assert actions == [
        ("secret.delete", "editor"),
        ("secret.update", "editor"),
        ("secret.create", "editor"),
    ]
    assert VALUE not in answer.text


async def test_delete_removes_a_secret_and_an_unknown_one_is_404(
    runtime: Runtime, clients: Any
) -> None:
    await clients.editor.put("/api/v1/secrets/TOKEN", json={"value": VALUE})
    assert (await clients.editor.delete("/api/v1/secrets/TOKEN")).status_code == 204
    assert (await clients.editor.get("/api/v1/secrets")).json()["items"] == []
    again = await clients.editor.delete("/api/v1/secrets/TOKEN")
    assert again.status_code == 404
    assert again.headers["content-type"].startswith("application/problem+json")
    assert (await clients.editor.delete("/api/v1/secrets/not%20a%20name")).status_code == 404


@pytest.mark.parametrize("name", ["1ST", "has-dash", "x" * 101, "sp%20ace"])
async def test_an_invalid_secret_name_is_422(clients: Any, name: str) -> None:
    answer = await clients.editor.put(f"/api/v1/secrets/{name}", json={"value": VALUE})
    assert answer.status_code == 422, answer.text
    assert [e["path"] for e in answer.json()["errors"]] == ["path.name"]
    assert (await clients.editor.get("/api/v1/secrets")).json()["items"] == []


async def test_a_secret_name_with_a_nul_is_not_found_and_stores_nothing(clients: Any) -> None:
    answer = await clients.editor.put("/api/v1/secrets/nul%00", json={"value": VALUE})
    assert answer.status_code == 404, answer.text
    assert (await clients.editor.get("/api/v1/secrets")).json()["items"] == []


@pytest.mark.parametrize(
    ("body", "path"),
    [({}, "body.value"), ({"value": 3}, "body.value"), ({"value": "v", "x": 1}, "body.x")],
)
async def test_an_invalid_secret_body_is_422(clients: Any, body: object, path: str) -> None:
    answer = await clients.editor.put("/api/v1/secrets/TOKEN", json=body)
    assert answer.status_code == 422
    assert path in [e["path"] for e in answer.json()["errors"]]


async def test_secret_names_come_a_page_at_a_time(clients: Any) -> None:
    names = [f"S{i}" for i in range(5)]
    for name in names:
        await clients.editor.put(f"/api/v1/secrets/{name}", json={"value": "v"})
    seen: list[str] = []
    cursor = None
    while True:
        url = "/api/v1/secrets?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (await clients.editor.get(url)).json()
        assert len(page["items"]) <= 2
        seen += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == names
    bad = await clients.editor.get("/api/v1/secrets?cursor=garbage")
    assert bad.status_code == 422


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/v1/secrets"), ("PUT", "/api/v1/secrets/TOKEN"), ("DELETE", "/api/v1/secrets/T")],
)
async def test_secrets_need_the_editor_role(clients: Any, method: str, path: str) -> None:
    body = {"value": VALUE} if method == "PUT" else None
    answer = await clients.viewer.request(method, path, json=body)
    assert answer.status_code == 403
    assert (await clients.anonymous.request(method, path, json=body)).status_code == 401
