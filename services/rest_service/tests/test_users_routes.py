"""Users (admin) and API tokens (each caller's own), on both databases: what a client
sees, which credentials work afterwards, and the audit rows each change leaves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from loom_db import audit
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


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _is_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = answer.json()
    assert body["status"] == status
    return body


async def _audit(runtime: Runtime, object_type: str) -> list[tuple[str, str, str]]:
    async with runtime.database.read() as conn:
        entries, _ = await audit.list_audit(conn, object_type=object_type, limit=200)
    return [(entry.actor or "", entry.action, entry.object_id) for entry in entries]


async def _usernames(admin: httpx.AsyncClient) -> list[str]:
    answer = await admin.get("/api/v1/users", params={"limit": 500})
    assert answer.status_code == 200, answer.text
    return [user["username"] for user in answer.json()["items"]]


# --- users -------------------------------------------------------------------------------


async def test_users_are_listed_a_page_at_a_time(clients: Any) -> None:
    first = await clients.admin.get("/api/v1/users", params={"limit": 2})
    assert first.status_code == 200, first.text
    page = first.json()
    assert [user["username"] for user in page["items"]] == ["admin", "editor"]
    assert set(page["items"][0]) == {"username", "role", "disabled", "created_at", "updated_at"}
    assert page["items"][0]["created_at"].endswith("Z")
    rest = await clients.admin.get(
        "/api/v1/users", params={"limit": 2, "cursor": page["next_cursor"]}
    )
    assert rest.json() == {
        "items": [{**rest.json()["items"][0], "username": "viewer", "role": "viewer"}],
        "next_cursor": None,
    }


async def test_a_cursor_the_api_did_not_make_is_422(clients: Any) -> None:
    body = _is_problem(await clients.admin.get("/api/v1/users", params={"cursor": "bogus"}), 422)
    assert [error["path"] for error in body["errors"]] == ["query.cursor"]


@pytest.mark.parametrize("who", ["viewer", "editor", "api-admin"])
async def test_only_admins_manage_users_and_an_admin_token_does_too(clients: Any, who: str) -> None:
    answer = await clients.as_(who).get("/api/v1/users")
    if who == "api-admin":
        assert answer.status_code == 200
    else:
        _is_problem(answer, 403)
        created = await clients.as_(who).post(
            "/api/v1/users", json={"username": "mallory", "password": NEW_PASSWORD}
        )
        _is_problem(created, 403)


async def test_an_admin_creates_a_user_who_can_then_log_in(clients: Any, runtime: Runtime) -> None:
    answer = await clients.admin.post(
        "/api/v1/users", json={"username": "carol", "password": NEW_PASSWORD, "role": "editor"}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["username"] == "carol"
    assert (answer.json()["role"], answer.json()["disabled"]) == ("editor", False)
    assert "password" not in answer.text
    assert "carol" in await _usernames(clients.admin)
    login = await _login(clients.anonymous, "carol", NEW_PASSWORD)
    assert login.status_code == 200, login.text
    assert ("admin", "user.create", "carol") in await _audit(runtime, "user")


async def test_a_new_user_is_a_viewer_unless_told_otherwise(clients: Any) -> None:
    answer = await clients.admin.post(
        "/api/v1/users", json={"username": "dave", "password": NEW_PASSWORD}
    )
    assert answer.json()["role"] == "viewer"


async def test_creating_an_existing_user_is_409_and_changes_nothing(
    clients: Any, password: str
) -> None:
    answer = await clients.admin.post(
        "/api/v1/users", json={"username": "viewer", "password": NEW_PASSWORD, "role": "admin"}
    )
    _is_problem(answer, 409)
    assert (await _login(clients.anonymous, "viewer", password)).status_code == 200
    me = await clients.viewer.get("/api/v1/users")
    _is_problem(me, 403)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"username": "Bad Name", "password": NEW_PASSWORD}, "body.username"),
        ({"username": "-dash", "password": NEW_PASSWORD}, "body.username"),
        ({"username": "erin", "password": "short"}, "body.password"),
        ({"username": "erin", "password": NEW_PASSWORD, "role": "root"}, "body.role"),
        ({"username": "erin", "password": NEW_PASSWORD, "extra": 1}, "body.extra"),
    ],
)
async def test_a_bad_username_password_or_role_is_422_naming_the_field(
    clients: Any, body: dict[str, Any], path: str
) -> None:
    problem = _is_problem(await clients.admin.post("/api/v1/users", json=body), 422)
    assert path in [error["path"] for error in problem["errors"]]
    assert "erin" not in await _usernames(clients.admin)


async def test_changing_a_users_role_shows_in_the_user_and_in_their_next_token(
    clients: Any, runtime: Runtime, password: str
) -> None:
    answer = await clients.admin.patch("/api/v1/users/viewer", json={"role": "editor"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["role"] == "editor"
    token = (await _login(clients.anonymous, "viewer", password)).json()["access_token"]
    me = await clients.anonymous.get("/api/v1/me", headers=_bearer(token))
    assert me.json()["role"] == "editor"
    assert ("admin", "user.update", "viewer") in await _audit(runtime, "user")


async def test_disabling_a_user_stops_their_login_and_their_api_tokens(
    clients: Any, password: str
) -> None:
    made = await clients.editor.post("/api/v1/tokens", json={"name": "ci"})
    token = made.json()["token"]
    answer = await clients.admin.patch("/api/v1/users/editor", json={"disabled": True})
    assert answer.json()["disabled"] is True
    _is_problem(await _login(clients.anonymous, "editor", password), 401)
    _is_problem(await clients.anonymous.get("/api/v1/me", headers=_bearer(token)), 401)
    await clients.admin.patch("/api/v1/users/editor", json={"disabled": False})
    assert (await _login(clients.anonymous, "editor", password)).status_code == 200


async def test_an_admin_resetting_a_password_ends_that_users_sessions(
    clients: Any, runtime: Runtime, password: str
) -> None:
    pair = (await _login(clients.anonymous, "viewer", password)).json()
    answer = await clients.admin.patch("/api/v1/users/viewer", json={"password": NEW_PASSWORD})
    assert answer.status_code == 200, answer.text
    _is_problem(await _login(clients.anonymous, "viewer", password), 401)
    assert (await _login(clients.anonymous, "viewer", NEW_PASSWORD)).status_code == 200
    refreshed = await clients.anonymous.post(
        "/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
    )
    _is_problem(refreshed, 401)
    assert ("admin", "user.password", "viewer") in await _audit(runtime, "user")


async def test_a_reset_password_below_the_policy_is_422_and_changes_nothing(
    clients: Any, password: str
) -> None:
    answer = await clients.admin.patch(
        "/api/v1/users/viewer", json={"password": "short", "role": "admin"}
    )
    problem = _is_problem(answer, 422)
    assert [error["path"] for error in problem["errors"]] == ["body.password"]
    assert (await _login(clients.anonymous, "viewer", password)).status_code == 200
    _is_problem(await clients.viewer.get("/api/v1/users"), 403)


async def test_changing_or_deleting_an_unknown_user_is_404(clients: Any) -> None:
    _is_problem(await clients.admin.patch("/api/v1/users/nobody", json={"role": "admin"}), 404)
    _is_problem(await clients.admin.patch("/api/v1/users/nobody", json={}), 404)
    _is_problem(await clients.admin.delete("/api/v1/users/nobody"), 404)


async def test_deleting_a_user_removes_them_and_their_tokens(
    clients: Any, runtime: Runtime, password: str
) -> None:
    token = (await clients.viewer.post("/api/v1/tokens", json={"name": "ci"})).json()["token"]
    answer = await clients.admin.delete("/api/v1/users/viewer")
    assert answer.status_code == 204, answer.text
    assert "viewer" not in await _usernames(clients.admin)
    _is_problem(await _login(clients.anonymous, "viewer", password), 401)
    _is_problem(await clients.anonymous.get("/api/v1/me", headers=_bearer(token)), 401)
    _is_problem(await clients.admin.delete("/api/v1/users/viewer"), 404)
    assert ("admin", "user.delete", "viewer") in await _audit(runtime, "user")


@pytest.mark.parametrize(
    "change",
    [
        ("DELETE", None),
        ("PATCH", {"role": "editor"}),
        ("PATCH", {"disabled": True}),
    ],
)
async def test_the_last_enabled_admin_cannot_be_removed_demoted_or_disabled(
    clients: Any, password: str, change: tuple[str, dict[str, Any] | None]
) -> None:
    method, body = change
    answer = await clients.admin.request(method, "/api/v1/users/admin", json=body)
    _is_problem(answer, 409)
    assert (await clients.admin.get("/api/v1/users")).status_code == 200
    assert (await _login(clients.anonymous, "admin", password)).status_code == 200
    # With a second admin the same change goes through.
    await clients.admin.patch("/api/v1/users/editor", json={"role": "admin"})
    again = await clients.admin.request(method, "/api/v1/users/admin", json=body)
    assert again.status_code in (200, 204), again.text


# --- API tokens --------------------------------------------------------------------------


async def test_a_created_api_token_is_shown_once_and_works_with_its_role(
    clients: Any, runtime: Runtime
) -> None:
    answer = await clients.admin.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"})
    assert answer.status_code == 201, answer.text
    created = answer.json()
    token = created["token"]
    assert token.startswith("loom_")
    assert token.startswith(created["prefix"])
    assert created["role"] == "viewer"
    me = await clients.anonymous.get("/api/v1/me", headers=_bearer(token))
    assert me.json() == {"username": "admin", "role": "viewer", "token": "api"}
    _is_problem(await clients.anonymous.get("/api/v1/users", headers=_bearer(token)), 403)
    listed = await clients.admin.get("/api/v1/tokens")
    assert listed.status_code == 200, listed.text
    mine = [item for item in listed.json()["items"] if item["id"] == created["id"]]
    shown = {key: value for key, value in created.items() if key not in ("token", "last_used_at")}
    assert [{**item, "last_used_at": None} for item in mine] == [{**shown, "last_used_at": None}]
    assert mine[0]["last_used_at"] is not None  # it was used above
    assert token not in listed.text
    entries = await _audit(runtime, "api_token")
    assert ("admin", "api_token.create", created["id"]) in entries
    async with runtime.database.read() as conn:
        log, _ = await audit.list_audit(conn, limit=500)
    assert all(token not in str(entry) for entry in log)


async def test_a_token_role_defaults_to_the_callers_own(clients: Any) -> None:
    answer = await clients.editor.post("/api/v1/tokens", json={"name": "ci"})
    assert answer.json()["role"] == "editor"
    token = answer.json()["token"]
    me = await clients.anonymous.get("/api/v1/me", headers=_bearer(token))
    assert me.json()["role"] == "editor"


@pytest.mark.parametrize(
    ("who", "role"), [("viewer", "editor"), ("editor", "admin"), ("api-viewer", "editor")]
)
async def test_a_token_role_above_the_callers_is_refused(clients: Any, who: str, role: str) -> None:
    answer = await clients.as_(who).post("/api/v1/tokens", json={"name": "up", "role": role})
    _is_problem(answer, 403)
    listed = await clients.as_(who).get("/api/v1/tokens")
    assert "up" not in [item["name"] for item in listed.json()["items"]]


async def test_an_api_token_cannot_make_tokens(clients: Any) -> None:
    """A leaked token must not mint others that outlive its revocation."""
    answer = await clients.api["editor"].post("/api/v1/tokens", json={"name": "child"})
    _is_problem(answer, 403)


async def test_a_token_that_expires_in_the_past_is_422(clients: Any) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    answer = await clients.viewer.post("/api/v1/tokens", json={"name": "old", "expires_at": past})
    problem = _is_problem(answer, 422)
    assert [error["path"] for error in problem["errors"]] == ["body.expires_at"]


async def test_a_token_with_an_expiry_lists_it(clients: Any) -> None:
    later = datetime.now(UTC) + timedelta(days=1)
    answer = await clients.viewer.post(
        "/api/v1/tokens", json={"name": "soon", "expires_at": later.isoformat()}
    )
    assert answer.status_code == 201, answer.text
    listed = (await clients.viewer.get("/api/v1/tokens")).json()["items"]
    expires = datetime.fromisoformat(listed[0]["expires_at"].replace("Z", "+00:00"))
    assert abs(expires - later) < timedelta(seconds=1)


async def test_deleting_a_token_makes_it_stop_working_at_once(
    clients: Any, runtime: Runtime
) -> None:
    created = (await clients.viewer.post("/api/v1/tokens", json={"name": "ci"})).json()
    headers = _bearer(created["token"])
    assert (await clients.anonymous.get("/api/v1/me", headers=headers)).status_code == 200
    answer = await clients.viewer.delete(f"/api/v1/tokens/{created['id']}")
    assert answer.status_code == 204, answer.text
    _is_problem(await clients.anonymous.get("/api/v1/me", headers=headers), 401)
    assert (await clients.viewer.get("/api/v1/tokens")).json()["items"] == []
    assert ("viewer", "api_token.revoke", created["id"]) in await _audit(runtime, "api_token")


async def test_another_users_token_cannot_be_seen_or_deleted(clients: Any) -> None:
    created = (await clients.editor.post("/api/v1/tokens", json={"name": "mine"})).json()
    answer = await clients.viewer.delete(f"/api/v1/tokens/{created['id']}")
    unknown = await clients.viewer.delete("/api/v1/tokens/no-such-token")
    assert _is_problem(answer, 404)["title"] == _is_problem(unknown, 404)["title"]
    assert created["id"] not in (await clients.viewer.get("/api/v1/tokens")).text
    # Not even an admin deletes another user's token through this route.
    _is_problem(await clients.admin.delete(f"/api/v1/tokens/{created['id']}"), 404)
    me = await clients.anonymous.get("/api/v1/me", headers=_bearer(created["token"]))
    assert me.status_code == 200


async def test_tokens_need_a_caller(clients: Any) -> None:
    _is_problem(await clients.anonymous.get("/api/v1/tokens"), 401)
    _is_problem(await clients.anonymous.post("/api/v1/tokens", json={"name": "x"}), 401)
