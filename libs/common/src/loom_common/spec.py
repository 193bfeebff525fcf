"""The graph spec (v1) as typed models: every field of DESIGN §3 and nothing else.

These models check each field on its own (types, names, durations, one node kind per
node). Checks that need the whole graph (needs, cycles, template references, cron
expressions) live in `graph.py`, which is what callers use: `load_graph(text)`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from loom_common.durations import format_duration, parse_duration

__all__ = [
    "GRAPH_NAME_PATTERN",
    "NODE_ID_PATTERN",
    "AtTrigger",
    "CronTrigger",
    "DelayTrigger",
    "Duration",
    "EveryTrigger",
    "GraphSpec",
    "HttpSpec",
    "NodeDefaults",
    "NodeSpec",
    "ParamSpec",
    "SqlSpec",
    "Trigger",
    "WebhookSpec",
    "WebhookTrigger",
]

GRAPH_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
NODE_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$"
PYTHON_TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
PARAM_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
NODE_KINDS = ("run", "http", "python", "sql", "graph")


def _duration(value: object) -> timedelta:
    return parse_duration(value)


Duration = Annotated[
    timedelta,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h|d|w))+$|^\d+(\.\d+)?$"},
                {"type": "number", "minimum": 0},
            ],
            "description": "a duration: 90s, 10m, 1h30m, 2d, 500ms, or seconds",
        }
    ),
]


def _scalar_to_text(value: object) -> object:
    """Environment values are text; YAML's `PORT: 8080` is accepted as "8080"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
EnvValue = Annotated[str, BeforeValidator(_scalar_to_text)]
Env = dict[Annotated[str, Field(pattern=ENV_NAME_PATTERN)], EnvValue]


def _condition_text(value: object) -> object:
    """`if: false` switches a node off; booleans are accepted as expressions."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


Condition = Annotated[str, BeforeValidator(_condition_text)]


def _positive(value: timedelta) -> timedelta:
    if value.total_seconds() <= 0:
        raise ValueError("a timeout must be longer than 0s")
    return value


Timeout = Annotated[Duration, AfterValidator(_positive)]


def _to_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class _Model(BaseModel):
    # strict: `retries: "3"` or `continue_on_failure: "yes"` are errors, not guesses.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, strict=True)


ParamType = Literal["string", "integer", "number", "boolean", "array", "object"]


class ParamSpec(_Model):
    type: ParamType = "string"
    description: str = ""
    default: Any = None
    required: bool | None = Field(
        default=None, description="default: true when the param has no default"
    )
    enum: list[Any] | None = Field(default=None, min_length=1)

    @property
    def is_required(self) -> bool:
        return self.required if self.required is not None else self.default is None


class NodeDefaults(_Model):
    timeout: Timeout | None = None
    retries: int | None = Field(default=None, ge=0, le=100)
    retry_delay: Duration | None = None
    retry_max_delay: Duration | None = None


CatchUp = Literal["none", "latest", "all"]


class _TimerTrigger(_Model):
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    params: dict[str, Any] = Field(default_factory=dict)
    catch_up: CatchUp = "latest"
    misfire_grace: Duration = timedelta(seconds=60)


class CronTrigger(_TimerTrigger):
    cron: str = Field(min_length=1)
    timezone: str = "UTC"


class EveryTrigger(_TimerTrigger):
    every: Duration
    start: str | None = Field(default=None, description="ISO 8601 instant with Z or offset")


class DelayTrigger(_TimerTrigger):
    delay: Duration


class AtTrigger(_TimerTrigger):
    at: str = Field(description="ISO 8601 instant with Z or offset")


class WebhookSpec(_Model):
    name: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    auth: Literal["github", "gitlab", "standard", "token", "none"]
    secret: str | None = Field(default=None, description="the name of a stored secret")
    events: list[str] | None = None
    if_: Condition | None = Field(default=None, alias="if")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _secret_matches_auth(self) -> WebhookSpec:
        if self.auth == "none" and self.secret is not None:
            raise ValueError("auth 'none' takes no secret")
        if self.auth != "none" and not self.secret:
            raise ValueError(f"auth '{self.auth}' needs `secret`: the name of a stored secret")
        return self


class WebhookTrigger(_Model):
    id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    webhook: WebhookSpec


def _trigger_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in ("cron", "every", "delay", "at", "webhook") if k in value]
        return kinds[0] if len(kinds) == 1 else None
    if isinstance(value, BaseModel):
        for kind in ("cron", "every", "delay", "at", "webhook"):
            if kind in type(value).model_fields:
                return kind
    return None


Trigger = Annotated[
    Annotated[CronTrigger, Tag("cron")]
    | Annotated[EveryTrigger, Tag("every")]
    | Annotated[DelayTrigger, Tag("delay")]
    | Annotated[AtTrigger, Tag("at")]
    | Annotated[WebhookTrigger, Tag("webhook")],
    Discriminator(
        _trigger_kind,
        custom_error_type="trigger_kind",
        custom_error_message="a trigger needs exactly one of cron, every, delay, at, webhook",
    ),
]


class HttpSpec(_Model):
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    url: str = Field(min_length=1)
    headers: dict[str, EnvValue] = Field(default_factory=dict)
    json_: Any = Field(default=None, alias="json")
    body: str | None = None
    expect: Annotated[list[int], BeforeValidator(lambda v: [v] if isinstance(v, int) else v)] = (
        Field(default_factory=list, description="accepted status codes; default: any 2xx")
    )
    timeout: Timeout | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_body(self) -> HttpSpec:
        if self.json_ is not None and self.body is not None:
            raise ValueError("give either `json` or `body`, not both")
        return self


class SqlSpec(_Model):
    connection: str = Field(min_length=1, description="the name of a stored secret")
    query: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class NodeSpec(_Model):
    run: str | None = None
    http: HttpSpec | None = None
    python: str | None = Field(default=None, pattern=PYTHON_TARGET_PATTERN)
    sql: SqlSpec | None = None
    graph: str | None = Field(default=None, pattern=GRAPH_NAME_PATTERN)
    needs: Annotated[list[str], BeforeValidator(_to_list)] = Field(default_factory=list)
    if_: Condition | None = Field(default=None, alias="if")
    env: Env = Field(default_factory=dict)
    shell: Literal["bash", "sh"] | None = None
    timeout: Timeout | None = None
    retries: int | None = Field(default=None, ge=0, le=100)
    retry_delay: Duration | None = None
    retry_max_delay: Duration | None = None
    for_each: str | list[Any] | None = None
    max_parallel: int | None = Field(default=None, ge=1)
    continue_on_failure: bool = False
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")

    @property
    def kind(self) -> str:
        for kind in NODE_KINDS:
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("validated nodes have a kind")

    @model_validator(mode="after")
    def _one_kind(self) -> NodeSpec:
        kinds = [k for k in NODE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            found = f"found {', '.join(kinds)}" if kinds else "found none"
            raise ValueError(f"a node needs exactly one of run, http, python, sql, graph ({found})")
        if self.with_ and kinds[0] not in ("python", "graph"):
            raise ValueError("`with` is for python and graph nodes")
        if self.shell is not None and kinds[0] != "run":
            raise ValueError("`shell` is for run nodes")
        if self.max_parallel is not None and self.for_each is None:
            raise ValueError("`max_parallel` needs `for_each`")
        return self


class GraphSpec(_Model):
    """A graph: its name, params, triggers and nodes."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        strict=True,
        title="Loom graph",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    name: str = Field(pattern=GRAPH_NAME_PATTERN)
    description: str = ""
    params: dict[Annotated[str, Field(pattern=PARAM_NAME_PATTERN)], ParamSpec] = Field(
        default_factory=dict
    )
    env: Env = Field(default_factory=dict)
    defaults: NodeDefaults = Field(default_factory=NodeDefaults)
    timeout: Timeout | None = None
    concurrency: int | None = Field(default=None, ge=1)
    on_overlap: Literal["queue", "skip", "cancel_running"] = "queue"
    triggers: list[Trigger] = Field(default_factory=list)
    nodes: dict[Annotated[str, Field(pattern=NODE_ID_PATTERN)], NodeSpec] = Field(min_length=1)
