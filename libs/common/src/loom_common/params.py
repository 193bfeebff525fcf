"""Graph params: checking given values against the declared types, defaults and enums.

Used wherever params enter Loom: `loom run -p`, the REST trigger, webhook and timer
`params` mappings. `parse_param_text` reads a command-line `-p key=value` by the declared
type, so `-p count=3` is the integer 3 and `-p regions='["eu","us"]'` a list.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import orjson

from loom_common.errors import ParamError
from loom_common.spec import ParamSpec

__all__ = ["check_param_value", "parse_param_text", "resolve_params"]

_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def check_param_value(spec: ParamSpec, value: Any) -> str | None:
    """Why `value` does not fit `spec`, or None when it does."""
    types = _PYTHON_TYPES[spec.type]
    if isinstance(value, bool) and spec.type != "boolean":
        return f"expected {spec.type}, got boolean"
    if not isinstance(value, types):
        return f"expected {spec.type}, got {_type_name(value)}"
    if spec.enum is not None and value not in spec.enum:
        allowed = ", ".join(repr(v) for v in spec.enum)
        return f"{value!r} is not one of {allowed}"
    return None


def _type_name(value: Any) -> str:
    for name, types in _PYTHON_TYPES.items():
        if isinstance(value, types) and not (isinstance(value, bool) and name != "boolean"):
            return name
    return "null" if value is None else type(value).__name__


def resolve_params(declared: Mapping[str, ParamSpec], given: Mapping[str, Any]) -> dict[str, Any]:
    """The params an execution runs with: `given` checked, defaults filled in.

    Raises `ParamError` listing every unknown, missing or mistyped param.
    """
    problems: dict[str, str] = {}
    for name in given:
        if name not in declared:
            hint = difflib.get_close_matches(name, list(declared), n=1)
            problems[name] = "unknown param" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    resolved: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in given and given[name] is not None:
            problem = check_param_value(spec, given[name])
            if problem:
                problems[name] = problem
            resolved[name] = given[name]
        elif spec.default is not None:
            resolved[name] = spec.default
        elif spec.is_required:
            problems[name] = "required param is missing"
        else:
            resolved[name] = None
    if problems:
        raise ParamError(problems)
    return resolved


def parse_param_text(spec: ParamSpec | None, text: str) -> Any:
    """Read a command-line value by the declared type; `ValueError` says what was expected.

    Arrays are JSON (`["eu","us"]`) or comma-separated text (`eu,us`); objects are JSON.
    """
    kind = spec.type if spec is not None else "string"
    if kind == "string":
        return text
    if kind == "boolean":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"expected boolean (true or false), got {text!r}")
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected integer, got {text!r}") from None
    if kind == "number":
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"expected number, got {text!r}") from None
        return int(number) if number.is_integer() and "." not in text else number
    if kind == "array" and not text.lstrip().startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError(f"expected {kind} (JSON), got {text!r}") from None
    expected = list if kind == "array" else dict
    if not isinstance(value, expected):
        raise ValueError(f"expected {kind} (JSON), got {text!r}")
    return value
