"""RBAC over every route, generated from the route table: each route has the role DESIGN
§5 gives it, and each kind of caller gets 401 / 403 or passes accordingly."""

from __future__ import annotations

import re

import httpx
import pytest

from loom_rest.routes import ENDPOINTS

# DESIGN §5's table. A route added to the API without a line here fails the first test.
EXPECTED: dict[tuple[str, str], str | None] = {
    ("POST", "/api/v1/auth/login"): None,
    ("POST", "/api/v1/auth/refresh"): None,
    ("POST", "/api/v1/auth/logout"): "viewer",
    ("GET", "/api/v1/"): None,
    ("GET", "/api/v1/openapi.json"): None,
    ("GET", "/api/v1/me"): "viewer",
    ("PUT", "/api/v1/me/password"): "viewer",
    ("GET", "/api/v1/users"): "admin",
    ("POST", "/api/v1/users"): "admin",
    ("PATCH", "/api/v1/users/{username}"): "admin",
    ("DELETE", "/api/v1/users/{username}"): "admin",
    ("GET", "/api/v1/tokens"): "viewer",
    ("POST", "/api/v1/tokens"): "viewer",
    ("DELETE", "/api/v1/tokens/{id}"): "viewer",
    ("GET", "/api/v1/graphs"): "viewer",
    ("POST", "/api/v1/graphs"): "editor",
    ("POST", "/api/v1/graphs/validate"): "viewer",
    ("PUT", "/api/v1/graphs/{name}"): "editor",
    ("GET", "/api/v1/graphs/{name}"): "viewer",
    ("GET", "/api/v1/graphs/{name}/versions"): "viewer",
    ("PATCH", "/api/v1/graphs/{name}"): "editor",
    ("DELETE", "/api/v1/graphs/{name}"): "editor",
    ("GET", "/api/v1/graphs/{name}/deliveries"): "viewer",
    ("POST", "/api/v1/graphs/{name}/executions"): "editor",
    ("GET", "/api/v1/executions"): "viewer",
    ("GET", "/api/v1/executions/{id}"): "viewer",
    ("GET", "/api/v1/executions/{id}/logs"): "viewer",
    ("POST", "/api/v1/executions/{id}/cancel"): "editor",
    ("POST", "/api/v1/executions/{id}/retry"): "editor",
    ("GET", "/api/v1/secrets"): "editor",
    ("PUT", "/api/v1/secrets/{name}"): "editor",
    ("DELETE", "/api/v1/secrets/{name}"): "editor",
    ("GET", "/api/v1/audit"): "admin",
    ("GET", "/api/v1/dlq"): "admin",
    ("POST", "/api/v1/dlq/{id}/replay"): "admin",
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
}

RANK = {"viewer": 0, "editor": 1, "admin": 2}
CALLERS = ("anonymous", "viewer", "editor", "admin", "api-viewer", "api-editor", "api-admin")

# Refusals that are about the kind of credential, not the role: an API token has no
# password to change (documented in routes/auth.py).
NOT_ROLE_RULES = {("PUT", "/api/v1/me/password", "api-viewer"),
                  ("PUT", "/api/v1/me/password", "api-editor"),
                  ("PUT", "/api/v1/me/password", "api-admin")}  # fmt: skip


def _table() -> dict[tuple[str, str], str | None]:
    return {(e.method, e.path): (str(e.role) if e.role else None) for e in ENDPOINTS}


def test_every_route_has_the_role_of_the_design() -> None:
    table = _table()
    assert len(table) == len(ENDPOINTS), "two endpoints share a method and path"
    unexpected = sorted(set(table) - set(EXPECTED))
    missing = sorted(set(EXPECTED) - set(table))
    assert not unexpected, f"routes without an RBAC rule in this test: {unexpected}"
    assert not missing, f"routes of DESIGN §5 not served: {missing}"
    wrong = {route: role for route, role in table.items() if EXPECTED[route] != role}
    assert not wrong, f"routes whose role differs from DESIGN §5: {wrong}"


def _concrete(path: str) -> str:
    return re.sub(r"{\w+}", "no-such-thing", path)


@pytest.mark.parametrize("caller", CALLERS)
async def test_each_caller_is_let_in_exactly_where_its_role_allows(
    clients: object, caller: str
) -> None:
    client: httpx.AsyncClient = clients.as_(caller)  # type: ignore[attr-defined]
    mismatches = []
    for endpoint in ENDPOINTS:
        if endpoint.path == "/api/v1/auth/logout" and caller != "anonymous":
            continue  # would end this client's session for the routes after it
        need = str(endpoint.role) if endpoint.role else None
        answer = await client.request(
            endpoint.method, _concrete(endpoint.path), json={} if endpoint.method != "GET" else None
        )
        have = None if caller == "anonymous" else caller.removeprefix("api-")
        if need is None:
            expected = "allowed"
        elif have is None:
            expected = 401
        elif RANK[have] >= RANK[need]:
            expected = "allowed"
        else:
            expected = 403
        got: object = answer.status_code if answer.status_code in (401, 403) else "allowed"
        if (endpoint.method, endpoint.path, caller) in NOT_ROLE_RULES:
            continue
        if got != expected:
            mismatches.append(f"{endpoint.method} {endpoint.path}: {got} (expected {expected})")
        if answer.status_code in (401, 403):
            assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.status_code < 500, f"{endpoint.method} {endpoint.path}: {answer.text}"
    assert not mismatches, "\n".join(mismatches)
