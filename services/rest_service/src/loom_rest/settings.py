"""The REST service's settings: `LoomSettings` (DESIGN §13) plus its own `rest_*` fields.

Read once at start by `load_rest_settings` (defaults < `loom.toml` < `LOOM_*` environment <
flags), as every Loom setting is; nothing else in this package reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from loom_common import LoomSettings, load_service_settings

__all__ = ["RestSettings", "load_rest_settings"]

MIB = 1024 * 1024


class RestSettings(LoomSettings):
    """`LOOM_REST_*`: where the API listens and what it accepts."""

    rest_host: str = "127.0.0.1"
    rest_port: int = Field(default=8080, ge=0, le=65535)
    rest_cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed to call the API from a browser (`["*"]` for any); none by default."""
    rest_max_body_bytes: int = Field(default=1 * MIB, ge=1024)
    """The largest JSON request body; larger ones get 413 before they are read whole."""
    rest_max_graph_bytes: int = Field(default=10 * MIB, ge=1024)
    """The largest graph document (YAML, JSON or a multipart upload)."""
    rest_access_token_seconds: int = Field(default=15 * 60, ge=30, le=24 * 3600)
    rest_public_ws_url: str | None = None
    """The WebSocket service as clients reach it (`GET /api/v1/` shows it). Unset: port
    8081 on the host the client used."""
    rest_trusted_proxy_hops: int = Field(default=0, ge=0, le=10)
    """Proxies in front of the service (an ingress: 1) whose `X-Forwarded-For` names the
    client; 0 uses the connection's address. The login limit per client address needs it
    behind a proxy, or every client would share the proxy's address."""
    rest_login_attempts: int = Field(default=5, ge=1)
    """Failed logins per username within a minute before 429 (four times as many per
    client address)."""


def load_rest_settings(config_file: Path | None = None, **overrides: Any) -> RestSettings:
    """`load_settings` for this service. Raises `SettingsError` naming each bad value."""
    return load_service_settings(RestSettings, config_file, **overrides)
