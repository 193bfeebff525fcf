"""Loading and validating a whole graph: `load_graph(text) -> Graph` or `SpecError`.

Validation runs in two passes and collects every problem, each with its path and line:

1. the fields (`spec.py`'s models): types, names, durations, unknown fields with a
   "did you mean";
2. the graph as a whole: needs (unknown, self, cycles — found with networkx), triggers
   (cron expressions, timezones, instants, duplicate ids, undeclared params), params
   (defaults and enums of the declared type), and every `${{ }}` template: compiled now,
   its names checked against what its place can see (DESIGN §3), and its `nodes.<id>`
   references checked to be upstream of the node that reads them.

The result, `Graph`, holds the spec plus what the engine needs precomputed: topological
order, ancestors, compiled templates and each node's effective timeout and retry policy.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loom_common import cron
from loom_common.errors import CronError, ExpressionError, SpecError, SpecIssue
from loom_common.expressions import (
    QUOTED_HEREDOC,
    STATUS_FUNCTIONS,
    Compiled,
    Expr,
    ShellScanner,
    Template,
    compile_template,
    iter_exprs,
    quoted_heredoc_message,
)
from loom_common.params import check_param_value
from loom_common.source import Document, Path, format_path, load_document
from loom_common.spec import (
    ENV_NAME_PATTERN,
    GRAPH_NAME_PATTERN,
    NODE_ID_PATTERN,
    PYTHON_TARGET_PATTERN,
    AtTrigger,
    CronTrigger,
    DelayTrigger,
    EveryTrigger,
    GraphSpec,
    HttpSpec,
    NodeDefaults,
    NodeSpec,
    ParamSpec,
    SqlSpec,
    Trigger,
    WebhookSpec,
    WebhookTrigger,
)

__all__ = ["CompiledNode", "Graph", "TriggerInfo", "load_graph", "spec_issues_from_validation"]

_NODE_CONTEXT = frozenset({"params", "env", "secrets", "nodes", "execution", "trigger"})
_FANOUT_NAMES = frozenset({"item", "index"})
_GRAPH_ENV_CONTEXT = frozenset({"params", "secrets", "execution", "trigger"})
_WEBHOOK_CONTEXT = frozenset({"payload", "headers", "event"})
_TIMER_CONTEXT = frozenset({"trigger"})

DEFAULT_RETRY_DELAY = 1.0
DEFAULT_RETRY_MAX_DELAY = 60.0


@dataclass(frozen=True, slots=True, eq=False)
class CompiledNode:
    """A node with its templates compiled and its defaults applied."""

    id: str
    spec: NodeSpec
    kind: str
    needs: tuple[str, ...]
    if_: Template | None
    """None means the default, `success()`."""
    env: Mapping[str, Compiled]
    body: Compiled
    """The kind's own part: the `run` script, the `http` mapping, `with`, the `sql` mapping."""
    for_each: Compiled | None
    timeout: float | None
    retries: int
    retry_delay: float
    retry_max_delay: float


@dataclass(frozen=True, slots=True, eq=False)
class TriggerInfo:
    id: str
    kind: str
    spec: Trigger


@dataclass(frozen=True, slots=True, eq=False)
class Graph:
    """A validated graph, ready to run."""

    spec: GraphSpec
    source: str
    order: tuple[str, ...]
    ancestors: Mapping[str, frozenset[str]]
    dependents: Mapping[str, tuple[str, ...]]
    nodes: Mapping[str, CompiledNode]
    env: Mapping[str, Compiled]
    triggers: tuple[TriggerInfo, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.spec.name


def load_graph(text: str | bytes, *, filename: str | None = None) -> Graph:
    """Parse and validate a graph document (YAML or JSON).

    Raises `SpecError` with every problem found, each naming its path and line.
    `filename` is only used in messages.
    """
    del filename  # the caller prefixes messages with it (FILE:LINE: ...)
    doc = load_document(text)
    if not isinstance(doc.data, dict):
        raise SpecError([SpecIssue("", "a graph must be a mapping with `name` and `nodes`", 1)])
    try:
        spec = GraphSpec.model_validate(doc.data)
    except ValidationError as exc:
        issues = spec_issues_from_validation(exc, doc)
        # Report broken needs and cycles too, not only the field errors that hid them.
        seen = {(i.path, i.message) for i in issues}
        more, _ = check_needs(_raw_needs(doc.data), doc)
        raise SpecError(issues + [i for i in more if (i.path, i.message) not in seen]) from None
    source = text.decode("utf-8") if isinstance(text, bytes) else text
    return _Checker(spec, doc, source).build()


# --- pass 1: field errors -------------------------------------------------------------

_MODELS_BY_SHAPE: list[tuple[tuple[str, ...], type[Any]]] = [
    (("params", "*"), ParamSpec),
    (("defaults",), NodeDefaults),
    (("triggers", "#", "cron"), CronTrigger),
    (("triggers", "#", "every"), EveryTrigger),
    (("triggers", "#", "delay"), DelayTrigger),
    (("triggers", "#", "at"), AtTrigger),
    (("triggers", "#", "webhook"), WebhookTrigger),
    (("triggers", "#", "webhook", "webhook"), WebhookSpec),
    (("nodes", "*"), NodeSpec),
    (("nodes", "*", "http"), HttpSpec),
    (("nodes", "*", "sql"), SqlSpec),
    ((), GraphSpec),
]


def _model_at(loc: tuple[str | int, ...]) -> type[Any] | None:
    for shape, model in _MODELS_BY_SHAPE:
        if len(shape) == len(loc) and all(
            s == "*" or (s == "#" and isinstance(p, int)) or s == p
            for s, p in zip(shape, loc, strict=True)
        ):
            return model
    return None


def _field_names(model: type[Any]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _data_path(loc: tuple[str | int, ...]) -> Path:
    """Drop the tags pydantic puts in the locations of tagged unions (`triggers.0.cron`)."""
    if len(loc) > 2 and loc[0] == "triggers" and isinstance(loc[1], int):
        return (*loc[:2], *loc[3:])
    return loc


def spec_issues_from_validation(exc: ValidationError, doc: Document) -> list[SpecIssue]:
    """Translate pydantic's errors into issues with document paths, lines and hints."""
    issues: list[SpecIssue] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        kind = error["type"]
        if loc and loc[-1] == "[key]":
            path = _data_path(loc[:-1])
            what = {"nodes": "node id", "params": "param name", "env": "variable name"}.get(
                str(path[-2]) if len(path) > 1 else "", "key"
            )
            message = f"invalid {what} '{path[-1]}': {_clean(error['msg'])}"
        elif kind == "extra_forbidden":
            path = _data_path(loc)
            message = f"unknown field '{loc[-1]}'"
            model = _model_at(loc[:-1])
            if model is not None:
                names = _field_names(model)
                hint = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
                message += f" (did you mean '{hint[0]}'?)" if hint else ""
                message += f"; allowed: {', '.join(names)}"
        elif kind == "missing":
            path = _data_path(loc)
            message = f"'{loc[-1]}' is required"
        else:
            path = _data_path(loc)
            message = _clean(error["msg"])
        issues.append(SpecIssue(format_path(path), message, doc.line_of(path)))
    return issues


_PATTERN_MEANINGS = {
    ENV_NAME_PATTERN: "must be letters, digits and '_', not starting with a digit "
    f"({ENV_NAME_PATTERN})",
    PYTHON_TARGET_PATTERN: "must be module:function, like deploy_tools.release:main",
    GRAPH_NAME_PATTERN: "must be lower-case letters, digits and '-', at most 63, "
    f"starting with a letter or digit ({GRAPH_NAME_PATTERN})",
    NODE_ID_PATTERN: "must be letters, digits, '_' and '-', at most 64, "
    f"starting with a letter or '_' ({NODE_ID_PATTERN})",
}


def _clean(message: str) -> str:
    message = message.removeprefix("Value error, ")
    match = re.match(r"^String should match pattern '(.*)'$", message)
    if match:
        return _PATTERN_MEANINGS.get(match.group(1), f"must match {match.group(1)}")
    return message


# --- needs and cycles (also run on documents whose fields are invalid) -----------------

Topology = tuple[tuple[str, ...], dict[str, frozenset[str]], dict[str, tuple[str, ...]]]


def check_needs(needs: Mapping[str, list[str]], doc: Document) -> tuple[list[SpecIssue], Topology]:
    """Unknown, self and repeated needs, and cycles (each named); and, when there are none,
    the topological order, ancestors and dependents of every node."""
    import networkx as nx  # heavy (~40 ms): only validation needs it, not a service's start

    issues: list[SpecIssue] = []

    def issue(path: Path, message: str) -> None:
        issues.append(SpecIssue(format_path(path), message, doc.line_of(path)))

    graph: Any = nx.DiGraph()
    ids = list(needs)
    graph.add_nodes_from(ids)
    for node_id, node_needs in needs.items():
        seen: set[str] = set()
        for i, need in enumerate(node_needs):
            path: Path = ("nodes", node_id, "needs", i)
            if need == node_id:
                issue(path, f"node '{node_id}' cannot need itself")
            elif need not in needs:
                issue(path, f"unknown node '{need}'{_did_you_mean(need, ids)}")
            elif need in seen:
                issue(path, f"'{need}' is listed twice")
            else:
                graph.add_edge(need, node_id)
            seen.add(need)
    cyclic = False
    for component in nx.strongly_connected_components(graph):
        if len(component) < 2:
            continue
        cyclic = True
        cycle = nx.find_cycle(graph.subgraph(component))
        names = [edge[0] for edge in cycle] + [cycle[0][0]]
        first = min(component, key=ids.index)
        issue(("nodes", first, "needs"), "cycle: " + " -> ".join(names))
    if cyclic:
        return issues, (tuple(ids), {n: frozenset() for n in ids}, dict.fromkeys(ids, ()))
    order = tuple(nx.lexicographical_topological_sort(graph, key=ids.index))
    ancestors = {n: frozenset(nx.ancestors(graph, n)) for n in ids}
    dependents = {n: tuple(sorted(graph.successors(n), key=ids.index)) for n in ids}
    return issues, (order, ancestors, dependents)


def _raw_needs(data: dict[str, Any]) -> dict[str, list[str]]:
    """`needs` read straight from a document that did not validate, as far as it can be."""
    nodes = data.get("nodes")
    if not isinstance(nodes, dict):
        return {}
    out: dict[str, list[str]] = {}
    for node_id, node in nodes.items():
        raw = node.get("needs", []) if isinstance(node, dict) else []
        raw = [raw] if isinstance(raw, str) else raw
        out[node_id] = [n for n in raw if isinstance(n, str)] if isinstance(raw, list) else []
    return out


# --- pass 2: the graph as a whole -----------------------------------------------------


class _Checker:
    def __init__(self, spec: GraphSpec, doc: Document, source: str) -> None:
        self.spec = spec
        self.doc = doc
        self.source = source
        self.issues: list[SpecIssue] = []

    def issue(self, path: Path, message: str, line: int | None = None) -> None:
        line = line if line is not None else self.doc.line_of(path)
        self.issues.append(SpecIssue(format_path(path), message, line))

    def build(self) -> Graph:
        spec = self.spec
        self._check_params()
        order, ancestors, dependents = self._check_needs()
        graph_env = {
            name: self._template(("env", name), value, _GRAPH_ENV_CONTEXT)
            for name, value in spec.env.items()
        }
        nodes = {
            node_id: self._node(node_id, node, ancestors) for node_id, node in spec.nodes.items()
        }
        triggers = self._check_triggers()
        if self.issues:
            raise SpecError(self.issues)
        return Graph(
            spec=spec,
            source=self.source,
            order=order,
            ancestors=ancestors,
            dependents=dependents,
            nodes=nodes,
            env=graph_env,
            triggers=triggers,
        )

    # params ------------------------------------------------------------------------

    def _check_params(self) -> None:
        for name, param in self.spec.params.items():
            path: Path = ("params", name)
            if param.default is not None:
                problem = check_param_value(param, param.default)
                if problem:
                    self.issue((*path, "default"), f"default: {problem}")
            for i, value in enumerate(param.enum or []):
                problem = check_param_value(param.model_copy(update={"enum": None}), value)
                if problem:
                    self.issue((*path, "enum", i), problem)

    # needs and cycles --------------------------------------------------------------

    def _check_needs(
        self,
    ) -> tuple[tuple[str, ...], dict[str, frozenset[str]], dict[str, tuple[str, ...]]]:
        needs = {node_id: node.needs for node_id, node in self.spec.nodes.items()}
        issues, topology = check_needs(needs, self.doc)
        self.issues.extend(issues)
        return topology

    # nodes -------------------------------------------------------------------------

    def _node(
        self, node_id: str, node: NodeSpec, ancestors: Mapping[str, frozenset[str]]
    ) -> CompiledNode:
        base: Path = ("nodes", node_id)
        upstream = ancestors.get(node_id, frozenset())
        fanout = node.for_each is not None
        names = _NODE_CONTEXT | (_FANOUT_NAMES if fanout else frozenset())

        def template(key: Path, value: Any, allowed: frozenset[str] = names) -> Compiled:
            return self._template((*base, *key), value, allowed, upstream=upstream, node=node_id)

        if_: Template | None = None
        if node.if_ is not None:
            if_ = self._condition(
                (*base, "if"), node.if_, names | STATUS_FUNCTIONS, upstream=upstream, node=node_id
            )
        for_each: Compiled | None = None
        if isinstance(node.for_each, str):
            for_each = template(("for_each",), node.for_each, _NODE_CONTEXT)
            if isinstance(for_each, str):
                self.issue((*base, "for_each"), "`for_each` takes a list or a ${{ }} expression")
        elif node.for_each is not None:
            for_each = template(("for_each",), node.for_each, _NODE_CONTEXT)
        body: Compiled
        kind = node.kind
        if kind == "run":
            body = template(("run",), node.run)
            if isinstance(body, Template):
                self._check_shell_positions((*base, "run"), node.run or "", body)
        elif kind == "http":
            assert node.http is not None
            http = node.http.model_dump(by_alias=True, exclude_none=True)
            if node.http.timeout is not None:
                http["timeout"] = node.http.timeout.total_seconds()
            body = template(("http",), http)
        elif kind == "sql":
            assert node.sql is not None
            body = template(("sql",), node.sql.model_dump())
        else:
            body = template(("with",), node.with_)
        defaults = self.spec.defaults
        timeout = node.timeout if node.timeout is not None else defaults.timeout
        retries = node.retries if node.retries is not None else defaults.retries
        delay = node.retry_delay if node.retry_delay is not None else defaults.retry_delay
        max_delay = (
            node.retry_max_delay if node.retry_max_delay is not None else defaults.retry_max_delay
        )
        return CompiledNode(
            id=node_id,
            spec=node,
            kind=kind,
            needs=tuple(dict.fromkeys(n for n in node.needs if n != node_id)),
            if_=if_,
            env={k: template(("env", k), v) for k, v in node.env.items()},
            body=body,
            for_each=for_each,
            timeout=timeout.total_seconds() if timeout is not None else None,
            retries=retries or 0,
            retry_delay=delay.total_seconds() if delay is not None else DEFAULT_RETRY_DELAY,
            retry_max_delay=(
                max_delay.total_seconds() if max_delay is not None else DEFAULT_RETRY_MAX_DELAY
            ),
        )

    # templates ---------------------------------------------------------------------

    def _check_shell_positions(self, path: Path, text: str, script: Template) -> None:
        """Expressions in a quoted heredoc cannot be substituted safely (see render_shell).
        `| raw` values are unknown here and taken as plain text."""
        scanner = ShellScanner()
        for part in script.parts:
            if isinstance(part, str):
                scanner.feed(part)
            elif not part.raw and scanner.expression() == QUOTED_HEREDOC:
                line = self.doc.template_line(path, text.count("${{", 0, part.offset))
                self.issue(path, quoted_heredoc_message(part), line)

    def _condition(
        self,
        path: Path,
        raw: str,
        allowed: frozenset[str],
        *,
        upstream: frozenset[str] | None = None,
        node: str | None = None,
    ) -> Template | None:
        """An `if`: one expression (`${{ }}` optional), nothing around it; status
        functions must be called."""
        stripped = raw.strip()
        text = stripped if "${{" in stripped else "${{ " + stripped + " }}"
        compiled = self._template(path, text, allowed, upstream=upstream, node=node)
        if compiled is None:
            return None
        if not isinstance(compiled, Template) or len(compiled.parts) != 1:
            self.issue(
                path, "`if` takes one expression, like ${{ success() }}, with nothing around it"
            )
            return None
        expr = compiled.exprs[0]
        for name in sorted((expr.names & STATUS_FUNCTIONS) - expr.calls):
            self.issue(path, f"{name} is a function: write {name}()")
        return compiled

    def _template(
        self,
        path: Path,
        value: Any,
        allowed: frozenset[str],
        *,
        upstream: frozenset[str] | None = None,
        node: str | None = None,
    ) -> Compiled:
        """Compile every template inside `value`, reporting problems at their lines."""
        if isinstance(value, dict):
            return {
                k: self._template((*path, k), v, allowed, upstream=upstream, node=node)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [
                self._template((*path, i), v, allowed, upstream=upstream, node=node)
                for i, v in enumerate(value)
            ]
        if not isinstance(value, str):
            return value
        try:
            compiled = compile_template(value)
        except ExpressionError as exc:
            offset = getattr(exc, "offset", 0)
            self.issue(path, str(exc), self.doc.template_line(path, value.count("${{", 0, offset)))
            return None
        for expr in iter_exprs(compiled):
            self._check_names(path, value, expr, allowed, upstream, node)
        return compiled

    def _check_names(
        self,
        path: Path,
        text: str,
        expr: Expr,
        allowed: frozenset[str],
        upstream: frozenset[str] | None,
        node: str | None,
    ) -> None:
        line = self.doc.template_line(path, text.count("${{", 0, expr.offset))
        for name in sorted(expr.names - allowed):
            if name in STATUS_FUNCTIONS:
                message = f"{name}() can only be used in a node's `if`"
            elif name in _FANOUT_NAMES and path[-1] == "for_each":
                message = f"'{name}' is not defined in `for_each` itself: it is what it produces"
            elif name in _FANOUT_NAMES and "nodes" in allowed:
                message = f"'{name}' is only defined in a node with `for_each`"
            else:
                hint = _did_you_mean(name, sorted(allowed))
                message = (
                    f"'{name}' is not available here{hint}; available: {', '.join(sorted(allowed))}"
                )
            self.issue(path, f"${{{{ {expr.source} }}}}: {message}", line)
        if "nodes" not in allowed or upstream is None:
            return
        for ref in sorted(expr.node_refs):
            if ref not in self.spec.nodes:
                message = f"unknown node '{ref}'{_did_you_mean(ref, list(self.spec.nodes))}"
                hyphenated = [n for n in self.spec.nodes if n.startswith(ref + "-")]
                if hyphenated:
                    message += f"; a hyphenated id is written nodes['{hyphenated[0]}']"
            elif ref == node:
                message = f"a node cannot read its own status or outputs ('{ref}')"
            elif ref not in upstream:
                message = f"node '{ref}' is not upstream of '{node}': add it to `needs`"
            else:
                continue
            self.issue(path, f"${{{{ {expr.source} }}}}: {message}", line)

    # triggers ----------------------------------------------------------------------

    def _check_triggers(self) -> tuple[TriggerInfo, ...]:
        infos: list[TriggerInfo] = []
        ids: dict[str, int] = {}
        hooks: dict[str, int] = {}
        for i, trigger in enumerate(self.spec.triggers):
            path: Path = ("triggers", i)
            kind, expression, tz = self._check_trigger(path, trigger)
            trigger_id = trigger.id or (
                f"webhook:{trigger.webhook.name}"
                if isinstance(trigger, WebhookTrigger)
                else cron.trigger_id(kind, expression, tz)
            )
            if trigger_id in ids:
                self.issue(
                    path, f"trigger id '{trigger_id}' is the same as triggers[{ids[trigger_id]}]'s"
                )
            ids[trigger_id] = i
            if isinstance(trigger, WebhookTrigger):
                name = trigger.webhook.name
                if name in hooks:
                    self.issue((*path, "webhook", "name"), f"webhook '{name}' is defined twice")
                hooks[name] = i
            infos.append(TriggerInfo(trigger_id, kind, trigger))
        return tuple(infos)

    def _check_trigger(self, path: Path, trigger: Trigger) -> tuple[str, str, str | None]:
        if isinstance(trigger, WebhookTrigger):
            hook = trigger.webhook
            hpath: Path = (*path, "webhook")
            if hook.if_ is not None:
                self._condition((*hpath, "if"), hook.if_, _WEBHOOK_CONTEXT)
            self._trigger_params((*hpath, "params"), hook.params, _WEBHOOK_CONTEXT)
            return "webhook", hook.name, None
        self._trigger_params((*path, "params"), trigger.params, _TIMER_CONTEXT)
        try:
            if isinstance(trigger, CronTrigger):
                tz_path: Path = (*path, "timezone")
                try:
                    cron.parse_timezone(trigger.timezone)
                except CronError as exc:
                    self.issue(tz_path, str(exc))
                cron.CronExpression.parse(trigger.cron)
                return "cron", trigger.cron, trigger.timezone
            if isinstance(trigger, EveryTrigger):
                if trigger.every.total_seconds() <= 0:
                    self.issue((*path, "every"), "must be longer than 0s")
                if trigger.start is not None:
                    try:
                        cron.parse_instant(trigger.start)
                    except CronError as exc:
                        self.issue((*path, "start"), str(exc))
                return "every", str(trigger.every.total_seconds()), trigger.start
            if isinstance(trigger, DelayTrigger):
                if trigger.delay.total_seconds() <= 0:
                    self.issue((*path, "delay"), "must be longer than 0s")
                return "delay", str(trigger.delay.total_seconds()), None
            cron.parse_instant(trigger.at)
            return "at", trigger.at, None
        except CronError as exc:
            key = {CronTrigger: "cron", AtTrigger: "at"}.get(type(trigger), "")
            self.issue((*path, key) if key else path, str(exc))
            return type(trigger).__name__.removesuffix("Trigger").lower(), "", None

    def _trigger_params(
        self, path: Path, params: Mapping[str, Any], allowed: frozenset[str]
    ) -> None:
        declared = self.spec.params
        for name, value in params.items():
            if name not in declared:
                self.issue(
                    (*path, name), f"unknown param '{name}'{_did_you_mean(name, list(declared))}"
                )
                continue
            compiled = self._template((*path, name), value, allowed)
            if not iter_exprs(compiled) and compiled is not None:
                problem = check_param_value(declared[name], value)
                if problem:
                    self.issue((*path, name), problem)


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    hint = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{hint[0]}'?)" if hint else ""
