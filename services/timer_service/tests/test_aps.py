"""The APScheduler 3 trigger: it wakes the loop at Loom's ticks, never at APScheduler's own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]

from loom_timer import JOB_OPTIONS, Schedule, ScheduleTrigger


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


def trigger(spec: dict[str, str]) -> ScheduleTrigger:
    return ScheduleTrigger(Schedule.from_spec(spec))


def test_first_wake_up_is_the_first_tick_at_or_after_now() -> None:
    quarter = trigger({"every": "15m"})
    assert quarter.get_next_fire_time(None, utc(2026, 5, 4, 10, 7)) == utc(2026, 5, 4, 10, 15)
    assert quarter.get_next_fire_time(None, utc(2026, 5, 4, 10, 15)) == utc(2026, 5, 4, 10, 15)


def test_after_a_late_wake_up_the_next_is_after_now_not_a_replay() -> None:
    """Missed ticks are `due_ticks`' business: the trigger never makes APScheduler replay them."""
    minutely = trigger({"cron": "* * * * *"})
    woke_late = utc(2026, 5, 4, 10, 5, 30)
    assert minutely.get_next_fire_time(utc(2026, 5, 4, 10, 1), woke_late) == utc(2026, 5, 4, 10, 6)
    assert minutely.get_next_fire_time(utc(2026, 5, 4, 10, 6), utc(2026, 5, 4, 10, 6)) == utc(
        2026, 5, 4, 10, 7
    )


def test_sunday_is_sunday_and_times_come_back_in_utc_whatever_now_is() -> None:
    """APScheduler's own `from_crontab` would make `0` a Monday."""
    sunday = trigger({"cron": "0 9 * * 0", "timezone": "Europe/Berlin"})
    now = datetime(2026, 3, 2, 12, tzinfo=ZoneInfo("America/New_York"))  # a Monday
    fire = sunday.get_next_fire_time(None, now)
    assert fire == utc(2026, 3, 8, 8)  # 09:00 CET
    assert (
        fire is not None and fire.astimezone(ZoneInfo("Europe/Berlin")).strftime("%A") == "Sunday"
    )


def test_no_next_tick_means_no_wake_up() -> None:
    assert trigger({"at": "2026-05-04T10:00:00Z"}).get_next_fire_time(None, utc(2026, 6, 1)) is None
    assert trigger({"delay": "5m"}).get_next_fire_time(None, utc(2026, 6, 1)) is None


def test_trigger_names_its_schedule() -> None:
    assert str(trigger({"every": "15m"})) == "loom[every 15m]"


async def test_asyncio_scheduler_wakes_the_job_on_each_tick() -> None:
    woken: list[datetime] = []
    twice = asyncio.Event()

    async def wake() -> None:
        woken.append(datetime.now(UTC))
        if len(woken) >= 2:
            twice.set()

    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.add_job(wake, trigger({"every": "1s"}), id="every-second", **JOB_OPTIONS)
    scheduler.start()
    try:
        await asyncio.wait_for(twice.wait(), timeout=15)
    finally:
        scheduler.shutdown(wait=False)
    assert len(woken) >= 2
