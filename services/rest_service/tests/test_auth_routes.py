"""Login, refresh, logout, me and my password, on both databases: what a client sees
(status, problem details, which tokens still work) and what the audit log keeps."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from loom_auth import PasswordParams, hash_password, needs_rehash
from loom_db import audit, users
from loom_rest import Runtime

NEW_PASSWORD = "a much longer passphrase 2"


@pytest.fixture
def password(runtime: Runtime) -> str:
    """The fixture users' password (conftest sets it as the admin password too)."""
    assert runtime.settings.admin_password is not None
    return runtime.settings.admin_password.get_secret_value()


async def _login(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )


async def _pair(client: httpx.AsyncClient, username: str, password: str) -> dict[str, Any]:
    answer = await _login(client, username, password)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


async def _refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/api/v1/auth/refresh", json={"refresh_token": token})


async def _me(client: httpx.AsyncClient, access_token: str) -> httpx.Response:
    return await client.get("/api/v1/me", headers={"Authorization": f"Bearer {access_token}"})


def _is_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    return body


async def _actions(runtime: Runtime, **where: str) -> list[str]:
    async with runtime.database.read() as conn:
        entries, _ = await audit.list_audit(conn, **where)
    return [entry.action for entry in entries]


# --- login -------------------------------------------------------------------------------


async def test_login_answers_a_token_pair_whose_access_token_opens_viewer_routes(
    clients: Any, runtime: Runtime, password: str
) -> None:
    pair = await _pair(clients.anonymous, "editor", password)
    assert pair["token_type"] == "bearer"
    assert pair["expires_in"] == runtime.settings.rest_access_token_seconds
    me = await _me(clients.anonymous, pair["access_token"])
    assert me.json() == {"username": "editor", "role": "editor", "token": "access"}
    assert "session.create" in await _actions(runtime, actor="editor")


async def test_an_unknown_user_and_a_wrong_password_get_the_same_401(
    clients: Any, password: str
) -> None:
    wrong = _is_problem(await _login(clients.anonymous, "viewer", password + "!"), 401)
    unknown_answer = await _login(clients.anonymous, "nobody", password)
    unknown = _is_problem(unknown_answer, 401)
    assert wrong == unknown
    assert "WWW-Authenticate" in unknown_answer.headers
    assert "access_token" not in unknown


async def test_a_disabled_user_cannot_log_in(clients: Any, password: str) -> None:
    answer = await clients.admin.patch("/api/v1/users/viewer", json={"disabled": True})
    assert answer.status_code == 200, answer.text
    refused = _is_problem(await _login(clients.anonymous, "viewer", password), 401)
    unknown = _is_problem(await _login(clients.anonymous, "nobody", password), 401)
    assert refused == unknown


async def test_too_many_failed_logins_answer_429_with_retry_after_even_for_the_right_password(
    clients: Any, runtime: Runtime, password: str
) -> None:
    for _ in range(runtime.settings.rest_login_attempts):
        _is_problem(await _login(clients.anonymous, "viewer", "not the password"), 401)
    answer = await _login(clients.anonymous, "viewer", password)
    _is_problem(answer, 429)
    assert int(answer.headers["Retry-After"]) >= 1
    # Case does not buy more attempts; another user is not affected.
    _is_problem(await _login(clients.anonymous, "VIEWER", password), 429)
    await _pair(clients.anonymous, "editor", password)


async def test_failures_from_one_address_are_limited_across_usernames(
    clients: Any, runtime: Runtime, password: str
) -> None:
    for index in range(4 * runtime.settings.rest_login_attempts):
        _is_problem(await _login(clients.anonymous, f"guess{index}", password), 401)
    answer = await _login(clients.anonymous, "viewer", password)
    _is_problem(answer, 429)
    assert "Retry-After" in answer.headers


async def test_login_rehashes_a_password_hashed_with_old_parameters(
    clients: Any, runtime: Runtime, password: str
) -> None:
    weak = PasswordParams(time_cost=1, memory_cost=8192, parallelism=1)
    async with runtime.database.transaction() as conn:
        await users.set_password(conn, "viewer", hash_password(password, weak), by=None)
    await _pair(clients.anonymous, "viewer", password)
    async with runtime.database.read() as conn:
        _, stored = await users.get_password_hash(conn, "viewer")
    assert not needs_rehash(stored, runtime.password_params)
    await _pair(clients.anonymous, "viewer", password)  # the new hash verifies


# --- refresh -----------------------------------------------------------------------------


async def test_refresh_rotates_the_refresh_token_and_answers_a_working_access_token(
    clients: Any, password: str
) -> None:
    first = await _pair(clients.anonymous, "viewer", password)
    answer = await _refresh(clients.anonymous, first["refresh_token"])
    assert answer.status_code == 200, answer.text
    second = answer.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await _me(clients.anonymous, second["access_token"])).json()["username"] == "viewer"
    third = await _refresh(clients.anonymous, second["refresh_token"])
    assert third.status_code == 200, third.text


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(
    clients: Any, runtime: Runtime, password: str
) -> None:
    stolen = await _pair(clients.anonymous, "viewer", password)
    legit = (await _refresh(clients.anonymous, stolen["refresh_token"])).json()
    reused = await _refresh(clients.anonymous, stolen["refresh_token"])
    body = _is_problem(reused, 401)
    assert 'error="invalid_token"' in reused.headers["WWW-Authenticate"]
    # The token the legitimate rotation issued dies with the family.
    after = _is_problem(await _refresh(clients.anonymous, legit["refresh_token"]), 401)
    assert after == body
    assert "session.reuse" in await _actions(runtime, object_type="refresh_family")
    # Other sessions of the user are untouched.
    other = await _pair(clients.anonymous, "viewer", password)
    assert (await _refresh(clients.anonymous, other["refresh_token"])).status_code == 200


async def test_a_refreshed_access_token_carries_the_users_current_role(
    clients: Any, password: str
) -> None:
    pair = await _pair(clients.anonymous, "editor", password)
    answer = await clients.admin.patch("/api/v1/users/editor", json={"role": "viewer"})
    assert answer.status_code == 200, answer.text
    refreshed = (await _refresh(clients.anonymous, pair["refresh_token"])).json()
    assert (await _me(clients.anonymous, refreshed["access_token"])).json()["role"] == "viewer"


@pytest.mark.parametrize("change", ["disable", "delete"])
async def test_a_disabled_or_deleted_user_cannot_refresh(
    clients: Any, password: str, change: str
) -> None:
    pair = await _pair(clients.anonymous, "viewer", password)
    if change == "disable":
        answer = await clients.admin.patch("/api/v1/users/viewer", json={"disabled": True})
    else:
        answer = await clients.admin.delete("/api/v1/users/viewer")
    assert answer.status_code in (200, 204), answer.text
    _is_problem(await _refresh(clients.anonymous, pair["refresh_token"]), 401)


@pytest.mark.parametrize(
    "token",
    [
        "not-a-refresh-token",
        "00000000-0000-0000-0000-000000000000." + "A" * 43,  # well formed, unknown family
        "a.b.c",
    ],
)
async def test_a_malformed_or_unknown_refresh_token_is_401(clients: Any, token: str) -> None:
    answer = await _refresh(clients.anonymous, token)
    body = _is_problem(answer, 401)
    assert body["detail"] == "the token is invalid or expired"


async def test_an_access_token_is_not_a_refresh_token(clients: Any, password: str) -> None:
    pair = await _pair(clients.anonymous, "viewer", password)
    _is_problem(await _refresh(clients.anonymous, pair["access_token"]), 401)


# --- logout ------------------------------------------------------------------------------


async def test_logout_ends_the_session_so_its_refresh_token_stops_working(
    clients: Any, runtime: Runtime, password: str
) -> None:
    pair = await _pair(clients.anonymous, "viewer", password)
    other = await _pair(clients.anonymous, "viewer", password)
    headers = {"Authorization": f"Bearer {pair['access_token']}"}
    answer = await clients.anonymous.post("/api/v1/auth/logout", headers=headers)
    assert answer.status_code == 204, answer.text
    _is_problem(await _refresh(clients.anonymous, pair["refresh_token"]), 401)
    assert (await _refresh(clients.anonymous, other["refresh_token"])).status_code == 200
    again = await clients.anonymous.post("/api/v1/auth/logout", headers=headers)
    assert again.status_code == 204  # idempotent
    assert (await _actions(runtime, actor="viewer")).count("session.revoke") == 1


async def test_logout_with_an_api_token_is_a_400_that_says_to_revoke_the_token(
    clients: Any,
) -> None:
    body = _is_problem(await clients.api["viewer"].post("/api/v1/auth/logout"), 400)
    assert "/api/v1/tokens" in body["detail"]
    assert (await clients.api["viewer"].get("/api/v1/me")).status_code == 200


async def test_logout_needs_a_token(clients: Any) -> None:
    _is_problem(await clients.anonymous.post("/api/v1/auth/logout"), 401)


# --- me ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        ("viewer", {"username": "viewer", "role": "viewer", "token": "access"}),
        ("admin", {"username": "admin", "role": "admin", "token": "access"}),
        ("api-editor", {"username": "admin", "role": "editor", "token": "api"}),
    ],
)
async def test_me_tells_who_the_caller_is(clients: Any, who: str, expected: dict[str, str]) -> None:
    answer = await clients.as_(who).get("/api/v1/me")
    assert answer.status_code == 200, answer.text
    assert answer.json() == expected


async def test_me_needs_a_token(clients: Any) -> None:
    _is_problem(await clients.anonymous.get("/api/v1/me"), 401)


# --- my password -------------------------------------------------------------------------


async def _change(
    client: httpx.AsyncClient, old: str, new: str, token: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return await client.put(
        "/api/v1/me/password", json={"old_password": old, "new_password": new}, headers=headers
    )


async def test_changing_the_password_needs_the_old_one(
    clients: Any, runtime: Runtime, password: str
) -> None:
    body = _is_problem(await _change(clients.viewer, "not the password", NEW_PASSWORD), 422)
    assert [error["path"] for error in body["errors"]] == ["body.old_password"]
    await _pair(clients.anonymous, "viewer", password)  # unchanged
    _is_problem(await _login(clients.anonymous, "viewer", NEW_PASSWORD), 401)
    assert "user.password" not in await _actions(runtime, actor="viewer")


async def test_guessing_the_old_password_is_rate_limited_like_a_login(
    clients: Any, runtime: Runtime
) -> None:
    for _ in range(runtime.settings.rest_login_attempts):
        _is_problem(await _change(clients.viewer, "a wrong guess", NEW_PASSWORD), 422)
    answer = await _change(clients.viewer, "a wrong guess", NEW_PASSWORD)
    _is_problem(answer, 429)
    assert "Retry-After" in answer.headers


async def test_a_new_password_below_the_policy_is_refused_with_422(
    clients: Any, password: str
) -> None:
    body = _is_problem(await _change(clients.viewer, password, "short"), 422)
    assert [error["path"] for error in body["errors"]] == ["body.new_password"]
    await _pair(clients.anonymous, "viewer", password)  # unchanged


async def test_changing_the_password_ends_the_other_sessions_but_not_the_callers(
    clients: Any, runtime: Runtime, password: str
) -> None:
    mine = await _pair(clients.anonymous, "viewer", password)
    other = await _pair(clients.anonymous, "viewer", password)
    answer = await _change(clients.anonymous, password, NEW_PASSWORD, mine["access_token"])
    assert answer.status_code == 204, answer.text
    _is_problem(await _refresh(clients.anonymous, other["refresh_token"]), 401)
    assert (await _refresh(clients.anonymous, mine["refresh_token"])).status_code == 200
    _is_problem(await _login(clients.anonymous, "viewer", password), 401)
    await _pair(clients.anonymous, "viewer", NEW_PASSWORD)
    actions = await _actions(runtime, actor="viewer")
    assert "user.password" in actions
    assert "session.revoke_all" in actions


async def test_an_api_token_cannot_change_the_password(clients: Any, password: str) -> None:
    _is_problem(await _change(clients.api["admin"], password, NEW_PASSWORD), 403)
    await _pair(clients.anonymous, "admin", password)  # unchanged
