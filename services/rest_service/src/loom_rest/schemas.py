"""The shapes of DESIGN §5 as pydantic models: the routes validate requests and serialize
answers with them, and the OpenAPI document is generated from them (never written by
hand). Times are ISO 8601 UTC with `Z`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ApiTokenCreated",
    "ApiTokenIn",
    "ApiTokenOut",
    "AuditOut",
    "DeadLetterOut",
    "DeliveryOut",
    "EnabledIn",
    "ExecutionOut",
    "GraphOut",
    "Index",
    "LogLine",
    "LogPage",
    "LoginIn",
    "MeOut",
    "NodeRunOut",
    "Page",
    "PasswordIn",
    "Problem",
    "Query",
    "ProblemError",
    "RefreshIn",
    "SecretIn",
    "SecretOut",
    "TokenPair",
    "TriggerIn",
    "TriggerOut",
    "TriggerRef",
    "UserIn",
    "UserOut",
    "UserPatch",
    "Valid",
    "VersionOut",
]

T = TypeVar("T")

Role = Literal["viewer", "editor", "admin"]


class _In(BaseModel):
    """Request bodies: unknown fields are errors (a typo must not be ignored), and JSON
    types are strict (`0` is not `false`, `"5"` is not `5`)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Query(BaseModel):
    """Query strings: unknown parameters are errors; values are text, converted."""

    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    """Answers. `from_attributes`: built straight from loom_db's records
    (`AuditOut.model_validate(record)`), whose fields they share by name."""

    model_config = ConfigDict(frozen=True, from_attributes=True)


class ProblemError(_Out):
    path: str
    message: str
    line: int | None = None


class Problem(_Out):
    """RFC 9457 problem details; `errors` for validation problems."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[ProblemError] | None = None


class Page(_Out, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last"
    )


class PageQuery(Query):
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = Field(default=None, max_length=1000)


# --- meta and auth ----------------------------------------------------------------------


class Index(_Out):
    version: str
    ws_url: str


class LoginIn(_In):
    username: str = Field(min_length=1, max_length=200)
    password: str = Field(min_length=1, max_length=1000)


class RefreshIn(_In):
    refresh_token: str = Field(min_length=1, max_length=1000)


class TokenPair(_Out):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds the access token is valid for")


class MeOut(_Out):
    username: str
    role: Role
    token: Literal["access", "api"]


class PasswordIn(_In):
    old_password: str = Field(min_length=1, max_length=1000)
    new_password: str = Field(min_length=1, max_length=1000)


class UserOut(_Out):
    username: str
    role: Role
    disabled: bool
    created_at: datetime
    updated_at: datetime


class UserIn(_In):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1000)
    role: Role = "viewer"


class UserPatch(_In):
    role: Role | None = None
    disabled: bool | None = None
    password: str | None = Field(default=None, min_length=1, max_length=1000)


class ApiTokenIn(_In):
    name: str = Field(min_length=1, max_length=100)
    role: Role | None = Field(default=None, description="Up to the caller's own; default: it")
    expires_at: AwareDatetime | None = Field(
        default=None, description="Before the year 9000 (UTC); default: never"
    )

    @field_validator("expires_at")
    @classmethod
    def _storable(cls, value: datetime | None) -> datetime | None:
        if value is not None and not value.year < 9000:
            raise ValueError("must be before the year 9000")
        return value


class ApiTokenOut(_Out):
    id: str
    name: str
    prefix: str
    role: Role
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None


class ApiTokenCreated(ApiTokenOut):
    token: str = Field(description="The token itself: shown this once, stored only hashed")


# --- graphs -----------------------------------------------------------------------------


class TriggerRef(_Out):
    id: str
    kind: str
    next_fire_time: datetime | None = None


class GraphOut(_Out):
    name: str
    version: int
    latest_version: int
    description: str
    enabled: bool
    spec: dict[str, Any]
    source: str
    created_at: datetime
    updated_at: datetime
    triggers: list[TriggerRef]


class VersionOut(_Out):
    version: int
    description: str
    spec_hash: str
    created_at: datetime
    created_by: str | None


class EnabledIn(_In):
    enabled: bool


class Valid(_Out):
    valid: Literal[True] = True
    name: str


class DeliveryOut(_Out):
    id: int
    hook: str
    delivery_id: str | None
    received_at: datetime
    status_code: int
    outcome: str
    detail: str | None
    execution_id: str | None


# --- executions -------------------------------------------------------------------------


class TriggerIn(_In):
    params: dict[str, Any] = Field(default_factory=dict)


class TriggerOut(_Out):
    type: Literal["manual", "webhook", "timer", "retry", "graph"]
    fire_time: str | None = None
    delivery_id: str | None = None
    user: str | None = None
    origin_id: str | None = None


class NodeRunOut(_Out):
    id: str = Field(description="The node instance: `build`, or `build[0]` in a fan-out")
    node: str
    index: int | None
    status: str
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    outputs: Any
    error: str | None
    child_execution_id: str | None = None


class ExecutionOut(_Out):
    id: str
    graph: str
    graph_version: int
    status: str
    trigger: TriggerOut
    params: dict[str, Any]
    error: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    nodes: list[NodeRunOut] | None = Field(
        default=None, description="Every node instance's latest attempt (not in lists)"
    )


class LogLine(_Out):
    seq: int
    node: str
    stream: str
    ts: datetime
    text: str


class LogPage(_Out):
    items: list[LogLine]
    next_after: int = Field(description="Pass as `after` to read on")


# --- secrets, audit, dead letters -------------------------------------------------------


class SecretIn(_In):
    value: str = Field(max_length=65536)


class SecretOut(_Out):
    name: str


class AuditOut(_Out):
    id: int
    ts: datetime
    actor: str
    action: str
    object_type: str
    object_id: str
    detail: dict[str, Any]


class DeadLetterOut(_Out):
    id: str = Field(description="What `POST /api/v1/dlq/{id}/replay` takes")
    key: str = Field(description="The message key (for executions: the execution id)")
    reason: str = Field(description="Why it was dead-lettered")
    at: datetime = Field(description="When it was dead-lettered")
    type: str | None = Field(
        description="The envelope's type (even one Loom does not know); null when the "
        "body is not an envelope"
    )
    data: Any = Field(
        default=None, description="The envelope's data; null when the body is not an envelope"
    )
    size: int = Field(description="The body's size in bytes")
    preview: str | None = Field(
        default=None,
        description="When the body is not an envelope: its first 1,024 bytes, as text or "
        "base64 (`preview_encoding`)",
    )
    preview_encoding: Literal["text", "base64"] | None = None
