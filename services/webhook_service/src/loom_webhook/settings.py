"""The webhook service's settings: `LoomSettings` (DESIGN §13) plus its own `webhook_*`
fields, read once at start by `load_webhook_settings` (defaults < `loom.toml` <
`LOOM_*` environment < flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from loom_common import LoomSettings, load_service_settings

__all__ = ["WebhookSettings", "load_webhook_settings"]

MIB = 1024 * 1024


class WebhookSettings(LoomSettings):
    """`LOOM_WEBHOOK_*`: where the service listens and what it accepts."""

    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(default=8082, ge=0, le=65535)
    webhook_max_bytes: int = Field(default=1 * MIB, ge=1024)
    """The largest delivery body; a larger one gets 413 and is never read whole."""
    webhook_rate_limit: float = Field(default=50.0, ge=0)
    """Deliveries per second each hook accepts on average (0: no limit); past it, 429."""
    webhook_rate_burst: int = Field(default=200, ge=1)
    """Deliveries a hook may receive at once above its rate (a provider's retry storm)."""
    webhook_cache_seconds: float = Field(default=5.0, ge=0)
    """How long a hook and its secret are kept in memory between reads (0: read them for
    every delivery). A paused graph, a new graph version and a new secret take effect at
    once anyway (checked when the execution is stored, and a signature that fails with a
    kept secret is checked again with the stored one); only a replaced secret's OLD
    value keeps working up to this long."""


def load_webhook_settings(config_file: Path | None = None, **overrides: Any) -> WebhookSettings:
    """`load_settings` for this service. Raises `SettingsError` naming each bad value."""
    return load_service_settings(WebhookSettings, config_file, **overrides)
