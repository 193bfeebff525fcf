"""One set of a service's metrics per registry: a registry refuses a second metric of the
same name, and `loom up` hands one registry to every service (and tests build many apps
over one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry

__all__ = ["metrics_of"]

M = TypeVar("M")

_MADE: WeakKeyDictionary[CollectorRegistry, dict[Any, Any]] = WeakKeyDictionary()


def metrics_of(registry: CollectorRegistry, make: Callable[[CollectorRegistry], M]) -> M:
    """`make(registry)` the first time for this registry and `make`, the same object after."""
    made = _MADE.setdefault(registry, {})
    if make not in made:
        made[make] = make(registry)
    result: M = made[make]
    return result
