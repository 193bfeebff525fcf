"""Fire times of cron, `every:` and instants, with crontab(5) and DST semantics."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom_common import cron
from loom_common.cron import (
    CronExpression,
    format_instant,
    next_every,
    parse_instant,
    parse_timezone,
    trigger_id,
)
from loom_common.errors import CronError

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
ZUTC = ZoneInfo("UTC")


def fires(expr: str, after: str, tz: ZoneInfo = ZUTC, count: int = 1) -> list[str]:
    """The next `count` fire times of `expr` after the instant `after`, as `...Z` strings."""
    expression = CronExpression.parse(expr)
    instant = parse_instant(after)
    out = []
    for _ in range(count):
        instant = expression.next_after(instant, tz)
        out.append(format_instant(instant))
    return out


def local(instants: list[str], tz: ZoneInfo) -> list[str]:
    """Instants as wall-clock times with the zone's abbreviation: `02:30 CEST`."""
    return [parse_instant(i).astimezone(tz).strftime("%m-%d %H:%M %Z") for i in instants]


def test_public_api_is_pinned() -> None:
    assert sorted(cron.__all__) == [
        "CronExpression",
        "format_instant",
        "next_every",
        "parse_instant",
        "parse_timezone",
        "trigger_id",
    ]


# --- crontab(5) ------------------------------------------------------------------------

CRONTAB_CASES = [
    # every minute, strictly after
    ("* * * * *", "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"),
    ("* * * * *", "2026-01-01T00:00:59.999Z", "2026-01-01T00:01:00Z"),
    # steps
    ("*/15 * * * *", "2026-01-01T10:07:30Z", "2026-01-01T10:15:00Z"),
    ("*/15 * * * *", "2026-01-01T10:45:00Z", "2026-01-01T11:00:00Z"),
    ("1-30/5 * * * *", "2026-01-01T10:27:00Z", "2026-01-01T11:01:00Z"),
    ("5/15 * * * *", "2026-01-01T10:51:00Z", "2026-01-01T11:05:00Z"),
    ("23 0-20/2 * * *", "2026-01-01T20:23:00Z", "2026-01-02T00:23:00Z"),
    # lists and ranges
    ("0,30 9-17 * * *", "2026-01-01T17:30:00Z", "2026-01-02T09:00:00Z"),
    ("0 0 1,15 * *", "2026-01-15T00:00:00Z", "2026-02-01T00:00:00Z"),
    # weekday names and numbers; 2026-01-02 is a Friday
    ("0 9 * * MON-FRI", "2026-01-02T10:00:00Z", "2026-01-05T09:00:00Z"),
    ("0 9 * * 1-5", "2026-01-03T10:00:00Z", "2026-01-05T09:00:00Z"),
    ("0 0 * * 0", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
    ("0 0 * * 7", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
    ("0 0 * * sun", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
    ("0 0 * * 5-7", "2026-01-04T00:00:00Z", "2026-01-09T00:00:00Z"),
    ("0 0 * * FRI-SUN", "2026-01-04T00:00:00Z", "2026-01-09T00:00:00Z"),
    ("0 0 * * 1/2", "2026-01-03T00:00:00Z", "2026-01-04T00:00:00Z"),  # 1,3,5,7: Sunday too
    # month names
    ("0 0 1 jan *", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("0 0 1 JAN-MAR *", "2026-03-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    # both day fields restricted: either matches (the 10th is a Tuesday, the 13th a Friday)
    ("0 12 10 * FRI", "2026-03-07T00:00:00Z", "2026-03-10T12:00:00Z"),
    ("0 12 10 * FRI", "2026-03-10T12:00:00Z", "2026-03-13T12:00:00Z"),
    ("0 0 30 2 MON", "2026-01-01T00:00:00Z", "2026-02-02T00:00:00Z"),
    # day-of-month starts with `*`: both must match (2026-05-01 is the first such Friday)
    ("0 12 */10 * FRI", "2026-01-01T00:00:00Z", "2026-05-01T12:00:00Z"),
    # aliases
    ("@hourly", "2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z"),
    ("@daily", "2026-01-01T10:00:00Z", "2026-01-02T00:00:00Z"),
    ("@midnight", "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"),
    ("@weekly", "2026-01-01T00:00:00Z", "2026-01-04T00:00:00Z"),
    ("@monthly", "2026-01-15T00:00:00Z", "2026-02-01T00:00:00Z"),
    ("@yearly", "2026-06-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("@ANNUALLY", "2026-06-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    # six fields: seconds first
    ("*/10 * * * * *", "2026-01-01T10:00:05Z", "2026-01-01T10:00:10Z"),
    ("*/10 * * * * *", "2026-01-01T10:59:50Z", "2026-01-01T11:00:00Z"),
    ("30 0 12 * * *", "2026-01-01T12:00:30Z", "2026-01-02T12:00:30Z"),
    # month and year rollover
    ("0 0 1 * *", "2026-12-31T12:00:00Z", "2027-01-01T00:00:00Z"),
    ("59 59 23 31 12 *", "2026-12-31T23:59:59Z", "2027-12-31T23:59:59Z"),
    # Feb 29 only in leap years; 2100 is not one
    ("0 0 29 2 *", "2026-01-01T00:00:00Z", "2028-02-29T00:00:00Z"),
    ("0 0 29 2 *", "2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),
    # the 31st skips short months
    ("0 0 31 * *", "2026-01-31T00:00:00Z", "2026-03-31T00:00:00Z"),
    ("0 0 31 * *", "2026-03-31T00:00:00Z", "2026-05-31T00:00:00Z"),
]


@pytest.mark.parametrize(("expr", "after", "expected"), CRONTAB_CASES)
def test_next_fire_time_follows_crontab(expr: str, after: str, expected: str) -> None:
    assert fires(expr, after) == [expected]


def test_parsed_expression_keeps_its_text_and_says_whether_it_has_seconds() -> None:
    five = CronExpression.parse("  0 2 * * 1-5 ")
    six = CronExpression.parse("*/10 * * * * *")
    assert (five.expression, five.has_seconds) == ("0 2 * * 1-5", False)
    assert (six.expression, six.has_seconds) == ("*/10 * * * * *", True)
    assert str(five) == "0 2 * * 1-5"


def test_fire_time_is_utc_whatever_the_zone_of_the_input() -> None:
    after = datetime(2026, 6, 1, 12, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 03:00Z
    fire = CronExpression.parse("0 * * * *").next_after(after, BERLIN)
    assert fire == datetime(2026, 6, 1, 4, 0, tzinfo=UTC)
    assert fire.tzinfo is UTC


def test_expression_is_evaluated_in_the_given_timezone() -> None:
    assert fires("0 9 * * *", "2026-06-01T00:00:00Z", BERLIN) == ["2026-06-01T07:00:00Z"]
    assert fires("0 9 * * *", "2026-06-01T00:00:00Z", NEW_YORK) == ["2026-06-01T13:00:00Z"]


def test_naive_after_is_rejected() -> None:
    with pytest.raises(CronError, match="aware"):
        CronExpression.parse("* * * * *").next_after(datetime(2026, 1, 1), ZUTC)


def test_search_gives_up_instead_of_looping_when_nothing_fires_before_year_10000() -> None:
    with pytest.raises(CronError, match="does not fire"):
        fires("0 0 29 2 *", "9996-03-01T00:00:00Z")


# --- DST ------------------------------------------------------------------------------


def test_berlin_spring_forward_skips_a_daily_time_that_does_not_exist() -> None:
    # 2026-03-29 02:00-02:59 does not exist in Berlin: 02:30 fires on the 28th and the 30th.
    got = fires("30 2 * * *", "2026-03-27T12:00:00Z", BERLIN, count=2)
    assert local(got, BERLIN) == ["03-28 02:30 CET", "03-30 02:30 CEST"]


def test_berlin_spring_forward_quarter_hours_jump_from_0145_to_0300() -> None:
    got = fires("*/15 * * * *", "2026-03-29T00:40:00Z", BERLIN, count=3)
    assert local(got, BERLIN) == ["03-29 01:45 CET", "03-29 03:00 CEST", "03-29 03:15 CEST"]


def test_berlin_spring_forward_hourly_skips_0200() -> None:
    got = fires("0 * * * *", "2026-03-28T23:30:00Z", BERLIN, count=3)
    assert local(got, BERLIN) == ["03-29 01:00 CET", "03-29 03:00 CEST", "03-29 04:00 CEST"]


def test_berlin_fall_back_fires_a_repeated_daily_time_once() -> None:
    got = fires("30 2 * * *", "2026-10-24T12:00:00Z", BERLIN, count=2)
    assert got == ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
    assert local(got, BERLIN) == ["10-25 02:30 CEST", "10-26 02:30 CET"]


def test_berlin_fall_back_quarter_hours_fire_in_the_first_pass_only() -> None:
    got = fires("*/15 * * * *", "2026-10-24T23:50:00Z", BERLIN, count=6)
    assert local(got, BERLIN) == [
        "10-25 02:00 CEST",
        "10-25 02:15 CEST",
        "10-25 02:30 CEST",
        "10-25 02:45 CEST",
        "10-25 03:00 CET",
        "10-25 03:15 CET",
    ]


def test_berlin_fall_back_hourly_fires_0200_once() -> None:
    got = fires("0 * * * *", "2026-10-24T23:30:00Z", BERLIN, count=3)
    assert local(got, BERLIN) == ["10-25 02:00 CEST", "10-25 03:00 CET", "10-25 04:00 CET"]


def test_asking_during_the_second_pass_of_a_repeated_hour_gives_the_time_after_it() -> None:
    # 01:10Z is 02:10 CET, the second 02:10 of the night; 02:15 already fired (as CEST).
    assert local(fires("*/15 * * * *", "2026-10-25T01:10:00Z", BERLIN), BERLIN) == [
        "10-25 03:00 CET"
    ]
    # Even a per-second expression stays silent for the rest of the second pass.
    every_second = fires("* * * * * *", "2026-10-25T01:30:00Z", BERLIN, count=2)
    assert every_second == ["2026-10-25T02:00:00Z", "2026-10-25T02:00:01Z"]


def test_new_york_spring_forward_skips_0230() -> None:
    # 2026-03-08: 02:00 EST becomes 03:00 EDT.
    got = fires("30 2 * * *", "2026-03-07T12:00:00Z", NEW_YORK)
    assert local(got, NEW_YORK) == ["03-09 02:30 EDT"]


def test_new_york_fall_back_fires_0130_once() -> None:
    # 2026-11-01: 02:00 EDT becomes 01:00 EST, so 01:00-01:59 happens twice.
    got = fires("30 1 * * *", "2026-10-31T12:00:00Z", NEW_YORK, count=2)
    assert local(got, NEW_YORK) == ["11-01 01:30 EDT", "11-02 01:30 EST"]
    half_hours = fires("*/30 * * * *", "2026-11-01T04:50:00Z", NEW_YORK, count=3)
    assert local(half_hours, NEW_YORK) == ["11-01 01:00 EDT", "11-01 01:30 EDT", "11-01 02:00 EST"]


# --- invalid expressions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("60 * * * *", "minute field '60': value 60 out of range 0-59"),
        ("0 24 * * *", "hour field '24': value 24 out of range 0-23"),
        ("0 0 0 * *", "day-of-month field '0': value 0 out of range 1-31"),
        ("0 0 1 13 *", "month field '13': value 13 out of range 1-12"),
        ("0 0 * * 8", "day-of-week field '8': value 8 out of range 0-7"),
        ("60 * * * * *", "second field '60': value 60 out of range 0-59"),
        ("0 0 * * MOX", "day-of-week field 'MOX': 'MOX' is not a number or a name"),
        ("0 0 1 JANUARY *", "month field 'JANUARY': 'JANUARY' is not a number or a name"),
        ("MON * * * *", "minute field 'MON': 'MON' is not a number"),
        ("*/0 * * * *", "minute field '*/0': step must be at least 1"),
        ("0 */x * * *", "hour field '*/x': step 'x' is not a number"),
        ("30-10 * * * *", "minute field '30-10': range '30-10' runs backwards"),
        ("1,,2 * * * *", "minute field '1,,2': empty item"),
        ("* * * *", "expected 5 or 6 fields, got 4"),
        ("* * * * * * *", "expected 5 or 6 fields, got 7"),
        ("@reboot", "@reboot is not supported"),
        ("@fortnightly", "unknown cron alias '@fortnightly'"),
        ("", "empty cron expression"),
        ("   ", "empty cron expression"),
        ("0 0 30 2 *", "never fires: day-of-month '30' does not occur in month '2'"),
        ("0 0 31 4,6,9,11 *", "never fires: day-of-month '31' does not occur in month '4,6,9,11'"),
        ("0 0 31 FEB *", "never fires"),
    ],
)
def test_invalid_expression_is_rejected_naming_the_problem(expr: str, message: str) -> None:
    with pytest.raises(CronError, match=re.escape(message)):
        CronExpression.parse(expr)


def test_feb_29_and_the_31st_with_a_weekday_are_valid() -> None:
    CronExpression.parse("0 0 29 2 *")
    CronExpression.parse("0 0 31 2 MON")  # either day field matches: every Monday in February


# --- every ----------------------------------------------------------------------------

T = datetime(2026, 11, 23, 10, 7, 30, tzinfo=UTC)


def test_every_fires_at_multiples_of_the_period_since_the_epoch() -> None:
    assert next_every(T, timedelta(minutes=15)) == datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
    assert next_every(T, timedelta(days=1)) == datetime(2026, 11, 24, tzinfo=UTC)


def test_every_is_strictly_after_an_instant_on_the_boundary() -> None:
    on_boundary = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)
    assert next_every(on_boundary, timedelta(minutes=15)) == on_boundary + timedelta(minutes=15)


def test_every_counts_from_start_when_given() -> None:
    start = datetime(2026, 11, 23, 10, 1, tzinfo=UTC)
    assert next_every(T, timedelta(minutes=15), start) == datetime(2026, 11, 23, 10, 16, tzinfo=UTC)
    assert next_every(start, timedelta(minutes=15), start) == start + timedelta(minutes=15)


def test_every_with_a_future_start_first_fires_at_start() -> None:
    start = datetime(2026, 12, 1, 1, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    fire = next_every(T, timedelta(minutes=15), start)
    assert fire == datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
    assert fire.tzinfo is UTC


def test_every_result_is_utc_for_input_in_another_zone() -> None:
    after = T.astimezone(NEW_YORK)
    fire = next_every(after, timedelta(minutes=15))
    assert fire.tzinfo is UTC
    assert format_instant(fire) == "2026-11-23T10:15:00Z"


@pytest.mark.parametrize("period", [timedelta(0), timedelta(seconds=-1)])
def test_every_rejects_a_period_that_is_not_positive(period: timedelta) -> None:
    with pytest.raises(CronError, match="period must be positive"):
        next_every(T, period)


def test_every_rejects_naive_datetimes() -> None:
    with pytest.raises(CronError, match="aware"):
        next_every(datetime(2026, 1, 1), timedelta(minutes=1))
    with pytest.raises(CronError, match="aware"):
        next_every(T, timedelta(minutes=1), datetime(2026, 1, 1))


# --- timezones, instants, ids ----------------------------------------------------------


def test_parse_timezone_returns_the_zone() -> None:
    assert parse_timezone("Europe/Berlin") == BERLIN
    assert parse_timezone("UTC").key == "UTC"


@pytest.mark.parametrize(
    "name", ["Europe/Berln", "", "Europe", "../etc/passwd", "/etc/passwd", "Mars/Olympus"]
)
def test_parse_timezone_rejects_unknown_and_path_like_names(name: str) -> None:
    with pytest.raises(CronError, match=re.escape(f"unknown timezone {name!r}")):
        parse_timezone(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-24T18:00:00Z", datetime(2026, 12, 24, 18, tzinfo=UTC)),
        ("2026-12-24T19:00:00+01:00", datetime(2026, 12, 24, 18, tzinfo=UTC)),
        ("2026-12-24T18:00:00.250000Z", datetime(2026, 12, 24, 18, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_parse_instant_gives_utc(text: str, expected: datetime) -> None:
    parsed = parse_instant(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-12-24T18:00:00", "must include a timezone offset or Z"),
        ("2026-12-24", "must include a timezone offset or Z"),
        ("christmas", "expected ISO 8601"),
        ("", "expected ISO 8601"),
    ],
)
def test_parse_instant_rejects_naive_or_malformed_text(text: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        parse_instant(text)


def test_format_instant_is_utc_with_z_and_no_zero_microseconds() -> None:
    berlin = datetime(2026, 11, 23, 11, 15, tzinfo=BERLIN)
    assert format_instant(berlin) == "2026-11-23T10:15:00Z"
    assert format_instant(berlin.replace(microsecond=5)) == "2026-11-23T10:15:00.000005Z"
    assert parse_instant(format_instant(berlin)) == berlin


def test_format_instant_rejects_naive_datetimes() -> None:
    with pytest.raises(CronError, match="naive"):
        format_instant(datetime(2026, 1, 1))


def test_trigger_id_is_stable_and_depends_on_kind_expression_and_timezone() -> None:
    nightly = trigger_id("cron", "0 2 * * 1-5", "Europe/Berlin")
    digest = hashlib.sha256(b"cron\x000 2 * * 1-5\x00Europe/Berlin").hexdigest()[:12]
    assert nightly == f"cron-{digest}"
    assert re.fullmatch(r"cron-[0-9a-f]{12}", nightly)
    assert trigger_id("cron", "0 2 * * 1-5", "Europe/Berlin") == nightly
    assert trigger_id("cron", "0 2 * * 1-5", "UTC") != nightly
    assert trigger_id("cron", "0 3 * * 1-5", "Europe/Berlin") != nightly
    assert trigger_id("every", "15m", None) == trigger_id("every", "15m", "")


# --- property: next_after is the first matching local time -----------------------------

LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # half-hour DST
ZONES = [ZUTC, BERLIN, NEW_YORK, LORD_HOWE, ZoneInfo("Asia/Kolkata")]
# 2026's DST changes, where mistakes would hide: (zone, instant of the change).
TRANSITIONS = [
    (BERLIN, datetime(2026, 3, 29, 1, tzinfo=UTC)),
    (BERLIN, datetime(2026, 10, 25, 1, tzinfo=UTC)),
    (NEW_YORK, datetime(2026, 3, 8, 7, tzinfo=UTC)),
    (NEW_YORK, datetime(2026, 11, 1, 6, tzinfo=UTC)),
    (LORD_HOWE, datetime(2026, 4, 4, 15, tzinfo=UTC)),
    (LORD_HOWE, datetime(2026, 10, 3, 15, 30, tzinfo=UTC)),
]


@dataclass(frozen=True)
class Generated:
    text: str
    values: frozenset[int]


@st.composite
def cron_field(draw: st.DrawFn, low: int, high: int) -> Generated:
    """One field as text, with the values it should allow, built independently of the parser."""
    kind = draw(st.sampled_from(["star", "step", "value", "range", "range_step", "start_step"]))
    a = draw(st.integers(low, high))
    b = draw(st.integers(a, high))
    step = draw(st.integers(1, high - low + 1))
    if kind == "star":
        return Generated("*", frozenset(range(low, high + 1)))
    if kind == "step":
        return Generated(f"*/{step}", frozenset(range(low, high + 1, step)))
    if kind == "value":
        return Generated(str(a), frozenset({a}))
    if kind == "range":
        return Generated(f"{a}-{b}", frozenset(range(a, b + 1)))
    if kind == "range_step":
        return Generated(f"{a}-{b}/{step}", frozenset(range(a, b + 1, step)))
    return Generated(f"{a}/{step}", frozenset(range(a, high + 1, step)))


@st.composite
def cron_list(draw: st.DrawFn, low: int, high: int) -> Generated:
    items = draw(st.lists(cron_field(low, high), min_size=1, max_size=3))
    return Generated(
        ",".join(i.text for i in items), frozenset[int]().union(*(i.values for i in items))
    )


zones_and_instants = st.one_of(
    # from 2 hours before a change to 1 hour after it
    st.builds(
        lambda change, offset: (change[0], change[1] + timedelta(microseconds=offset)),
        st.sampled_from(TRANSITIONS),
        st.integers(-2 * 3600 * 10**6, 3600 * 10**6),
    ),
    st.tuples(
        st.sampled_from(ZONES),
        st.datetimes(datetime(2025, 1, 1), datetime(2027, 12, 31), timezones=st.just(UTC)),
    ),
)


def is_fire_instant(
    instant: datetime, tz: ZoneInfo, allowed: tuple[frozenset[int], ...], fields: str
) -> bool:
    """Independent oracle: the local time matches, and is not the second pass of a repeat."""
    wall = instant.astimezone(tz)
    parts = {"s": wall.second, "m": wall.minute, "h": wall.hour}
    return wall.fold == 0 and all(parts[f] in v for f, v in zip(fields, allowed, strict=True))


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    minutes=cron_list(0, 59),
    hours=cron_list(0, 23),
    zone_and_after=zones_and_instants,
)
def test_next_after_is_the_first_matching_local_minute(
    minutes: Generated, hours: Generated, zone_and_after: tuple[ZoneInfo, datetime]
) -> None:
    tz, after = zone_and_after
    expression = CronExpression.parse(f"{minutes.text} {hours.text} * * *")
    fire = expression.next_after(after, tz)
    allowed = (minutes.values, hours.values)
    assert fire > after
    assert fire.second == 0
    assert is_fire_instant(fire, tz, allowed, "mh")
    instant = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while instant < fire:
        assert not is_fire_instant(instant, tz, allowed, "mh"), instant
        instant += timedelta(minutes=1)


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seconds=cron_list(0, 59),
    minutes=cron_list(0, 59),
    zone_and_after=zones_and_instants,
)
def test_next_after_with_seconds_is_the_first_matching_local_second(
    seconds: Generated, minutes: Generated, zone_and_after: tuple[ZoneInfo, datetime]
) -> None:
    tz, after = zone_and_after
    expression = CronExpression.parse(f"{seconds.text} {minutes.text} * * * *")
    fire = expression.next_after(after, tz)
    allowed = (seconds.values, minutes.values)
    assert fire > after
    assert is_fire_instant(fire, tz, allowed, "sm")
    instant = after.replace(microsecond=0) + timedelta(seconds=1)
    while instant < fire:
        assert not is_fire_instant(instant, tz, allowed, "sm"), instant
        instant += timedelta(seconds=1)
