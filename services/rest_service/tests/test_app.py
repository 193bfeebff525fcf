"""The app around the routes: metrics by route template, CORS as configured, routing
errors as problem details."""

from __future__ import annotations

import dataclasses

import httpx

from loom_rest import Runtime, create_app


async def test_metrics_count_requests_by_route_template_and_status(
    clients: object, anonymous: httpx.AsyncClient
) -> None:
    viewer: httpx.AsyncClient = clients.viewer  # type: ignore[attr-defined]
    for _ in range(3):
        assert (await viewer.get("/api/v1/executions/no-such-id")).status_code == 404
    text = (await anonymous.get("/metrics")).text
    assert (
        'loom_rest_requests_total{method="GET",route="/api/v1/executions/{id}",status="404"} 3.0'
        in text
    )
    assert (
        'loom_rest_request_duration_seconds_count{method="GET",route="/api/v1/executions/{id}"}'
        in text
    )


async def _preflight(runtime: Runtime, origin: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://loom.test") as client:
        return await client.options(
            "/api/v1/graphs",
            headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
        )


async def test_cors_allows_only_the_configured_origins(runtime: Runtime) -> None:
    settings = runtime.settings.model_copy(update={"rest_cors_origins": ["https://ui.example"]})
    configured = dataclasses.replace(runtime, settings=settings)
    allowed = await _preflight(configured, "https://ui.example")
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    refused = await _preflight(configured, "https://evil.example")
    assert "access-control-allow-origin" not in refused.headers
    default = await _preflight(runtime, "https://ui.example")
    assert "access-control-allow-origin" not in default.headers


async def test_unknown_routes_and_methods_are_problem_details(anonymous: httpx.AsyncClient) -> None:
    missing = await anonymous.get("/api/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    wrong = await anonymous.delete("/api/v1/graphs")
    assert wrong.status_code == 405
    assert wrong.headers["content-type"] == "application/problem+json"
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
