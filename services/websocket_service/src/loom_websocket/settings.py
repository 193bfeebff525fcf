"""The websocket service's settings: `LoomSettings` (DESIGN §13) plus its own
`websocket_*` fields, read once at start by `load_websocket_settings`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from loom_common import LoomSettings, load_service_settings

__all__ = ["WebsocketSettings", "load_websocket_settings"]

MIB = 1024 * 1024


class WebsocketSettings(LoomSettings):
    """`LOOM_WEBSOCKET_*`: where the service listens and how it treats followers."""

    websocket_host: str = "127.0.0.1"
    websocket_port: int = Field(default=8081, ge=0, le=65535)
    """WebSockets on `/ws/...`, and `/healthz`, `/readyz`, `/metrics` on the same port."""
    websocket_high_water: int = Field(default=4 * MIB, ge=64 * 1024)
    """Unsent bytes a follower may have queued; past it, it leaves the broadcast group
    until its connection drains (so one slow reader never holds the others back)."""
    websocket_slow_seconds: float = Field(default=5.0, gt=0)
    """How long a follower's connection may take nothing (full past the high-water mark,
    or not taking a frame) before it is closed with 4008; it resumes with `after`."""
    websocket_ping_interval: float = Field(default=20.0, gt=0)
    """Seconds between keepalive pings; a peer that does not answer within the same
    time again is dropped."""
    websocket_max_connections: int = Field(default=10_000, ge=1)
    """Connections this process accepts at once; more are refused with 503."""


def load_websocket_settings(config_file: Path | None = None, **overrides: Any) -> WebsocketSettings:
    """`load_settings` for this service. Raises `SettingsError` naming each bad value."""
    return load_service_settings(WebsocketSettings, config_file, **overrides)
