"""loom_timer: the timer service of DESIGN §7 (being built: issue 6).

`schedule` is the pure core (which ticks a trigger has, which to fire now); `aps` wraps it
in an APScheduler 3 trigger that only wakes the loop; `firing` creates the executions of
due ticks, exactly once across replicas.
"""

from loom_timer.aps import JOB_OPTIONS, ScheduleTrigger
from loom_timer.firing import FireResult, fire_due, last_tick
from loom_timer.schedule import (
    DEFAULT_LIMIT,
    DEFAULT_MISFIRE_GRACE,
    DRIFT_WARNING,
    CatchUp,
    Schedule,
    TimerKind,
    TimerSpec,
    delay_anchor,
    due_ticks,
    lateness,
)

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MISFIRE_GRACE",
    "DRIFT_WARNING",
    "JOB_OPTIONS",
    "CatchUp",
    "FireResult",
    "Schedule",
    "ScheduleTrigger",
    "TimerKind",
    "TimerSpec",
    "delay_anchor",
    "due_ticks",
    "fire_due",
    "last_tick",
    "lateness",
]
