"""The timer's pure core: scheduled times and which ticks fire now (driven, never waited for)."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import loom_timer
from loom_common import CronError
from loom_common.spec import CronTrigger, EveryTrigger
from loom_timer import (
    DRIFT_WARNING,
    Schedule,
    delay_anchor,
    due_ticks,
    lateness,
)

SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


def ticks(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    out: list[datetime] = []
    for _ in range(count):
        tick = schedule.next_after(after)
        assert tick is not None
        out.append(tick)
        after = tick
    return out


def cron(expr: str, tz: str = "UTC", **extra: Any) -> Schedule:
    return Schedule.from_spec({"cron": expr, "timezone": tz, **extra})


def local_dates(instants: list[datetime], tz: str) -> list[date]:
    return [t.astimezone(ZoneInfo(tz)).date() for t in instants]


def test_public_api_is_pinned() -> None:
    assert set(loom_timer.__all__) == {
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
    }


# --- scheduled times ---------------------------------------------------------------------


def test_cron_every_minute_fires_on_whole_minutes_in_utc() -> None:
    got = ticks(cron("* * * * *"), utc(2026, 5, 4, 10, 0, 30, 500_000), 3)
    assert got == [utc(2026, 5, 4, 10, 1), utc(2026, 5, 4, 10, 2), utc(2026, 5, 4, 10, 3)]
    assert all(t.tzinfo is UTC and t.microsecond == 0 for t in got)


def test_six_field_cron_counts_seconds_first() -> None:
    got = ticks(cron("*/10 * * * * *"), utc(2026, 5, 4, 10, 0, 5), 3)
    assert got == [
        utc(2026, 5, 4, 10, 0, 10),
        utc(2026, 5, 4, 10, 0, 20),
        utc(2026, 5, 4, 10, 0, 30),
    ]


@pytest.mark.parametrize("weekday", ["0", "7", "SUN"])
def test_day_of_week_0_and_7_are_sunday(weekday: str) -> None:
    monday = utc(2026, 3, 2)
    got = ticks(cron(f"0 9 * * {weekday}"), monday, 2)
    assert got == [utc(2026, 3, 8, 9), utc(2026, 3, 15, 9)]
    assert {t.strftime("%A") for t in got} == {"Sunday"}


def test_every_15m_is_aligned_to_the_epoch() -> None:
    every = Schedule.from_spec({"every": "15m"})
    got = ticks(every, utc(2026, 5, 4, 10, 7, 12), 3)
    assert got == [utc(2026, 5, 4, 10, 15), utc(2026, 5, 4, 10, 30), utc(2026, 5, 4, 10, 45)]


def test_every_15m_is_aligned_to_start_and_nothing_fires_before_it() -> None:
    every = Schedule.from_spec({"every": "15m", "start": "2026-05-04T12:05:00+02:00"})
    assert every.next_after(utc(2026, 5, 1)) == utc(2026, 5, 4, 10, 5)  # the start itself
    got = ticks(every, utc(2026, 5, 4, 10, 7), 2)
    assert got == [utc(2026, 5, 4, 10, 20), utc(2026, 5, 4, 10, 35)]


def test_at_fires_once() -> None:
    at = Schedule.from_spec({"at": "2026-12-24T18:00:00Z"})
    assert at.next_after(utc(2026, 12, 1)) == utc(2026, 12, 24, 18)
    assert at.next_after(utc(2026, 12, 24, 18)) is None
    fired = due_ticks(at, utc(2026, 12, 1), utc(2026, 12, 24, 18, 0, 2))
    assert fired == [utc(2026, 12, 24, 18)]
    assert due_ticks(at, fired[-1], utc(2026, 12, 24, 18, 5)) == []


@pytest.mark.parametrize("catch_up", ["none", "latest", "all"])
def test_at_in_the_past_fires_nothing(catch_up: str) -> None:
    at = Schedule.from_spec({"at": "2020-01-01T00:00:00Z", "catch_up": catch_up})
    now = utc(2026, 5, 4, 10)
    assert at.next_after(now) is None
    assert due_ticks(at, None, now) == []


def test_berlin_spring_forward_skips_the_missing_half_past_two() -> None:
    """2026-03-29 02:00 CET jumps to 03:00 CEST: 02:30 does not exist that day."""
    got = ticks(cron("30 2 * * *", "Europe/Berlin"), utc(2026, 3, 27, 12), 3)
    assert local_dates(got, "Europe/Berlin") == [
        date(2026, 3, 28),
        date(2026, 3, 30),
        date(2026, 3, 31),
    ]
    assert got == [utc(2026, 3, 28, 1, 30), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]


def test_berlin_fall_back_fires_the_repeated_half_past_two_once() -> None:
    """2026-10-25 03:00 CEST falls back to 02:00 CET: 02:30 happens twice, fires at the first."""
    berlin = cron("30 2 * * *", "Europe/Berlin", catch_up="all")
    got = ticks(berlin, utc(2026, 10, 24, 12), 2)
    assert got == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    # Catching up over the whole day also finds one tick, not two.
    day = due_ticks(berlin, utc(2026, 10, 24, 22), utc(2026, 10, 25, 22, 59))
    assert day == [utc(2026, 10, 25, 0, 30)]


def test_new_york_dst_skips_and_repeats_like_crontab() -> None:
    """2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST (01:30 twice)."""
    spring = ticks(cron("30 2 * * *", "America/New_York"), utc(2026, 3, 7), 2)
    assert spring == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 9, 6, 30)]
    fall = ticks(cron("30 1 * * *", "America/New_York"), utc(2026, 10, 31, 12), 2)
    assert fall == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_schedules_built_separately_give_identical_ticks() -> None:
    """Two replicas build their schedule on their own and must agree on every tick."""
    spec = CronTrigger(cron="*/7 9-17 * * MON-FRI", timezone="Europe/Berlin")
    first = Schedule.from_spec(spec)
    second = Schedule.from_spec(spec.model_dump(mode="json", by_alias=True))
    assert first == second
    start = utc(2026, 3, 27, 15, 3, 11, 123_456)
    assert ticks(first, start, 200) == ticks(second, start, 200)
    every_a = Schedule.from_spec(EveryTrigger.model_validate({"every": "90s"}))
    every_b = Schedule.from_spec({"every": 90})
    assert ticks(every_a, start, 50) == ticks(every_b, start, 50)


def test_stored_spec_gets_the_spec_defaults() -> None:
    schedule = Schedule.from_spec({"every": "15m", "id": "quarter", "params": {"x": 1}})
    assert (schedule.catch_up, schedule.misfire_grace) == ("latest", MINUTE)
    custom = cron("@hourly", catch_up="all", misfire_grace="5m")
    assert (custom.catch_up, custom.misfire_grace) == ("all", 5 * MINUTE)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"webhook": {"auth": "none"}}, "not a timer trigger"),
        ({}, "not a timer trigger"),
        ({"cron": "* * * * *", "every": "1m"}, "not a timer trigger"),
        ({"cron": "61 * * * *"}, "minute"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"every": "0s"}, "longer than 0s"),
        ({"every": "soon"}, "invalid every trigger"),
        ({"at": "tomorrow"}, "invalid instant"),
        ({"at": "2026-12-24T18:00:00"}, "offset"),
        ({"delay": "5m", "catch_up": "sometimes"}, "invalid delay trigger"),
    ],
)
def test_invalid_specs_raise_cron_error(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(CronError, match=message):
        Schedule.from_spec(spec)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(CronError, match="aware"):
        cron("* * * * *").next_after(datetime(2026, 1, 1))
    with pytest.raises(CronError, match="aware"):
        due_ticks(cron("* * * * *"), datetime(2026, 1, 1), utc(2026, 1, 1))


# --- catch-up -----------------------------------------------------------------------------

HOURLY_LAST = utc(2026, 5, 4, 10)  # fired, then every replica went down for over 3 hours


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        ("none", []),
        ("latest", [utc(2026, 5, 4, 13)]),
        ("all", [utc(2026, 5, 4, 11), utc(2026, 5, 4, 12), utc(2026, 5, 4, 13)]),
    ],
)
def test_catch_up_after_a_three_hour_outage(catch_up: str, expected: list[datetime]) -> None:
    hourly = cron("0 * * * *", catch_up=catch_up)
    assert due_ticks(hourly, HOURLY_LAST, utc(2026, 5, 4, 13, 20)) == expected


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        ("none", [utc(2026, 5, 4, 13)]),
        ("latest", [utc(2026, 5, 4, 13)]),
        ("all", [utc(2026, 5, 4, 11), utc(2026, 5, 4, 12), utc(2026, 5, 4, 13)]),
    ],
)
def test_catch_up_when_the_newest_missed_tick_is_still_on_time(
    catch_up: str, expected: list[datetime]
) -> None:
    """Back up 30 s after 13:00: that tick is on time and fires under every policy;
    `latest` does not add 12:00 to it."""
    hourly = cron("0 * * * *", catch_up=catch_up)
    assert due_ticks(hourly, HOURLY_LAST, utc(2026, 5, 4, 13, 0, 30)) == expected


@pytest.mark.parametrize("catch_up", ["none", "latest"])
def test_misfire_grace_boundary_is_on_time(catch_up: str) -> None:
    hourly = cron("0 * * * *", catch_up=catch_up, misfire_grace="60s")
    last = utc(2026, 5, 4, 12)
    tick = utc(2026, 5, 4, 13)
    assert due_ticks(hourly, last, tick + MINUTE) == [tick]
    late = due_ticks(hourly, last, tick + MINUTE + timedelta(microseconds=1))
    assert late == ([] if catch_up == "none" else [tick])
    # The policy and the grace given to the call win over the schedule's own.
    assert due_ticks(hourly, last, tick + 2 * MINUTE, misfire_grace=2 * MINUTE) == [tick]
    assert due_ticks(hourly, last, tick + 2 * MINUTE, catch_up="none") == []


@pytest.mark.parametrize("catch_up", ["none", "latest", "all"])
def test_a_trigger_that_never_fired_missed_nothing(catch_up: str) -> None:
    hourly = cron("0 * * * *", catch_up=catch_up)
    assert due_ticks(hourly, None, utc(2026, 5, 4, 13, 20)) == []
    assert due_ticks(hourly, None, utc(2026, 5, 4, 13, 0, 20)) == [utc(2026, 5, 4, 13)]


def test_ticks_on_time_within_the_grace_all_fire_and_none_twice() -> None:
    every = Schedule.from_spec({"every": "10s", "catch_up": "none", "misfire_grace": "30s"})
    now = utc(2026, 5, 4, 10, 1, 5)
    assert due_ticks(every, None, now) == [
        utc(2026, 5, 4, 10, 0, 40),
        utc(2026, 5, 4, 10, 0, 50),
        utc(2026, 5, 4, 10, 1),
    ]
    assert due_ticks(every, utc(2026, 5, 4, 10, 0, 50), now) == [utc(2026, 5, 4, 10, 1)]
    assert due_ticks(every, utc(2026, 5, 4, 10, 1), now) == []


def test_catch_up_all_is_paged_by_limit_and_loses_nothing() -> None:
    every = Schedule.from_spec({"every": "1s", "catch_up": "all"})
    last, now = utc(2026, 5, 4, 10), utc(2026, 5, 4, 10, 0, 10)
    fired: list[datetime] = []
    while page := due_ticks(every, last, now, limit=4):
        assert len(page) <= 4
        fired += page
        last = page[-1]
    assert fired == [last - timedelta(seconds=n) for n in range(9, -1, -1)]
    assert len(fired) == len(set(fired)) == 10


def test_latest_finds_the_newest_of_many_missed_ticks_quickly() -> None:
    """Three days of an every-second cron are 259,200 missed ticks; `latest` bisects."""
    every_second = cron("* * * * * *", catch_up="latest", misfire_grace="0s")
    now = utc(2026, 5, 7, 10, 2, 0, 700_000)
    started = time.perf_counter()
    got = due_ticks(every_second, utc(2026, 5, 4, 10), now)
    assert got == [utc(2026, 5, 7, 10, 2)]
    assert time.perf_counter() - started < 2  # a walk would take far longer


def test_due_ticks_refuses_bad_arguments() -> None:
    hourly = cron("0 * * * *")
    now = utc(2026, 5, 4)
    with pytest.raises(ValueError, match="limit"):
        due_ticks(hourly, None, now, limit=0)
    with pytest.raises(ValueError, match="catch_up"):
        due_ticks(hourly, None, now, catch_up="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        due_ticks(hourly, None, now, misfire_grace=-SECOND)


# --- delay ---------------------------------------------------------------------------------


def test_delay_anchor_rules() -> None:
    active, tick, end = utc(2026, 5, 4, 9), utc(2026, 5, 4, 10), utc(2026, 5, 4, 10, 3)
    assert delay_anchor(active_since=active, last_tick=None, last_end=None) == active
    assert delay_anchor(active_since=active, last_tick=tick, last_end=None) is None
    assert delay_anchor(active_since=active, last_tick=tick, last_end=end) == end


def test_delay_fires_d_after_the_previous_run_ended_on_a_whole_second() -> None:
    delay = Schedule.from_spec({"delay": "5m"}, delay_anchor=utc(2026, 5, 4, 10, 3, 7, 400_000))
    assert delay.next_after(utc(2026, 5, 4, 10, 3, 8)) == utc(2026, 5, 4, 10, 8, 8)
    assert due_ticks(delay, utc(2026, 5, 4, 10), utc(2026, 5, 4, 10, 8, 8)) == [
        utc(2026, 5, 4, 10, 8, 8)
    ]


def test_delay_has_no_tick_while_its_run_has_not_ended() -> None:
    delay = Schedule.from_spec({"delay": "5m"})
    assert delay.next_after(utc(2026, 5, 4)) is None
    assert due_ticks(delay, utc(2026, 5, 4), utc(2026, 5, 5), catch_up="all") == []


def test_delay_first_run_is_d_after_the_trigger_became_active() -> None:
    active = utc(2026, 5, 4, 9)
    anchor = delay_anchor(active_since=active, last_tick=None, last_end=None)
    assert anchor is not None
    delay = Schedule.from_spec({"delay": "1h"}).anchored(anchor)
    assert due_ticks(delay, None, utc(2026, 5, 4, 9, 59)) == []
    assert due_ticks(delay, None, utc(2026, 5, 4, 10, 0, 10)) == [utc(2026, 5, 4, 10)]


@pytest.mark.parametrize("catch_up", ["latest", "all"])
def test_delay_catches_up_with_one_run_only(catch_up: str) -> None:
    delay = Schedule.from_spec({"delay": "10m", "catch_up": catch_up}).anchored(utc(2026, 5, 4, 10))
    assert due_ticks(delay, utc(2026, 5, 4, 9, 55), utc(2026, 5, 4, 13, 5)) == [utc(2026, 5, 4, 13)]


def test_delay_with_catch_up_none_restarts_on_the_next_multiple() -> None:
    delay = Schedule.from_spec({"delay": "10m", "catch_up": "none"}).anchored(utc(2026, 5, 4, 10))
    assert due_ticks(delay, None, utc(2026, 5, 4, 13, 5)) == []
    assert due_ticks(delay, None, utc(2026, 5, 4, 13, 10, 30)) == [utc(2026, 5, 4, 13, 10)]


def test_anchored_is_only_for_delay() -> None:
    with pytest.raises(ValueError, match="delay"):
        cron("* * * * *").anchored(utc(2026, 5, 4))


# --- drift ----------------------------------------------------------------------------------


def test_lateness_measures_drift_against_the_warning_threshold() -> None:
    tick = utc(2026, 5, 4, 10)
    assert lateness(tick, tick + timedelta(milliseconds=40)) < DRIFT_WARNING
    assert lateness(tick, tick + 3 * SECOND) == 3 * SECOND > DRIFT_WARNING


def test_schedule_describes_itself() -> None:
    assert str(cron("0 2 * * *", "Europe/Berlin")) == "cron 0 2 * * * Europe/Berlin"
    assert str(Schedule.from_spec({"every": "15m"})) == "every 15m"
    assert str(Schedule.from_spec({"at": "2026-12-24T19:00:00+01:00"})) == "at 2026-12-24T18:00:00Z"
    delay = Schedule.from_spec({"delay": "5m"}, delay_anchor=utc(2026, 5, 4, 10))
    assert str(delay) == "delay 5m after 2026-05-04T10:00:00Z"
