"""Holes a review found, closed: concurrent login guesses, tokens minted by tokens,
proxied client addresses, out-of-range values that used to answer 500, what /readyz and
GET /api/v1/ reveal."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from typing import Any

import httpx
import orjson

from loom_db import graphs, users
from loom_rest import Runtime, create_app


async def test_concurrent_wrong_passwords_are_limited_like_sequential_ones(
    clients: Any, runtime: Runtime
) -> None:
    guesses = [
        clients.anonymous.post(
            "/api/v1/auth/login", json={"username": "viewer", "password": f"guess {n}"}
        )
        for n in range(30)
    ]
    answers = await asyncio.gather(*guesses)
    statuses = [a.status_code for a in answers]
    assert statuses.count(401) == runtime.settings.rest_login_attempts
    assert statuses.count(429) == 30 - runtime.settings.rest_login_attempts


async def test_an_api_token_cannot_mint_another_token(clients: Any) -> None:
    answer = await clients.api["admin"].post("/api/v1/tokens", json={"name": "forever"})
    assert answer.status_code == 403
    assert answer.headers["content-type"] == "application/problem+json"


async def test_behind_a_trusted_proxy_the_limit_counts_the_forwarded_client(
    runtime: Runtime,
) -> None:
    settings = runtime.settings.model_copy(update={"rest_trusted_proxy_hops": 1})
    app = create_app(dataclasses.replace(runtime, settings=settings))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://loom.test"
    ) as client:
        limit = 4 * runtime.settings.rest_login_attempts  # per address
        for n in range(limit):
            answer = await client.post(
                "/api/v1/auth/login",
                json={"username": f"nobody{n}", "password": "x"},
                headers={"X-Forwarded-For": "198.51.100.7"},
            )
            assert answer.status_code == 401
        blocked = await client.post(
            "/api/v1/auth/login",
            json={"username": "someone", "password": "x"},
            headers={"X-Forwarded-For": "198.51.100.7"},
        )
        other = await client.post(
            "/api/v1/auth/login",
            json={"username": "someone", "password": "x"},
            headers={"X-Forwarded-For": "198.51.100.8"},
        )
    assert blocked.status_code == 429
    assert other.status_code == 401


def _cursor(*values: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(list(values))).decode().rstrip("=")


async def test_out_of_range_values_are_4xx_not_500(clients: Any) -> None:
    requests = [
        ("POST", "/api/v1/tokens", {"name": "x", "expires_at": "9999-12-31T23:59:59-05:00"}),
        ("GET", "/api/v1/graphs/foo?version=9223372036854775808", None),
        ("GET", "/api/v1/graphs/foo?version=2147483648", None),
        ("GET", f"/api/v1/graphs?cursor={_cursor(chr(0))}", None),
        ("GET", f"/api/v1/users?cursor={_cursor(chr(0))}", None),
        ("GET", f"/api/v1/audit?cursor={_cursor(2**63)}", None),
        ("GET", f"/api/v1/executions?cursor={_cursor('9999-12-31T23:59:59-05:00', 'x')}", None),
        ("GET", f"/api/v1/executions?cursor={_cursor('0001-01-01T00:00:00+05:00', 'x')}", None),
    ]
    for method, path, body in requests:
        answer = await clients.admin.request(method, path, json=body)
        assert 400 <= answer.status_code < 500, (path, answer.status_code, answer.text)
        assert answer.headers["content-type"] == "application/problem+json", path


async def test_readyz_names_what_is_down_but_not_the_driver_error(runtime: Runtime) -> None:
    await runtime.broker.close()
    app = create_app(runtime)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://loom.test"
    ) as client:
        answer = await client.get("/readyz")
    assert answer.status_code == 503
    problem = answer.json()
    assert set(problem["checks"].values()) <= {"ok", "unavailable"}
    assert "unavailable" in problem["checks"].values()


async def test_the_websocket_url_of_an_ipv6_host_is_bracketed(runtime: Runtime) -> None:
    app = create_app(runtime)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://[::1]:8080"
    ) as client:
        answer = await client.get("/api/v1/")
    assert answer.json()["ws_url"] == "ws://[::1]:8081"


async def test_a_demoted_admin_cannot_use_an_old_token_to_restore_itself(
    clients: Any, runtime: Runtime
) -> None:
    """The token says admin; the database says viewer and disabled: the database wins
    (within the one-second cache), before the token expires."""
    made = await clients.admin.post(
        "/api/v1/users",
        json={"username": "bob", "password": "bob's long password", "role": "admin"},
    )
    assert made.status_code == 201, made.text
    login = await clients.anonymous.post(
        "/api/v1/auth/login", json={"username": "bob", "password": "bob's long password"}
    )
    bob = {"Authorization": f"Bearer {login.json()['access_token']}"}
    assert (await clients.anonymous.get("/api/v1/users", headers=bob)).status_code == 200
    demoted = await clients.admin.patch(
        "/api/v1/users/bob", json={"role": "viewer", "disabled": True}
    )
    assert demoted.status_code == 200, demoted.text
    await asyncio.sleep(1.1)  # the role cache's lifetime
    restore = await clients.anonymous.patch(
        "/api/v1/users/bob", json={"role": "admin", "disabled": False}, headers=bob
    )
    assert restore.status_code == 401
    async with runtime.database.read() as conn:
        bob_now = await users.get_user(conn, "bob")
    assert (bob_now.role, bob_now.disabled) == ("viewer", True)


async def test_a_demoted_user_gets_the_lower_role_at_once_for_its_token(
    clients: Any,
) -> None:
    made = await clients.admin.post(
        "/api/v1/users",
        json={"username": "eve", "password": "eve's long password", "role": "editor"},
    )
    assert made.status_code == 201, made.text
    login = await clients.anonymous.post(
        "/api/v1/auth/login", json={"username": "eve", "password": "eve's long password"}
    )
    eve = {"Authorization": f"Bearer {login.json()['access_token']}"}
    await clients.admin.patch("/api/v1/users/eve", json={"role": "viewer"})
    await asyncio.sleep(1.1)
    answer = await clients.anonymous.put("/api/v1/secrets/X", json={"value": "v"}, headers=eve)
    assert answer.status_code == 403


async def test_an_integer_beyond_64_bits_in_params_is_422_and_stores_nothing(
    clients: Any, runtime: Runtime
) -> None:
    source = "name: g1\nparams:\n  o: {type: object}\nnodes: {a: {run: 'true'}}\n"
    async with runtime.database.transaction() as conn:
        await graphs.apply_graph(conn, source, by="editor")
    answer = await clients.editor.post(
        "/api/v1/graphs/g1/executions",
        content=b'{"params": {"o": {"x": 99999999999999999999}}}',
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["path"] == "body.params.o.x"
    listed = await clients.viewer.get("/api/v1/executions")
    assert listed.status_code == 200
    assert listed.json()["items"] == []


async def test_a_repeated_idempotency_key_answers_as_first_after_a_pause_or_a_new_default(
    clients: Any, runtime: Runtime
) -> None:
    """DESIGN §5: the same key again answers 200 with the same execution — also when the
    graph was paused, or a new version changed a default, in between."""
    first_version = (
        "name: g2\nparams:\n  n: {type: integer, default: 1}\nnodes: {a: {run: 'true'}}\n"
    )
    async with runtime.database.transaction() as conn:
        await graphs.apply_graph(conn, first_version, by="editor")
    key = {"Idempotency-Key": "deploy-42"}
    first = await clients.editor.post("/api/v1/graphs/g2/executions", json={}, headers=key)
    assert first.status_code == 202, first.text
    async with runtime.database.transaction() as conn:
        await graphs.apply_graph(conn, first_version.replace("default: 1", "default: 2"), by="x")
        await graphs.set_enabled(conn, "g2", False, by="x")
    again = await clients.editor.post("/api/v1/graphs/g2/executions", json={}, headers=key)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    other = await clients.editor.post(
        "/api/v1/graphs/g2/executions", json={"params": {"n": 5}}, headers=key
    )
    assert other.status_code == 422
    fresh = await clients.editor.post(
        "/api/v1/graphs/g2/executions", json={}, headers={"Idempotency-Key": "deploy-43"}
    )
    assert fresh.status_code == 409  # paused: a new key starts nothing
