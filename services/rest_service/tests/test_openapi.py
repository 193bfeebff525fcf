"""The OpenAPI document: served, valid OpenAPI 3.1, and complete for every route."""

from __future__ import annotations

import httpx
from openapi_spec_validator import validate

from loom_rest.openapi import openapi_document
from loom_rest.routes import ENDPOINTS
from loom_rest.routes.meta import VERSION


async def test_the_served_document_is_valid_openapi_3_1_and_covers_every_route(
    anonymous: httpx.AsyncClient,
) -> None:
    answer = await anonymous.get("/api/v1/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    assert document == openapi_document(ENDPOINTS, VERSION)
    validate(document)
    assert document["openapi"].startswith("3.1")
    operations = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert operations == {(e.method, e.path) for e in ENDPOINTS}


def test_guarded_operations_declare_bearer_security_and_problem_answers() -> None:
    document = openapi_document(ENDPOINTS, VERSION)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            endpoint = next(e for e in ENDPOINTS if (e.method, e.path) == (method.upper(), path))
            responses = operation["responses"]
            assert "default" in responses
            problem = responses["default"]["content"]["application/problem+json"]["schema"]
            assert problem == {"$ref": "#/components/schemas/Problem"}
            if endpoint.role is None:
                assert "security" not in operation, path
            else:
                assert operation["security"] == [{"bearer": []}], path
                assert {"401", "403"} <= set(responses), path


def test_operation_ids_are_unique() -> None:
    ids = [e.operation_id for e in ENDPOINTS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
