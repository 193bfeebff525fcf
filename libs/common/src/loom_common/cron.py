"""Timer fire times: cron expressions (crontab(5) semantics), `every:` periods and instants.

Pure: no I/O beyond reading the tz database through `zoneinfo`. Used by the graph validator
and by the timer service, so every replica computes the same fire times.

Cron expressions have 5 fields (minute hour day-of-month month day-of-week) or 6 with the
**seconds first** (`*/10 * * * * *`); with 5 fields the second is 0. Each field takes `*`,
lists (`1,2`), ranges (`1-5`), steps (`*/15`, `1-30/5`, `5/15` = from 5 to the maximum),
and in month and day-of-week the names `JAN`..`DEC`, `SUN`..`SAT` (any case, also in
ranges). Day-of-week 0 and 7 are both Sunday; a day-of-week range may end on Sunday
(`FRI-SUN`). Aliases: `@yearly` `@annually` `@monthly` `@weekly` `@daily` `@midnight`
`@hourly`. As in crontab(5), when both day-of-month and day-of-week are restricted (neither
starts with `*`) a day matches if EITHER matches; otherwise both must.

Daylight saving time. An expression is matched against the wall clock of the trigger's
timezone, and each matching wall-clock time fires at most once:

* a wall-clock time skipped by a change (spring forward: Europe/Berlin 2026-03-29,
  02:00-02:59 does not exist) does not fire at all -- `30 2 * * *` next fires the next day;
* a wall-clock time that happens twice (fall back: Europe/Berlin 2026-10-25, 02:00-02:59
  happens first in CEST, then again in CET) fires once, at its first occurrence. The whole
  second pass is skipped: `*/15 * * * *` fires at 02:00, 02:15, 02:30 and 02:45 CEST, then
  at 03:00 CET; `0 * * * *` fires at 02:00 CEST only.

Fire times are returned as aware UTC datetimes; instants are written as ISO 8601 UTC with
`Z` (`2026-11-23T10:15:00Z`). Every invalid input raises `CronError` naming what is wrong.
"""

from __future__ import annotations

import calendar
import hashlib
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import MAXYEAR, UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from loom_common.errors import CronError

__all__ = [
    "CronExpression",
    "format_instant",
    "next_every",
    "parse_instant",
    "parse_timezone",
    "trigger_id",
]

# Every expression `parse` accepts fires at least once in any 40 years (the worst case is
# Feb 29 on one weekday, e.g. `0 0 29 2 */7`); the margin keeps `next_after` bounded.
_HORIZON_YEARS = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTH_NAMES = {
    name: number
    for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
        start=1,
    )
}
_DAY_NAMES = {
    name: number for number, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))
}
# The longest each month can be (February in a leap year).
_MAX_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int] = field(default_factory=dict)


_SECOND = _Field("second", 0, 59)
_MINUTE = _Field("minute", 0, 59)
_HOUR = _Field("hour", 0, 23)
_DAY = _Field("day-of-month", 1, 31)
_MONTH = _Field("month", 1, 12, _MONTH_NAMES)
_WEEKDAY = _Field("day-of-week", 0, 7, _DAY_NAMES)


def _value(spec: _Field, text: str, token: str) -> int:
    if token.isascii() and token.isdigit():
        number = int(token)
    elif token.upper() in spec.names:
        number = spec.names[token.upper()]
    else:
        expected = "a number or a name" if spec.names else "a number"
        raise CronError(f"{spec.name} field {text!r}: {token!r} is not {expected}")
    if not spec.low <= number <= spec.high:
        raise CronError(
            f"{spec.name} field {text!r}: value {number} out of range {spec.low}-{spec.high}"
        )
    return number


def _parse_field(spec: _Field, text: str) -> tuple[int, ...]:
    """The sorted values `text` allows (day-of-week 7 folded onto 0, Sunday)."""
    values: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()):
                raise CronError(f"{spec.name} field {text!r}: step {step_text!r} is not a number")
            step = int(step_text)
            if step == 0:
                raise CronError(f"{spec.name} field {text!r}: step must be at least 1, got 0")
        if base == "*":
            low, high = spec.low, spec.high
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _value(spec, text, first), _value(spec, text, last)
            if spec is _WEEKDAY and high == 0 < low:
                high = 7  # FRI-SUN: through Sunday
            if low > high:
                raise CronError(f"{spec.name} field {text!r}: range {base!r} runs backwards")
        elif base:
            low = _value(spec, text, base)
            high = spec.high if slash else low  # `5/15` runs from 5 to the maximum
        else:
            raise CronError(f"{spec.name} field {text!r}: empty item")
        values.update(range(low, high + 1, step))
    if spec is _WEEKDAY and 7 in values:
        values.discard(7)
        values.add(0)
    return tuple(sorted(values))


def _mask(values: tuple[int, ...]) -> int:
    bits = 0
    for value in values:
        bits |= 1 << value
    return bits


@dataclass(frozen=True, slots=True)
class CronExpression:
    """A parsed cron expression; `next_after` gives its fire times in a timezone."""

    expression: str
    has_seconds: bool
    _seconds: tuple[int, ...] = field(repr=False)
    _minutes: tuple[int, ...] = field(repr=False)
    _hours: tuple[int, ...] = field(repr=False)
    _days: tuple[int, ...] = field(repr=False)
    _months: tuple[int, ...] = field(repr=False)
    _day_mask: int = field(repr=False)
    _weekday_mask: int = field(repr=False)
    # crontab(5): both day fields restricted -> a day matches if either does.
    _day_or: bool = field(repr=False)

    @classmethod
    def parse(cls, expr: str) -> CronExpression:
        """Parse a 5- or 6-field expression or an `@alias`.

        Raises `CronError` naming the field and the problem, or saying the expression can
        never fire (`0 0 30 2 *`).
        """
        text = expr.strip()
        if not text:
            raise CronError("empty cron expression: expected 5 or 6 fields or an @alias")
        if text.startswith("@"):
            alias = text.lower()
            if alias == "@reboot":
                raise CronError("@reboot is not supported: a timer fires at times, not at boot")
            if alias not in _ALIASES:
                known = ", ".join(_ALIASES)
                raise CronError(f"unknown cron alias {text!r}: expected one of {known}")
            fields = _ALIASES[alias].split()
        else:
            fields = text.split()
        if len(fields) not in (5, 6):
            raise CronError(f"expected 5 or 6 fields, got {len(fields)}: {text!r}")
        has_seconds = len(fields) == 6
        if not has_seconds:
            fields = ["0", *fields]
        second, minute, hour, day, month, weekday = fields
        days = _parse_field(_DAY, day)
        months = _parse_field(_MONTH, month)
        weekdays = _parse_field(_WEEKDAY, weekday)
        day_or = not day.startswith("*") and not weekday.startswith("*")
        if not day_or and all(days[0] > _MAX_MONTH_DAYS[m] for m in months):
            raise CronError(
                f"the expression never fires: day-of-month {day!r} "
                f"does not occur in month {month!r}"
            )
        return cls(
            expression=text,
            has_seconds=has_seconds,
            _seconds=_parse_field(_SECOND, second),
            _minutes=_parse_field(_MINUTE, minute),
            _hours=_parse_field(_HOUR, hour),
            _days=days,
            _months=months,
            _day_mask=_mask(days),
            _weekday_mask=_mask(weekdays),
            _day_or=day_or,
        )

    def __str__(self) -> str:
        return self.expression

    def next_after(self, after: datetime, tz: ZoneInfo) -> datetime:
        """The first fire time strictly after `after` (aware, any tz), as an aware UTC datetime.

        The expression is matched against the wall clock of `tz`; see the module docstring
        for DST. Raises `CronError` if `after` is naive or nothing fires within 50 years.
        """
        if after.utcoffset() is None:
            raise CronError("`after` must be an aware datetime (with a timezone)")
        try:
            after_utc = after.astimezone(UTC)
            wall = after_utc.astimezone(tz).replace(tzinfo=None, fold=0)
            start = wall.replace(microsecond=0) + timedelta(seconds=1)
            last_year = min(wall.year + _HORIZON_YEARS, MAXYEAR)
            while (candidate := self._next_wall(start, last_year)) is not None:
                fire = candidate.replace(tzinfo=tz).astimezone(UTC)  # fold=0: first occurrence
                if fire.astimezone(tz).replace(tzinfo=None) != candidate:
                    start = _gap_end(candidate, tz)  # skipped by spring forward
                elif fire > after_utc:
                    return fire
                else:
                    # `after` lies in the second pass of a repeated hour, and `candidate`
                    # fired in the first pass: nothing in that hour fires again.
                    start = _fold_end(candidate, tz)
        except OverflowError as exc:  # the search ran into datetime's year 9999
            raise CronError(
                f"{self.expression!r} does not fire after {after.isoformat()} "
                f"before the year {MAXYEAR + 1}"
            ) from exc
        raise CronError(
            f"{self.expression!r} does not fire within {_HORIZON_YEARS} years "
            f"after {after.isoformat()}"
        )

    def _next_wall(self, start: datetime, last_year: int) -> datetime | None:
        """The first matching wall-clock time at or after `start`, jumping field by field."""
        y, mo, d, h, mi, s = (
            start.year,
            start.month,
            start.day,
            start.hour,
            start.minute,
            start.second,
        )
        while y <= last_year:
            i = bisect_left(self._months, mo)
            if i == len(self._months):
                y, mo, d, h, mi, s = y + 1, 1, 1, 0, 0, 0
                continue
            if self._months[i] != mo:
                mo, d, h, mi, s = self._months[i], 1, 0, 0, 0
            day = self._next_day(y, mo, d)
            if day is None:
                mo, d, h, mi, s = mo + 1, 1, 0, 0, 0
                continue
            if day != d:
                d, h, mi, s = day, 0, 0, 0
            i = bisect_left(self._hours, h)
            if i == len(self._hours):
                d, h, mi, s = d + 1, 0, 0, 0
                continue
            if self._hours[i] != h:
                h, mi, s = self._hours[i], 0, 0
            i = bisect_left(self._minutes, mi)
            if i == len(self._minutes):
                h, mi, s = h + 1, 0, 0
                continue
            if self._minutes[i] != mi:
                mi, s = self._minutes[i], 0
            i = bisect_left(self._seconds, s)
            if i == len(self._seconds):
                mi, s = mi + 1, 0
                continue
            return datetime(y, mo, d, h, mi, self._seconds[i])
        return None

    def _next_day(self, year: int, month: int, day: int) -> int | None:
        """The first matching day of this month at or after `day`, or None."""
        month_days = calendar.monthrange(year, month)[1]
        if day > month_days:
            return None
        if not self._day_or and self._weekday_mask == 0b1111111:
            i = bisect_left(self._days, day)
            return self._days[i] if i < len(self._days) and self._days[i] <= month_days else None
        weekday = date(year, month, day).isoweekday() % 7  # Sunday = 0
        for candidate in range(day, month_days + 1):
            day_ok = bool(self._day_mask >> candidate & 1)
            weekday_ok = bool(self._weekday_mask >> weekday & 1)
            if (day_ok or weekday_ok) if self._day_or else (day_ok and weekday_ok):
                return candidate
            weekday = (weekday + 1) % 7
        return None


def _first_changed(low: datetime, high: datetime, changed: Callable[[datetime], bool]) -> datetime:
    """The first whole second in (low, high] where `changed` holds; it holds at `high`."""
    a, b = 0, int((high - low).total_seconds())
    while b - a > 1:
        middle = (a + b) // 2
        if changed(low + timedelta(seconds=middle)):
            b = middle
        else:
            a = middle
    return low + timedelta(seconds=b)


def _gap_end(wall: datetime, tz: ZoneInfo) -> datetime:
    """The first wall-clock time after the DST gap that swallows `wall`."""
    instants = sorted(wall.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1))
    before = instants[0].astimezone(tz).utcoffset()
    end = _first_changed(instants[0], instants[1], lambda u: u.astimezone(tz).utcoffset() != before)
    return end.astimezone(tz).replace(tzinfo=None)


def _fold_end(wall: datetime, tz: ZoneInfo) -> datetime:
    """The first wall-clock time after the repeated hour that contains `wall`."""
    first = wall.replace(tzinfo=tz).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    end = _first_changed(second, second + (second - first), lambda u: u.astimezone(tz).fold == 0)
    return end.astimezone(tz).replace(tzinfo=None)


def next_every(after: datetime, period: timedelta, start: datetime | None = None) -> datetime:
    """The first `start + n * period` strictly after `after`, as an aware UTC datetime.

    `start` defaults to the Unix epoch; if it is later than `after`, it is the answer.
    Raises `CronError` if `period` is not positive or a datetime is naive.
    """
    if period <= timedelta(0):
        raise CronError(f"the period must be positive, got {period}")
    if after.utcoffset() is None:
        raise CronError("`after` must be an aware datetime (with a timezone)")
    if start is not None and start.utcoffset() is None:
        raise CronError("`start` must be an aware datetime (with a timezone)")
    anchor = _EPOCH if start is None else start.astimezone(UTC)
    if anchor > after:
        return anchor
    return anchor + ((after - anchor) // period + 1) * period


def parse_timezone(name: str) -> ZoneInfo:
    """The IANA timezone `name` (`Europe/Berlin`); `CronError` if there is none by that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # ValueError: path-like keys (`../x`, `/etc/passwd`); OSError: directories (`Europe`).
        raise CronError(f"unknown timezone {name!r}") from exc


def parse_instant(text: str) -> datetime:
    """An ISO 8601 instant with an offset or `Z`, as an aware UTC datetime.

    Raises `CronError` if the text is not ISO 8601 or has no offset.
    """
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise CronError(
            f"invalid instant {text!r}: expected ISO 8601 like 2026-12-24T18:00:00Z"
        ) from exc
    if parsed.utcoffset() is None:
        raise CronError(f"instant {text!r} must include a timezone offset or Z")
    return parsed.astimezone(UTC)


def format_instant(dt: datetime) -> str:
    """ISO 8601 in UTC with `Z`, microseconds only when not zero: `2026-11-23T10:15:00Z`."""
    if dt.utcoffset() is None:
        raise CronError("cannot format a naive datetime as an instant")
    utc = dt.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds" if utc.microsecond else "seconds") + "Z"


def trigger_id(kind: str, expression: str, timezone: str | None) -> str:
    """A trigger's default id: stable across replicas and reorderings (`cron-1a2b3c4d5e6f`)."""
    digest = hashlib.sha256(f"{kind}\0{expression}\0{timezone or ''}".encode()).hexdigest()
    return f"{kind}-{digest[:12]}"
