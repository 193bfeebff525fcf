"""When a timer trigger fires: its scheduled times, and which of them to fire now.

Pure: no database, no broker, no clock. The timer shell reads the last tick of a trigger
from the executions table, calls `due_ticks`, and creates one execution per returned tick
under the key `loom_db.executions.timer_key(graph, trigger id, tick)`. Every function here
is a function of its arguments only, so every replica computes the same ticks (aware UTC
datetimes; whole seconds for cron, and for `every`/`delay` whenever the period and the
anchor are whole seconds) and the unique key makes any number of replicas fire each tick
exactly once (DESIGN §7).

Scheduled times (`Schedule.next_after`):

=========  ==============================================================================
kind       ticks
=========  ==============================================================================
cron       the expression in the trigger's `timezone` (`loom_common.CronExpression`:
           crontab(5) semantics, a skipped local time does not fire, a repeated one
           fires once)
every: D   `start + n*D` for n >= 0 (`start` defaults to the Unix epoch)
at: T      T, once
delay: D   `A + n*D` for n >= 1, where the anchor A is the end of the previous timer
           execution of the trigger rounded up to the whole second (`delay_anchor`).
           Only the first, `A + D`, fires in the normal course (firing it starts a run
           whose end becomes the new anchor); the later multiples exist so that a chain
           whose `A + D` was dropped (`catch_up: none`) restarts on a deterministic tick.
           Without an anchor (the previous run has not ended) there is no tick.
=========  ==============================================================================

**The first run of a `delay` trigger** is at `active_since + D`, where `active_since` is
the instant the trigger became active as recorded in the database (the caller's choice,
e.g. the creation time of the first graph version holding it). Not "D after the timer
process started" and not "at once, now": both depend on a replica's own clock, so two
replicas would compute two different first ticks, hence two keys and two runs. A stored
instant is the same everywhere; and `+ D` rather than `+ 0` keeps the one rule of a delay
trigger -- it never fires sooner than D after the last thing that happened to it.

Which ticks to fire now (`due_ticks`). The *missed* ticks M are the ticks t with
`last_tick < t <= now`. A tick is **on time** when `now - t <= misfire_grace` (the
boundary is on time) and **late** otherwise:

=========  ========================  =====================================================
catch_up   on-time ticks of M        late ticks of M
=========  ========================  =====================================================
none       fire                      dropped
latest     fire                      if the newest tick of M is late (so no tick of M is
                                     on time), it fires alone; older ones are dropped
all        fire                      fire, oldest first
=========  ========================  =====================================================

* The result is ascending and holds at most `limit` ticks, the OLDEST first: when it is
  full, more may be due -- record these (the last tick moves on) and call again. Nothing
  is dropped by the limit; it only bounds the work of one call (an `every: 1s` trigger
  with `catch_up: all` after a day of outage has 86,400 ticks to fire).
* `last_tick=None` means nothing is known: no tick counts as missed, only on-time ticks
  fire (a brand-new trigger has missed nothing). To catch up from an instant -- the
  moment a trigger that never fired became active -- pass that instant as `last_tick`.
* A `delay` trigger fires at most ONE tick per call, the newest of M: its ticks form one
  chain, so `all` means the same as `latest`, and under `none` the newest fires only if
  it is on time. Its anchor bounds M, so `last_tick=None` (never fired) still catches up
  from `active_since + D`.

`lateness` is `now - tick`, for the drift metric; above `DRIFT_WARNING` the shell logs a
warning (drift is a top complaint about other schedulers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from loom_common import (
    CronError,
    CronExpression,
    format_duration,
    format_instant,
    next_every,
    parse_instant,
    parse_timezone,
)
from loom_common.spec import AtTrigger, CatchUp, CronTrigger, DelayTrigger, EveryTrigger

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MISFIRE_GRACE",
    "DRIFT_WARNING",
    "CatchUp",
    "Schedule",
    "TimerKind",
    "TimerSpec",
    "delay_anchor",
    "due_ticks",
    "lateness",
]

TimerKind = Literal["cron", "every", "delay", "at"]
TimerSpec = CronTrigger | EveryTrigger | DelayTrigger | AtTrigger

DEFAULT_MISFIRE_GRACE = timedelta(seconds=60)
"""The spec's default `misfire_grace`."""
DEFAULT_LIMIT = 100
"""The most ticks one `due_ticks` call returns."""
DRIFT_WARNING = timedelta(seconds=1)
"""A tick fired later than this is logged as a warning: ten times the p99 fire delay the
timer is built for (100 ms, DESIGN §10 B6), and about when a user starts to notice."""

_MODELS: dict[str, type[TimerSpec]] = {
    "cron": CronTrigger,
    "every": EveryTrigger,
    "delay": DelayTrigger,
    "at": AtTrigger,
}
# The finest step of a datetime: "strictly after x - _TICK" is "at or after x".
_TICK = timedelta(microseconds=1)


def _aware(name: str, value: datetime) -> datetime:
    if value.utcoffset() is None:
        raise CronError(f"`{name}` must be an aware datetime (with a timezone)")
    return value


def _ceil_second(value: datetime) -> datetime:
    utc = value.astimezone(UTC)
    return utc.replace(microsecond=0) + timedelta(seconds=1) if utc.microsecond else utc


@dataclass(frozen=True, slots=True)
class Schedule:
    """The scheduled times of one timer trigger. Build it with `from_spec`.

    `period` is `every`'s or `delay`'s D; `anchor` is `every`'s `start` (None: the
    epoch), `at`'s instant, or `delay`'s anchor (None: no tick until one is given with
    `anchored`).
    """

    kind: TimerKind
    catch_up: CatchUp = "latest"
    misfire_grace: timedelta = DEFAULT_MISFIRE_GRACE
    cron: CronExpression | None = None
    timezone: ZoneInfo | None = None
    period: timedelta | None = None
    anchor: datetime | None = None

    @classmethod
    def from_spec(
        cls, spec: TimerSpec | Mapping[str, Any], *, delay_anchor: datetime | None = None
    ) -> Schedule:
        """The schedule of a timer trigger: a spec model, or a dict as stored in
        `TriggerRecord.spec` (validated through the spec models, defaults applied).

        `delay_anchor` is used by `delay` triggers only (see `delay_anchor()`).
        Raises `CronError` if the spec is not a timer trigger (`webhook`, no kind, two
        kinds) or is invalid: a field, the cron expression, the timezone, an instant, a
        period that is not positive, a naive `delay_anchor`.
        """
        model = spec if isinstance(spec, TimerSpec) else _validate(spec)
        common: dict[str, Any] = {
            "catch_up": model.catch_up,
            "misfire_grace": model.misfire_grace,
        }
        if isinstance(model, CronTrigger):
            return cls(
                "cron",
                cron=CronExpression.parse(model.cron),
                timezone=parse_timezone(model.timezone),
                **common,
            )
        if isinstance(model, AtTrigger):
            return cls("at", anchor=parse_instant(model.at), **common)
        if isinstance(model, EveryTrigger):
            period = _positive("every", model.every)
            start = None if model.start is None else parse_instant(model.start)
            return cls("every", period=period, anchor=start, **common)
        schedule = cls("delay", period=_positive("delay", model.delay), **common)
        return schedule if delay_anchor is None else schedule.anchored(delay_anchor)

    def anchored(self, anchor: datetime) -> Schedule:
        """This `delay` schedule counting from `anchor` (rounded up to the whole second).

        Raises `CronError` if `anchor` is naive, `ValueError` if this is not a `delay`
        schedule.
        """
        if self.kind != "delay":
            raise ValueError(f"only a delay schedule has an anchor to set, not {self.kind}")
        return replace(self, anchor=_ceil_second(_aware("anchor", anchor)))

    def next_after(self, instant: datetime) -> datetime | None:
        """The first tick strictly after `instant` (aware, any timezone), in UTC; None if
        there is none (`at` passed, a `delay` without an anchor).

        Raises `CronError` if `instant` is naive.
        """
        _aware("instant", instant)
        if self.cron is not None and self.timezone is not None:
            return self.cron.next_after(instant, self.timezone)
        if self.kind == "at":
            assert self.anchor is not None
            return self.anchor if self.anchor > instant else None
        assert self.period is not None
        if self.kind == "every":
            return next_every(instant, self.period, self.anchor)
        if self.anchor is None:
            return None
        return next_every(instant, self.period, self.anchor + self.period)

    def __str__(self) -> str:
        if self.kind == "cron":
            return f"cron {self.cron} {self.timezone}"
        if self.kind == "at":
            assert self.anchor is not None
            return f"at {format_instant(self.anchor)}"
        assert self.period is not None
        text = f"{self.kind} {format_duration(self.period)}"
        if self.anchor is not None:
            text += f" {'from' if self.kind == 'every' else 'after'} {format_instant(self.anchor)}"
        return text


def _validate(spec: Mapping[str, Any]) -> TimerSpec:
    kinds = [kind for kind in _MODELS if kind in spec]
    if len(kinds) != 1:
        found = "webhook" if "webhook" in spec else ", ".join(kinds) or "none"
        raise CronError(f"not a timer trigger: expected one of cron, every, delay, at; got {found}")
    try:
        return _MODELS[kinds[0]].model_validate(dict(spec))
    except ValidationError as exc:
        raise CronError(f"invalid {kinds[0]} trigger: {exc}") from exc


def _positive(name: str, period: timedelta) -> timedelta:
    if period <= timedelta(0):
        raise CronError(f"`{name}` must be longer than 0s, got {format_duration(period)}")
    return period


def delay_anchor(
    *, active_since: datetime, last_tick: datetime | None, last_end: datetime | None
) -> datetime | None:
    """What a `delay` trigger counts its next tick from (for `Schedule.anchored`).

    `last_tick` is the scheduled time of the trigger's newest timer execution (None if it
    never fired) and `last_end` that execution's end (None while it is queued, waiting or
    running). The first run counts from `active_since`, the stored instant the trigger
    became active (see the module docstring for why); a run not yet ended gives None: no
    tick until it ends. Raises `CronError` for a naive datetime.
    """
    if last_tick is None:
        return _aware("active_since", active_since)
    return None if last_end is None else _aware("last_end", last_end)


def lateness(tick: datetime, now: datetime) -> timedelta:
    """How late firing `tick` at `now` is (`now - tick`; negative if early): the drift
    metric. Compare with `DRIFT_WARNING`. Raises `CronError` for a naive datetime."""
    return _aware("now", now) - _aware("tick", tick)


def due_ticks(
    schedule: Schedule,
    last_tick: datetime | None,
    now: datetime,
    *,
    catch_up: CatchUp | None = None,
    misfire_grace: timedelta | None = None,
    limit: int = DEFAULT_LIMIT,
) -> list[datetime]:
    """The ticks to fire at `now`, ascending, by the rules of the module docstring.

    `last_tick` is the newest tick already fired (read from the executions table), or
    the instant to count missed ticks from, or None (nothing counts as missed).
    `catch_up` and `misfire_grace` default to the schedule's own (its spec's).
    Raises `CronError` for a naive datetime, `ValueError` for an unknown `catch_up`, a
    negative `misfire_grace` or a `limit` below 1.
    """
    policy = schedule.catch_up if catch_up is None else catch_up
    grace = schedule.misfire_grace if misfire_grace is None else misfire_grace
    if policy not in get_args(CatchUp):
        raise ValueError(f"catch_up must be one of none, latest, all, got {policy!r}")
    if grace < timedelta(0):
        raise ValueError(f"misfire_grace cannot be negative, got {grace}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    _aware("now", now)
    if last_tick is not None:
        _aware("last_tick", last_tick)
    on_time_from = now - grace

    if schedule.kind == "delay":
        lower = last_tick if last_tick is not None else schedule.anchor
        newest = None if lower is None else _newest(schedule, lower, now)
        if newest is None or (policy == "none" and newest < on_time_from):
            return []
        return [newest]

    if last_tick is not None and policy == "all":
        return _walk(schedule, last_tick, now, limit)
    after = on_time_from - _TICK  # "strictly after" that = "at or after on_time_from"
    if last_tick is not None:
        if policy == "latest":
            newest = _newest(schedule, last_tick, now)
            if newest is not None and newest < on_time_from:
                return [newest]
        after = max(after, last_tick)
    return _walk(schedule, after, now, limit)


def _walk(schedule: Schedule, after: datetime, now: datetime, limit: int) -> list[datetime]:
    """The ticks in (after, now], oldest first, at most `limit`."""
    ticks: list[datetime] = []
    tick = schedule.next_after(after)
    while tick is not None and tick <= now and len(ticks) < limit:
        ticks.append(tick)
        tick = schedule.next_after(tick)
    return ticks


def _newest(schedule: Schedule, after: datetime, now: datetime) -> datetime | None:
    """The newest tick in (after, now], or None.

    A bisection on `next_after` (which only looks forward): about 35 calls for an outage
    of hours, 55 for decades, however many ticks it holds -- walking a day of an
    every-second cron would take 86,400.
    """
    first = schedule.next_after(after)
    if first is None or first > now:
        return None
    # Invariant: next_after(low) <= now < next_after(high) (or None).
    low, high = after, now
    while high - low > _TICK:
        middle = low + (high - low) // 2
        tick = schedule.next_after(middle)
        if tick is not None and tick <= now:
            low = middle
        else:
            high = middle
    return schedule.next_after(low)
