"""loom_timer: the timer service of DESIGN §7.

`schedule` is the pure core (which ticks a trigger has, which to fire now); `aps` wraps it
in an APScheduler 3 trigger that only wakes the loop; `firing` creates the executions of
due ticks, exactly once across replicas; `service` keeps one job per timer trigger in
step with the trigger index and runs the lease reaper (`reaper`) and retention; `serve`
runs it all with the health port (`app`) until SIGTERM (`python -m loom_timer`).
"""

from loom_timer.app import create_app
from loom_timer.aps import JOB_OPTIONS, ScheduleTrigger
from loom_timer.firing import FireResult, fire_due, last_tick
from loom_timer.reaper import reap_lost
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
from loom_timer.service import SyncReport, TimerMetrics, TimerService
from loom_timer.settings import TimerSettings, load_timer_settings

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MISFIRE_GRACE",
    "DRIFT_WARNING",
    "JOB_OPTIONS",
    "CatchUp",
    "FireResult",
    "Schedule",
    "ScheduleTrigger",
    "SyncReport",
    "TimerKind",
    "TimerMetrics",
    "TimerService",
    "TimerSettings",
    "TimerSpec",
    "create_app",
    "delay_anchor",
    "due_ticks",
    "fire_due",
    "last_tick",
    "lateness",
    "load_timer_settings",
    "reap_lost",
]
