"""loom_timer: the timer service of DESIGN §7 (being built: issue 6).

`schedule` is the pure core (which ticks a trigger has, which to fire now); `aps` wraps it
in an APScheduler 3 trigger that only wakes the loop.
"""

from loom_timer.aps import JOB_OPTIONS, ScheduleTrigger
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
    "Schedule",
    "ScheduleTrigger",
    "TimerKind",
    "TimerSpec",
    "delay_anchor",
    "due_ticks",
    "lateness",
]
