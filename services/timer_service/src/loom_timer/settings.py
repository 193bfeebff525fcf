"""The timer service's settings: `LoomSettings` (DESIGN §13) plus its own `timer_*`
fields (ADR 0006), read once at start by `load_timer_settings` (defaults < `loom.toml` <
`LOOM_*` environment < flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from loom_common import LoomSettings, load_service_settings

__all__ = ["TimerSettings", "load_timer_settings"]


class TimerSettings(LoomSettings):
    """`LOOM_TIMER_*`: where the health port listens and how often the background work
    runs. Every replica does all of it; the database makes doing it twice harmless."""

    timer_host: str = "127.0.0.1"
    timer_port: int = Field(default=8083, ge=0, le=65535)
    """`/healthz`, `/readyz` and `/metrics` (the timer serves nothing else)."""
    timer_resync_seconds: float = Field(default=30.0, gt=0)
    """How often the jobs are compared with the trigger index even without a
    `graph.changed` message (control messages are hints and may be missed)."""
    timer_change_debounce_seconds: float = Field(default=0.2, ge=0)
    """After a `graph.changed`, how long to wait for more before reading the triggers
    (an `apply` of fifty graphs then costs one read, not fifty)."""
    timer_delay_poll_seconds: float = Field(default=2.0, gt=0)
    """How often `delay` triggers whose previous run has not ended look for its end: a
    `delay: D` trigger fires at D after that end, or this much later when D is shorter."""
    timer_reap_seconds: float = Field(default=10.0, gt=0)
    """How often the lease reaper runs."""
    timer_queued_after_seconds: float = Field(default=300.0, gt=0)
    """A `queued` execution nobody claimed for this long is requested again."""
    timer_retention_seconds: float = Field(default=3600.0, gt=0)
    """How often retention (`LOOM_RETENTION_DAYS`) runs."""


def load_timer_settings(config_file: Path | None = None, **overrides: Any) -> TimerSettings:
    """`load_settings` for this service. Raises `SettingsError` naming each bad value."""
    return load_service_settings(TimerSettings, config_file, **overrides)
