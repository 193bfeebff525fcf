"""The OpenAPI 3.1 document, generated from the route table and the pydantic models the
routes use (`schemas.py`), so it cannot drift from what the API does."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from loom_rest.api import Endpoint
from loom_rest.problems import TITLES
from loom_rest.schemas import Problem

__all__ = ["openapi_document"]

_PATH_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
_REF = "#/components/schemas/{model}"
PROBLEM_JSON = "application/problem+json"


def openapi_document(endpoints: list[Endpoint], version: str) -> dict[str, Any]:
    """The document for `endpoints` (OpenAPI 3.1, JSON Schema 2020-12 components)."""
    models: set[type[BaseModel]] = {Problem}
    for endpoint in endpoints:
        models.update(m for m in (endpoint.body, endpoint.response) if m is not None)
    keyed = sorted(models, key=lambda m: m.__name__)
    modes: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation" if _is_input(m, endpoints) else "serialization") for m in keyed
    ]
    mapping, schemas = models_json_schema(modes, ref_template=_REF)
    # pydantic picks the component names (`Page[GraphOut]` becomes `Page_GraphOut_`): use
    # the references it made rather than the class names.
    refs: dict[Any, dict[str, Any]] = {model: dict(ref) for (model, _), ref in mapping.items()}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        path = _PATH_PARAM.sub(r"{\1}", endpoint.path)
        paths.setdefault(path, {})[endpoint.method.lower()] = _operation(endpoint, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Loom API",
            "version": version,
            "description": "Graphs, executions, logs, secrets, users and tokens (DESIGN §5). "
            "Errors are RFC 9457 problem details.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An access token from POST /api/v1/auth/login (a JWT) or "
                    "an API token (`loom_...`)",
                }
            },
        },
    }


def _is_input(model: type[BaseModel], endpoints: list[Endpoint]) -> bool:
    return any(e.body is model for e in endpoints)


def _problem(status: int) -> dict[str, Any]:
    return {
        "description": TITLES.get(status, "Error"),
        "content": {PROBLEM_JSON: {"schema": {"$ref": _REF.format(model="Problem")}}},
    }


def _operation(endpoint: Endpoint, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    def _ref(model: type[BaseModel]) -> dict[str, Any]:
        return refs[model]

    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id,
        "summary": endpoint.summary,
        "tags": [endpoint.path.removeprefix("/api/v1/").split("/")[0] or "meta"],
    }
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(endpoint.path)
    ]
    if endpoint.query is not None:
        schema = endpoint.query.model_json_schema(ref_template=_REF)
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            parameters.append(
                {"name": name, "in": "query", "required": name in required, "schema": prop}
            )
    if parameters:
        operation["parameters"] = parameters
    if endpoint.request_content is not None:
        operation["requestBody"] = {"required": True, "content": endpoint.request_content}
    elif endpoint.body is not None:
        operation["requestBody"] = {
            "required": endpoint.body_required,
            "content": {"application/json": {"schema": _ref(endpoint.body)}},
        }
    responses: dict[str, Any] = {}
    for status in (endpoint.status, *endpoint.other_statuses):
        description = endpoint.other_statuses.get(status, "Success")
        if status == 204 or endpoint.response is None and not endpoint.response_content:
            responses[str(status)] = {"description": description}
            continue
        content = dict(endpoint.response_content)
        if endpoint.response is not None:
            content = {"application/json": {"schema": _ref(endpoint.response)}, **content}
        responses[str(status)] = {"description": description, "content": content}
    errors = set(endpoint.errors)
    if endpoint.role is not None:
        errors |= {401, 403}
    if endpoint.body is not None or endpoint.query is not None or endpoint.request_content:
        errors |= {422}
    if endpoint.body is not None or endpoint.request_content:
        errors |= {413, 415}
    if "{" in endpoint.path:
        errors.add(404)
    errors.add(503)
    for status in sorted(errors):
        responses[str(status)] = _problem(status)
    responses["default"] = _problem(500)
    operation["responses"] = responses
    if endpoint.role is not None:
        operation["security"] = [{"bearer": []}]
        operation["description"] = f"Needs the {endpoint.role} role or higher."
    return operation
