"""The worker service's settings: `LoomSettings` (DESIGN §13: `LOOM_WORKER_SLOTS`,
`LOOM_LEASE_SECONDS`, `LOOM_SHUTDOWN_GRACE`, ...) plus its own `worker_*` fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from loom_common import LoomSettings, load_service_settings

__all__ = ["WorkerSettings", "load_worker_settings"]


class WorkerSettings(LoomSettings):
    """`LOOM_WORKER_*`: the health port and the worker's name."""

    worker_host: str = "127.0.0.1"
    worker_port: int = Field(default=8084, ge=0, le=65535)
    """`/healthz`, `/readyz`, `/metrics`."""
    worker_id: str | None = Field(default=None, max_length=100)
    """The name leases are taken under; unset: host name, process id and a random part."""
    worker_prefetch: int = Field(default=10, ge=1)
    """Work-queue messages handed to this worker before it acks them (claims are fast:
    a message is acked as soon as its execution is claimed)."""


def load_worker_settings(config_file: Path | None = None, **overrides: Any) -> WorkerSettings:
    """`load_settings` for this service. Raises `SettingsError` naming each bad value."""
    return load_service_settings(WorkerSettings, config_file, **overrides)
