"""An APScheduler 3 trigger around `Schedule`: APScheduler only wakes the loop, Loom
decides the times (DESIGN §7).

APScheduler's own `CronTrigger` counts weekdays from Monday (`from_crontab("0 0 * * 0")`
is a Monday job) and has its own DST behaviour; `ScheduleTrigger` asks `Schedule` instead,
so the validator, `GET /graphs/{name}` and the timer agree on every fire time.

A wake-up is not a tick. The job woken by this trigger reads the trigger's last tick
from the executions table and fires what `due_ticks` returns; so this trigger never
replays missed times itself -- after a late wake-up it simply names the next tick after
`now`. Add the job with `JOB_OPTIONS`: without `misfire_grace_time=None` APScheduler
would silently drop a wake-up more than a second late, and the decision about late
ticks belongs to `catch_up` / `misfire_grace`, not to APScheduler.

When the schedule has no next tick (`at` passed, a `delay` whose run has not ended),
APScheduler adds the job paused or removes it after its run; the shell adds it again when
the schedule changes (a `delay` run ended: `Schedule.anchored`). Jobs live in the memory
job store, so the trigger is never pickled.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from apscheduler.triggers.base import BaseTrigger  # type: ignore[import-untyped]

from loom_timer.schedule import Schedule

__all__ = ["JOB_OPTIONS", "ScheduleTrigger"]

JOB_OPTIONS: dict[str, Any] = {
    "misfire_grace_time": None,  # never drop a late wake-up: `due_ticks` decides
    "coalesce": True,  # one wake-up for any number of missed ones
    "max_instances": 1,  # a wake-up while the last one still runs is redundant
}
"""Keyword arguments for `scheduler.add_job(..., trigger=ScheduleTrigger(...))`."""

_TICK = timedelta(microseconds=1)


class ScheduleTrigger(BaseTrigger):  # type: ignore[misc]  # BaseTrigger is untyped
    """Wakes an APScheduler job at each tick of a `Schedule`."""

    __slots__ = ("schedule",)

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The next wake-up: the first tick at or after `now` when the job is added
        (`previous_fire_time` None), else the first tick after both the previous one and
        `now`. None when the schedule has no further tick.

        Raises `CronError` if a datetime is naive (APScheduler passes aware ones).
        """
        if previous_fire_time is None:
            return self.schedule.next_after(now - _TICK)
        return self.schedule.next_after(max(previous_fire_time, now))

    def __str__(self) -> str:
        return f"loom[{self.schedule}]"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ({self.schedule})>"
