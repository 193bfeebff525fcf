"""Reading a YAML or JSON document into plain values while remembering where each came from.

PyYAML's composer gives every node its position; we build the plain values ourselves so
that every path (`("nodes", "deploy", "needs", 1)`) maps to its 1-based line, duplicate
keys are errors instead of silent overwrites, and YAML 1.1 surprises are switched off:
only `true`/`false` are booleans (not `yes`, `no`, `on`), and timestamps stay strings
(`at: 2026-12-24T18:00:00Z` is parsed by the spec, with its timezone rules).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from loom_common.errors import SpecError, SpecIssue

__all__ = ["Document", "Path", "format_path", "load_document"]

Path = tuple[str | int, ...]

MAX_NODES = 200_000
"""Values a document may expand to (aliases included): stops 'billion laughs' documents."""


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-like scalars: no yes/no/on/off booleans, no timestamps."""


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


@dataclass(slots=True)
class Document:
    """Plain values (dicts, lists, str, int, float, bool, None) and the line of each path."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    spans: dict[Path, tuple[int, int, int]] = field(default_factory=dict)
    """For each scalar: its first and past-last character index in `text`, and its line."""
    text: str = ""

    def line_of(self, path: Path) -> int | None:
        """The line of `path`, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def template_line(self, path: Path, occurrence: int) -> int | None:
        """The line of the `occurrence`-th `${{` (0-based) inside the scalar at `path`,
        found in the raw text, so it is right for block, folded and quoted scalars alike."""
        span = self.spans.get(path)
        if span is None:
            return self.line_of(path)
        start, end, line = span
        pos = start - 1
        for _ in range(occurrence + 1):
            pos = self.text.find("${{", pos + 1, end)
            if pos < 0:
                return line
        return line + self.text.count("\n", start, pos)


def format_path(path: Path) -> str:
    """`("nodes", "deploy", "needs", 1)` → `nodes.deploy.needs[1]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


def load_document(text: str | bytes) -> Document:
    """Parse one YAML (or JSON) document. Raises `SpecError` naming the line of each problem."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError([SpecIssue("", f"the document is not UTF-8: {exc.reason}")]) from None
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        if problem == "mapping values are not allowed here":
            problem += " (a value that contains ': ' must be quoted)"
        raise SpecError([SpecIssue("", f"invalid YAML: {problem}", line)]) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue("", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise SpecError([SpecIssue("", "the document is nested too deeply")]) from None
    if root is None:
        raise SpecError([SpecIssue("", "the document is empty")])
    builder = _Builder()
    try:
        data = builder.build(root, ())
    except RecursionError:
        raise SpecError([SpecIssue("", "the document is nested too deeply")]) from None
    if builder.issues:
        raise SpecError(builder.issues)
    return Document(data, builder.lines, builder.spans, text)


class _Builder:
    def __init__(self) -> None:
        self.lines: dict[Path, int] = {}
        self.spans: dict[Path, tuple[int, int, int]] = {}
        self.issues: list[SpecIssue] = []
        self._count = 0
        self._active: set[int] = set()
        self._constructor = _Loader("")

    def build(self, node: yaml.Node, path: Path) -> Any:
        self._count += 1
        if self._count > MAX_NODES:
            raise SpecError(
                [SpecIssue("", f"the document expands to more than {MAX_NODES} values")]
            )
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            mark = node.start_mark
            self.spans[path] = (mark.index, node.end_mark.index, mark.line + 1)
            try:
                value = self._constructor.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                self._issue(path, f"invalid value: {getattr(exc, 'problem', exc)}", node)
            except ValueError as exc:  # `!!int abc`, an integer of 5,000 digits
                self._issue(path, f"invalid value: {exc}", node)
            else:
                if not isinstance(value, int) or -(2**63) <= value < 2**63:
                    return value
                # JSON columns, the API and the messages carry 64-bit integers.
                self._issue(path, "an integer must fit in 64 bits (as text, quote it)", node)
            return None
        if id(node) in self._active:
            self._issue(path, "a recursive alias is not allowed", node)
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return dict(self._mapping(node, path))
        finally:
            self._active.discard(id(node))
        self._issue(path, f"unsupported YAML node {node.tag}", node)
        return None

    def _mapping(self, node: yaml.MappingNode, path: Path) -> Iterator[tuple[str, Any]]:
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._issue(path, "merge keys (<<) are not supported", key_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._issue(path, "a mapping key must be a plain string", key_node)
                continue
            try:
                key = self._constructor.construct_object(key_node)
            except (yaml.YAMLError, ValueError) as exc:
                self._issue(path, f"invalid key: {getattr(exc, 'problem', exc)}", key_node)
                continue
            if not isinstance(key, str | int):
                key = key_node.value
            key = str(key)
            line = key_node.start_mark.line + 1
            if key in seen:
                self._issue(
                    (*path, key),
                    f"duplicate key '{key}' (first defined at line {seen[key]})",
                    key_node,
                )
                continue
            seen[key] = line
            child = (*path, key)
            self.lines[child] = line
            yield key, self.build(value_node, child)

    def _issue(self, path: Path, message: str, node: yaml.Node) -> None:
        self.issues.append(SpecIssue(format_path(path), message, node.start_mark.line + 1))
