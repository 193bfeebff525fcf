"""`${{ ... }}` templates: sandboxed Jinja2 expressions, never `eval`.

Only `${{ }}` is recognised. Everything outside it is literal text, so `{% %}`, `{# #}`,
`{{ }}` and the shell's `${#var}` pass through untouched. Each expression is compiled once,
when the graph is validated (a syntax error is a validation error with its line), and
evaluated against a plain mapping with `StrictUndefined`: an undefined name is an error,
never an empty string.

A string that is exactly one `${{ expr }}` renders to the expression's own value (a list
stays a list, so `for_each: ${{ params.regions }}` works); a string with text around its
expressions renders to text (see `to_text`).

In `run` scripts values never become shell code: `render_shell` replaces each expression
by a reference to an environment variable holding its value, quoted to fit where it
stands (outside quotes, inside double quotes, inside single quotes). `| raw` pastes the
text itself, explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, UndefinedError, nodes
from jinja2.exceptions import SecurityError
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loom_common.errors import ExpressionError

__all__ = [
    "DOUBLE",
    "HEREDOC",
    "NORMAL",
    "QUOTED_HEREDOC",
    "SINGLE",
    "STATUS_FUNCTIONS",
    "ShellScanner",
    "Expr",
    "Template",
    "compile_template",
    "compile_value",
    "has_templates",
    "iter_exprs",
    "quoted_heredoc_message",
    "render_shell",
    "render_value",
    "to_text",
]

STATUS_FUNCTIONS = frozenset({"success", "failure", "always", "cancelled"})

_TEMPLATE = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)
_RAW = re.compile(r"\|\s*raw\s*$")
_UNDEFINED_ATTR = re.compile(r"^'[^']*' (?:object )?has no attribute '([^']*)'$")


def _tojson(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _fromjson(value: str) -> Any:
    return orjson.loads(value)


class _Environment(ImmutableSandboxedEnvironment):
    """Attribute access on a mapping reads its keys only: `params.items` is the param named
    `items`, never the dict method (Jinja's default prefers the attribute)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = _Environment(undefined=StrictUndefined, autoescape=False)
    env.globals.clear()
    env.filters["raw"] = lambda value: value
    env.filters["tojson"] = _tojson
    env.filters["fromjson"] = _fromjson
    return env


_ENV = _make_environment()


def to_text(value: Any) -> str:
    """How a value reads when pasted into text: strings as they are, `true`/`false`, an
    empty string for null, JSON for lists and mappings, `str()` for the rest."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | dict | tuple):
        return orjson.dumps(value, default=str).decode()
    return str(value)


@dataclass(frozen=True, slots=True, eq=False)
class Expr:
    """One compiled `${{ }}` expression and what it refers to."""

    source: str
    raw: bool
    offset: int
    """Where `${{` starts in the containing string (for error lines)."""
    names: frozenset[str]
    """Top-level names it reads (`params`, `nodes`, `success`, ...)."""
    node_refs: frozenset[str]
    """Node ids it reads through `nodes.<id>` or `nodes['<id>']`."""
    calls: frozenset[str]
    """Names it calls as functions (`success` in `success()`)."""
    _fn: Callable[..., Any]

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """The expression's value in `context`; `ExpressionError` if it cannot be computed."""
        try:
            result = self._fn(context)
            if isinstance(result, Undefined):
                result._fail_with_undefined_error()
        except UndefinedError as exc:
            raise ExpressionError(f"${{{{ {self.source} }}}}: {_undefined_message(exc)}") from None
        except SecurityError as exc:
            raise ExpressionError(f"${{{{ {self.source} }}}}: not allowed: {exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise ExpressionError(f"${{{{ {self.source} }}}}: {exc}") from None
        return result


def _undefined_message(exc: UndefinedError) -> str:
    text = exc.message or "undefined"
    match = _UNDEFINED_ATTR.match(text)
    if match:
        return f"'{match.group(1)}' is undefined"
    return text


@dataclass(frozen=True, slots=True, eq=False)
class Template:
    """A string with at least one `${{ }}`: literal parts and expressions, in order."""

    parts: tuple[str | Expr, ...]

    @property
    def exprs(self) -> tuple[Expr, ...]:
        return tuple(p for p in self.parts if isinstance(p, Expr))

    def render(self, context: Mapping[str, Any]) -> Any:
        if len(self.parts) == 1 and isinstance(self.parts[0], Expr):
            return self.parts[0].evaluate(context)
        return "".join(
            p if isinstance(p, str) else to_text(p.evaluate(context)) for p in self.parts
        )


def has_templates(text: str) -> bool:
    return "${{" in text


def _compile_expr(source: str, offset: int) -> Expr:
    raw = bool(_RAW.search(source))
    body = _RAW.sub("", source).strip() if raw else source.strip()
    if not body:
        raise _syntax("empty expression", offset)
    try:
        tree = Parser(_ENV, body, state="variable").parse_expression()
        fn = _ENV.compile_expression(body, undefined_to_none=False)
        every = [tree, *tree.find_all(nodes.Node)]  # find_all skips the root itself
    except TemplateSyntaxError as exc:
        raise _syntax(f"invalid expression ${{{{ {body} }}}}: {exc.message}", offset) from None
    except RecursionError:
        raise _syntax("the expression is nested too deeply", offset) from None
    names = frozenset(n.name for n in every if isinstance(n, nodes.Name) and n.ctx == "load")
    calls = frozenset(
        n.node.name for n in every if isinstance(n, nodes.Call) and isinstance(n.node, nodes.Name)
    )
    refs: set[str] = set()
    for node in every:
        if not isinstance(node, nodes.Getattr | nodes.Getitem):
            continue
        target = node.node
        if not (isinstance(target, nodes.Name) and target.name == "nodes"):
            continue
        if isinstance(node, nodes.Getattr):
            refs.add(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            refs.add(node.arg.value)
        else:
            raise _syntax("a node must be named literally: nodes.<id> or nodes['<id>']", offset)
    return Expr(body, raw, offset, names, frozenset(refs), calls, _direct_path(tree, fn))


def _direct_path(tree: nodes.Expr, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, or for a plain path (`payload.after`, `params.ref`: a name and attributes, no
    call, filter or index) a function that walks the mappings itself -- the same value
    Jinja gives (ADR 0003: attributes of a mapping are its keys), without its sandboxed
    machinery -- and hands anything else (a missing key, a value that is not a mapping)
    to `fn`, so errors read the same."""
    keys: list[str] = []
    while isinstance(tree, nodes.Getattr):
        keys.append(tree.attr)
        tree = tree.node
    if not (isinstance(tree, nodes.Name) and tree.ctx == "load"):
        return fn
    name = tree.name
    keys.reverse()

    def walk(context: Mapping[str, Any]) -> Any:
        value = context.get(name, _MISSING)
        for key in keys:
            if not isinstance(value, Mapping):
                return fn(context)
            value = value.get(key, _MISSING)
        return fn(context) if value is _MISSING else value

    return walk


_MISSING: Any = object()


def _syntax(message: str, offset: int) -> ExpressionError:
    error = ExpressionError(message)
    error.offset = offset  # type: ignore[attr-defined]
    return error


def compile_template(text: str) -> str | Template:
    """Compile `text`; a string without `${{` comes back as it is.

    Raises `ExpressionError` (with `.offset`, the position of the bad `${{`) on a syntax
    error or an unterminated `${{`.
    """
    if "${{" not in text:
        return text
    parts: list[str | Expr] = []
    pos = 0
    for match in _TEMPLATE.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        parts.append(_compile_expr(match.group(1), match.start()))
        pos = match.end()
    rest = text[pos:]
    if "${{" in rest:
        raise _syntax("unterminated ${{ (missing }})", pos + rest.index("${{"))
    if rest:
        parts.append(rest)
    return Template(tuple(parts))


Compiled = Any
"""A compiled value: the same shape as the input, with strings that hold `${{ }}`
replaced by `Template`s. Plain values stay plain, so rendering them costs nothing."""


def compile_value(value: Any) -> Compiled:
    if isinstance(value, str):
        return compile_template(value)
    if isinstance(value, dict):
        return {k: compile_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compile_value(v) for v in value]
    return value


def render_value(compiled: Compiled, context: Mapping[str, Any]) -> Any:
    if isinstance(compiled, Template):
        return compiled.render(context)
    if isinstance(compiled, dict):
        return {k: render_value(v, context) for k, v in compiled.items()}
    if isinstance(compiled, list):
        return [render_value(v, context) for v in compiled]
    return compiled


def iter_exprs(compiled: Compiled) -> list[Expr]:
    """Every expression in a compiled value."""
    if isinstance(compiled, Template):
        return list(compiled.exprs)
    if isinstance(compiled, dict):
        return [e for v in compiled.values() for e in iter_exprs(v)]
    if isinstance(compiled, list):
        return [e for v in compiled for e in iter_exprs(v)]
    return []


def render_shell(
    script: str | Template, context: Mapping[str, Any], prefix: str = "LOOM_X_"
) -> tuple[str, dict[str, str]]:
    """Render a `run` script so that no value can become shell code.

    Each expression becomes `${LOOM_X_<n>}`, quoted to suit where it stands, and its value
    goes into the returned environment; `| raw` expressions paste their text. Raises
    `ExpressionError` for an expression inside a quoted heredoc (`<<'EOF'`), where no
    reference expands and pasting the text could end the heredoc early.
    """
    if isinstance(script, str):
        return script, {}
    out: list[str] = []
    env: dict[str, str] = {}
    scanner = ShellScanner()
    for part in script.parts:
        if isinstance(part, str):
            out.append(part)
            scanner.feed(part)
            continue
        value = to_text(part.evaluate(context))
        if part.raw:
            out.append(value)
            scanner.feed(value)
            continue
        where = scanner.expression()
        if where == QUOTED_HEREDOC:
            raise ExpressionError(quoted_heredoc_message(part))
        name = f"{prefix}{len(env) + 1}"
        env[name] = value
        if where in (DOUBLE, HEREDOC):
            out.append(f"${{{name}}}")
        elif where == SINGLE:
            out.append(f"'\"${{{name}}}\"'")
        else:
            out.append(f'"${{{name}}}"')
    return "".join(out), env


def quoted_heredoc_message(expr: Expr) -> str:
    return (
        f"${{{{ {expr.source} }}}} stands inside a quoted heredoc (<<'EOF'), where the shell "
        "expands nothing: use an unquoted one (<<EOF), or | raw if you mean the text itself"
    )


NORMAL, SINGLE, DOUBLE, HEREDOC, QUOTED_HEREDOC = range(5)

_HEREDOC_OP = re.compile(r"<<(-?)[ \t]*(?:'([^'\n]*)'|\"([^\"\n]*)\"|(\\?)([A-Za-z0-9_.-]+))")


class ShellScanner:
    """Enough of POSIX sh lexing to know where a substitution point stands: outside
    quotes, in single or double quotes, or in a heredoc body (quoted or not)."""

    def __init__(self) -> None:
        self.state = NORMAL
        self._pending: list[tuple[str, bool, bool]] = []
        self._heredoc: tuple[str, bool, bool] | None = None
        self._line: list[str] = []
        self._line_has_expr = False
        self._escape = False

    def expression(self) -> int:
        """Where an expression at the current point stands."""
        self._line_has_expr = True
        self._escape = False
        if self._heredoc is not None:
            return QUOTED_HEREDOC if self._heredoc[1] else HEREDOC
        return self.state

    def feed(self, text: str) -> None:
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if self._heredoc is not None:
                self._heredoc_char(c)
            elif self._escape:
                self._escape = False
                if c == "\n":
                    self._newline()
            elif self.state == SINGLE:
                if c == "'":
                    self.state = NORMAL
            elif self.state == DOUBLE:
                if c == "\\":
                    self._escape = True
                elif c == '"':
                    self.state = NORMAL
            elif c == "\\":
                self._escape = True
            elif c == "'":
                self.state = SINGLE
            elif c == '"':
                self.state = DOUBLE
            elif c == "\n":
                self._newline()
            elif c == "#" and (i == 0 or text[i - 1] in " \t\n;&|"):
                end = text.find("\n", i)
                i = n if end < 0 else end
                continue
            elif c == "<" and text.startswith("<<", i) and not text.startswith("<<<", i):
                match = _HEREDOC_OP.match(text, i)
                if match:
                    strip, single, double, backslash, bare = match.groups()
                    quoted = single is not None or double is not None or bool(backslash)
                    word = single if single is not None else double if double is not None else bare
                    self._pending.append((word, quoted, strip == "-"))
                    i = match.end()
                    continue
            i += 1

    def _newline(self) -> None:
        if self._pending and self.state == NORMAL:
            self._heredoc = self._pending.pop(0)
            self._line, self._line_has_expr = [], False

    def _heredoc_char(self, c: str) -> None:
        assert self._heredoc is not None
        if c != "\n":
            self._line.append(c)
            return
        word, _, strip = self._heredoc
        line = "".join(self._line)
        if strip:
            line = line.lstrip("\t")
        self._line, ended = [], line == word and not self._line_has_expr
        self._line_has_expr = False
        if ended:
            self._heredoc = self._pending.pop(0) if self._pending else None
