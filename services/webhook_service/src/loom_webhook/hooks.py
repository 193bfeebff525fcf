"""A stored webhook trigger, compiled once per graph version: its auth, its filters and
its params mapping, ready to apply to a delivery (DESIGN §6)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loom_common import (
    ParamSpec,
    Template,
    compile_template,
    compile_value,
    render_value,
    resolve_params,
)
from loom_common.expressions import Compiled
from loom_db.graphs import TriggerRecord
from loom_webhook.signatures import AuthScheme

__all__ = ["Hook", "HookCache"]


@dataclass(frozen=True, slots=True)
class Hook:
    """One hook of one graph version. Graph versions never change, so neither does this."""

    graph: str
    name: str
    graph_version: int
    trigger_id: str
    auth: AuthScheme
    secret_name: str | None
    events: frozenset[str] | None
    condition: Template | None
    params: Compiled
    declared: Mapping[str, ParamSpec]

    @classmethod
    def compile(cls, trigger: TriggerRecord, graph_spec: Mapping[str, Any]) -> Hook:
        """`trigger` (a stored, validated `webhook` trigger) of the graph version whose
        normalized spec is `graph_spec`."""
        spec = trigger.spec["webhook"]
        condition = None
        if spec.get("if") is not None:
            text = str(spec["if"]).strip()
            compiled = compile_template(text if "${{" in text else "${{ " + text + " }}")
            assert isinstance(compiled, Template)  # validated when the graph was applied
            condition = compiled
        events = spec.get("events")
        return cls(
            graph=trigger.graph,
            name=trigger.webhook_name or "default",
            graph_version=trigger.graph_version,
            trigger_id=trigger.id,
            auth=spec["auth"],
            secret_name=spec.get("secret"),
            events=None if events is None else frozenset(events),
            condition=condition,
            params=compile_value(spec.get("params") or {}),
            declared={
                name: ParamSpec.model_validate(param)
                for name, param in graph_spec.get("params", {}).items()
            },
        )

    def skip_reason(self, event: str | None, context: Mapping[str, Any]) -> str | None:
        """Why the `events` or `if` filter drops this delivery, or None when it passes.
        Raises `ExpressionError` when the `if` cannot be evaluated on this payload."""
        if self.events is not None and event not in self.events:
            shown = "no event header" if event is None else f"event {event!r}"
            return f"{shown} is not in events ({', '.join(sorted(self.events))})"
        if self.condition is not None and not self.condition.render(context):
            return f"if is false: {self.condition.exprs[0].source}"
        return None

    def resolve(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """The execution's params: the mapping rendered over the delivery, checked against
        the graph's declaration, defaults filled in. Raises `ExpressionError` or
        `ParamError`."""
        given = render_value(self.params, context)
        assert isinstance(given, dict)
        return resolve_params(self.declared, given)


class HookCache:
    """Compiled hooks by (graph, version, hook), the least recently used dropped past
    `size`. A new graph version is a new key, so nothing here is ever stale."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._hooks: OrderedDict[tuple[str, int, str], Hook] = OrderedDict()

    def get(self, trigger: TriggerRecord) -> Hook | None:
        key = (trigger.graph, trigger.graph_version, trigger.webhook_name or "default")
        hook = self._hooks.get(key)
        if hook is not None:
            self._hooks.move_to_end(key)
        return hook

    def put(self, hook: Hook) -> None:
        self._hooks[(hook.graph, hook.graph_version, hook.name)] = hook
        if len(self._hooks) > self._size:
            self._hooks.popitem(last=False)
