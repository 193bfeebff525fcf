"""The backend and the guard on a tiny app, through Starlette's TestClient."""

from __future__ import annotations

import base64
import json

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from loom_auth import (
    BearerAuthBackend,
    InvalidToken,
    Principal,
    Role,
    UnknownRole,
    new_access_token,
    new_api_token,
    requires_role,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_800_000_000.0


class Tokens:
    """The service's database of API tokens, as the injected lookup sees it."""

    def __init__(self) -> None:
        self.by_hash: dict[str, Principal] = {}
        self.lookups: list[str] = []

    def add(self, username: str, role: Role) -> str:
        issued = new_api_token()
        self.by_hash[issued.token_hash] = Principal(username, role, "api", f"tok-{username}")
        return issued.token

    async def lookup(self, token_hash: str) -> Principal | None:
        self.lookups.append(token_hash)
        return self.by_hash.get(token_hash)


def whoami(request: Request) -> dict[str, object]:
    user = request.user
    if isinstance(user, Principal):
        return {
            "username": user.username,
            "role": user.role.value,
            "kind": user.kind,
            "scopes": list(request.auth.scopes),
        }
    return {"username": None, "authenticated": user.is_authenticated}


async def public(request: Request) -> Response:
    return JSONResponse(whoami(request))


@requires_role("viewer")
async def viewer_route(request: Request) -> Response:
    return JSONResponse(whoami(request))


@requires_role(Role.EDITOR)
async def editor_route(request: Request) -> Response:
    return JSONResponse(whoami(request))


@requires_role("admin")
async def admin_route(request: Request) -> Response:
    return JSONResponse(whoami(request))


@requires_role("viewer")
async def live_logs(websocket: WebSocket) -> None:
    await websocket.accept()
    assert isinstance(websocket.user, Principal)
    await websocket.send_json({"username": websocket.user.username})
    await websocket.close()


def make_client(tokens: Tokens, *, allow_query_token: bool = False) -> TestClient:
    backend = BearerAuthBackend(
        KEY, tokens.lookup, allow_query_token=allow_query_token, clock=lambda: NOW
    )
    app = Starlette(
        routes=[
            Route("/public", public),
            Route("/viewer", viewer_route),
            Route("/editor", editor_route, methods=["GET", "POST"]),
            Route("/admin", admin_route),
            WebSocketRoute("/ws", live_logs),
        ],
        middleware=[Middleware(AuthenticationMiddleware, backend=backend)],
    )
    return TestClient(app)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def client(tokens: Tokens) -> TestClient:
    return make_client(tokens)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def jwt_for(role: str, username: str = "alice", key: bytes = KEY, now: float = NOW) -> str:
    return new_access_token(key, username, role, now=now).token


def assert_problem(response: httpx2.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status
    return dict(body)


def test_anonymous_on_a_guarded_route_gets_401_problem_with_a_bearer_challenge(
    client: TestClient,
) -> None:
    response = client.get("/viewer")
    body = assert_problem(response, 401)
    assert body["title"] == "Unauthorized"
    assert "Authorization: Bearer" in str(body["detail"])
    assert response.headers["www-authenticate"] == 'Bearer realm="loom"'


def test_public_routes_stay_public_even_with_a_bad_token(client: TestClient) -> None:
    assert client.get("/public").json() == {"username": None, "authenticated": False}
    response = client.get("/public", headers=bearer("not-a-token"))
    assert response.status_code == 200
    assert response.json()["username"] is None


def none_token() -> str:
    def b64(d: bytes) -> str:
        return base64.urlsafe_b64encode(d).rstrip(b"=").decode()

    payload = {"sub": "eve", "role": "admin", "iat": int(NOW), "exp": int(NOW) + 60}
    payload |= {"jti": "x", "typ": "access"}
    return f"{b64(json.dumps({'alg': 'none'}).encode())}.{b64(json.dumps(payload).encode())}."


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(f"Bearer {jwt_for('admin', key=OTHER_KEY)}", id="other-key"),
        pytest.param(f"Bearer {jwt_for('admin', now=NOW - 3600)}", id="expired"),
        pytest.param(f"Bearer {none_token()}", id="alg-none"),
        pytest.param("Bearer loom_" + "A" * 43, id="unknown-api-token"),
        pytest.param("Bearer loom_tooshort", id="malformed-api-token"),
        pytest.param("Bearer", id="empty"),
        pytest.param("Bearer a b", id="two-tokens"),
        pytest.param("Basic YWxpY2U6c2VjcmV0", id="basic-scheme"),
    ],
)
def test_rejected_credentials_get_one_generic_401(client: TestClient, authorization: str) -> None:
    response = client.get("/admin", headers={"Authorization": authorization})
    body = assert_problem(response, 401)
    assert body["detail"] == InvalidToken.public_detail
    assert response.headers["www-authenticate"] == 'Bearer realm="loom", error="invalid_token"'


def test_viewer_on_an_editor_route_gets_403(client: TestClient) -> None:
    response = client.post("/editor", headers=bearer(jwt_for("viewer")))
    body = assert_problem(response, 403)
    assert body["title"] == "Forbidden"
    assert "editor" in str(body["detail"])
    assert "www-authenticate" not in response.headers


def test_editor_and_admin_reach_the_editor_route(client: TestClient) -> None:
    editor = client.post("/editor", headers=bearer(jwt_for("editor")))
    assert editor.status_code == 200
    assert editor.json() == {
        "username": "alice",
        "role": "editor",
        "kind": "access",
        "scopes": ["authenticated", "viewer", "editor"],
    }
    assert client.get("/editor", headers=bearer(jwt_for("admin"))).status_code == 200
    assert client.get("/admin", headers=bearer(jwt_for("editor"))).status_code == 403


def test_api_token_authenticates_through_the_injected_lookup(
    client: TestClient, tokens: Tokens
) -> None:
    token = tokens.add("ci-bot", Role.EDITOR)
    response = client.post("/editor", headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["kind"] == "api"
    assert response.json()["username"] == "ci-bot"
    assert token not in tokens.lookups  # only the hash reaches the database
    assert client.get("/admin", headers=bearer(token)).status_code == 403


def test_a_malformed_api_token_is_refused_without_a_lookup(
    client: TestClient, tokens: Tokens
) -> None:
    client.get("/viewer", headers=bearer("loom_not-the-right-length"))
    assert tokens.lookups == []


def test_a_failing_lookup_is_not_reported_as_an_invalid_token(tokens: Tokens) -> None:
    """A database outage must surface (the service answers 503), not look like a bad token."""

    async def database_down(token_hash: str) -> Principal | None:
        raise ConnectionError("database unreachable")

    backend = BearerAuthBackend(KEY, database_down)
    app = Starlette(
        routes=[Route("/viewer", viewer_route)],
        middleware=[Middleware(AuthenticationMiddleware, backend=backend)],
    )
    with pytest.raises(ConnectionError):
        TestClient(app).get("/viewer", headers=bearer(tokens.add("x", Role.VIEWER)))


def test_websocket_accepts_the_header(client: TestClient) -> None:
    with client.websocket_connect("/ws", headers=bearer(jwt_for("viewer"))) as ws:
        assert ws.receive_json() == {"username": "alice"}


def test_websocket_query_token_only_when_enabled(tokens: Tokens) -> None:
    token = jwt_for("viewer", username="bob")
    with make_client(tokens, allow_query_token=True).websocket_connect(f"/ws?token={token}") as ws:
        assert ws.receive_json() == {"username": "bob"}

    disabled = make_client(tokens, allow_query_token=False)
    with pytest.raises(WebSocketDisconnect) as closed:
        with disabled.websocket_connect(f"/ws?token={token}"):
            pass
    assert closed.value.code == 1008


def test_query_token_is_ignored_on_http_routes(tokens: Tokens) -> None:
    client = make_client(tokens, allow_query_token=True)
    assert client.get(f"/viewer?token={jwt_for('viewer')}").status_code == 401


def test_guard_with_an_unknown_role_fails_at_import_time() -> None:
    with pytest.raises(UnknownRole):
        requires_role("superuser")


def test_weak_signing_key_is_refused_at_construction(tokens: Tokens) -> None:
    with pytest.raises(ValueError, match="at least 32"):
        BearerAuthBackend(b"too short", tokens.lookup)
