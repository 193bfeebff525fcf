"""Loom's shared core: the graph spec and its validation, `${{ }}` expressions, cron,
params, settings and logging. Pure: no I/O beyond reading the configuration.

Other members import from here, not from the modules behind it. The graph and its
expressions are loaded on first use (PEP 562): they bring Jinja2 and PyYAML, which a
service that never reads a graph (the timer, the websocket service) need not hold.
"""

import importlib
from typing import TYPE_CHECKING, Any

from loom_common.cron import (
    CronExpression,
    format_instant,
    next_every,
    parse_instant,
    parse_timezone,
    trigger_id,
)
from loom_common.durations import format_duration, parse_duration
from loom_common.errors import (
    CronError,
    ExpressionError,
    LoomError,
    ParamError,
    SettingsError,
    SpecError,
    SpecIssue,
)
from loom_common.logs import bind_log_context, configure_logging, log_context
from loom_common.messages import CHANNEL_OF, MESSAGE_TYPES, encode_envelope
from loom_common.params import check_param_value, parse_param_text, resolve_params
from loom_common.settings import LoomSettings, load_service_settings, load_settings
from loom_common.spec import GraphSpec, NodeSpec, ParamSpec

if TYPE_CHECKING:
    from loom_common.expressions import (
        STATUS_FUNCTIONS,
        Expr,
        Template,
        compile_template,
        compile_value,
        render_shell,
        render_value,
        to_text,
    )
    from loom_common.graph import CompiledNode, Graph, TriggerInfo, load_graph

__all__ = [
    "CHANNEL_OF",
    "MESSAGE_TYPES",
    "STATUS_FUNCTIONS",
    "CompiledNode",
    "CronError",
    "CronExpression",
    "Expr",
    "ExpressionError",
    "Graph",
    "GraphSpec",
    "LoomError",
    "LoomSettings",
    "NodeSpec",
    "ParamError",
    "ParamSpec",
    "SettingsError",
    "SpecError",
    "SpecIssue",
    "Template",
    "TriggerInfo",
    "bind_log_context",
    "check_param_value",
    "compile_template",
    "compile_value",
    "configure_logging",
    "encode_envelope",
    "format_duration",
    "format_instant",
    "load_graph",
    "load_service_settings",
    "load_settings",
    "log_context",
    "next_every",
    "parse_duration",
    "parse_instant",
    "parse_param_text",
    "parse_timezone",
    "render_shell",
    "render_value",
    "resolve_params",
    "to_text",
    "trigger_id",
]

_LAZY = {
    **dict.fromkeys(
        (
            "STATUS_FUNCTIONS",
            "Expr",
            "Template",
            "compile_template",
            "compile_value",
            "render_shell",
            "render_value",
            "to_text",
        ),
        "expressions",
    ),
    **dict.fromkeys(("CompiledNode", "Graph", "TriggerInfo", "load_graph"), "graph"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"loom_common.{module}"), name)
    globals()[name] = value
    return value
