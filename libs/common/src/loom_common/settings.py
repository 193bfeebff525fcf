"""Loom's configuration: one `LoomSettings` object, built once per process by `load_settings`.

Precedence, lowest first: field defaults < the file `loom.toml` < `LOOM_*` environment
variables < command-line flags (passed to `load_settings` as keyword overrides).

This is the only module of Loom that reads the environment (STYLE rule 7): everything else
receives a `LoomSettings`, or the few values it needs, as arguments.

The file is found in this order: the `config_file` argument, the `LOOM_CONFIG` environment
variable, `./loom.toml` when it exists. Its keys are the field names without the prefix, at
the top level (`worker_slots = 4`); relative paths in it are relative to the working
directory, as they are in flags and variables. An unknown key or a bad value anywhere is a
`SettingsError` whose message names the setting and where its value came from, e.g.
``loom.toml: worker_slots: Input should be greater than or equal to 1`` — a typo in a
config file must stop the process, not be ignored.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from loom_common.errors import SettingsError

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_FILE",
    "SERVICE_SETTING_PREFIXES",
    "LoomSettings",
    "load_service_settings",
    "load_settings",
]

ENV_PREFIX = "LOOM_"
CONFIG_ENV_VAR = "LOOM_CONFIG"
DEFAULT_CONFIG_FILE = Path("loom.toml")

# The files the TOML source reads. `None` means "not inside load_settings": a bare
# `LoomSettings()` then finds the file the same way load_settings does. A context variable
# (not a class attribute) because pydantic-settings builds sources in a classmethod, and
# two threads or tasks may load different files at once.
_CONFIG_FILES: ContextVar[tuple[Path, ...] | None] = ContextVar("loom_config_files", default=None)

_LOG_LEVELS = frozenset(logging.getLevelNamesMapping())
_LEVEL_ORDER = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


SERVICE_SETTING_PREFIXES = ("rest_", "webhook_", "timer_", "websocket_", "worker_")
"""A service's own settings (a `LoomSettings` subclass in its `settings.py`) start with its
prefix. One `loom.toml` serves every service, so a key with another service's prefix is
left to that service instead of being an unknown key here (a typo in a key of the service's
own prefix is still an error)."""

_S = TypeVar("_S", bound="LoomSettings")


class _TomlSource(TomlConfigSettingsSource):
    """`loom.toml`, less the keys that belong to another service's settings."""

    def __call__(self) -> dict[str, Any]:
        known = self.settings_cls.model_fields
        shared = LoomSettings.model_fields  # `worker_slots` is everyone's (DESIGN §13)
        own = {
            p
            for p in SERVICE_SETTING_PREFIXES
            if any(name.startswith(p) and name not in shared for name in known)
        }
        others = tuple(set(SERVICE_SETTING_PREFIXES) - own)
        return {
            key: value
            for key, value in super().__call__().items()
            if key in known or not key.startswith(others)
        }


def _cpu_count() -> int:
    return os.cpu_count() or 1


class LoomSettings(BaseSettings):
    """What every Loom process reads at start-up (DESIGN §13). Immutable once built."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./.loom/loom.db"
    database_pool_size: int = Field(default=10, ge=1)
    """PostgreSQL connections kept open per process (SQLite has one writer anyway)."""
    database_max_overflow: int = Field(default=10, ge=0)
    """Extra PostgreSQL connections a busy process may open beyond the pool."""
    queue_url: str = "memory://"
    events_url: str = "memory://"
    secret_key: SecretStr | None = None
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    broker_prefix: str = Field(default="loom", min_length=1)
    worker_slots: int = Field(default_factory=_cpu_count, ge=1)
    retention_days: int = Field(default=30, ge=1)
    max_log_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    lease_seconds: int = Field(default=30, ge=1)
    shutdown_grace: float = Field(default=25.0, ge=0)
    data_dir: Path = Path(".loom")
    admin_password: SecretStr | None = None
    """The first admin's password on an empty database (else one is generated and logged
    once)."""

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}; use one of {', '.join(_LEVEL_ORDER)}")
        return level

    @field_validator("secret_key", "admin_password")
    @classmethod
    def _non_empty_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty LOOM_SECRET_KEY is most likely a Secret that failed to mount: signing
        # tokens with "" would be worse than refusing to start.
        if value is not None and not value.get_secret_value():
            raise ValueError("must not be empty; leave it unset to have one generated")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First source wins: flags (init kwargs) > environment > loom.toml > defaults.
        # No .env files and no secrets directory: one file format, one place to look.
        files = _CONFIG_FILES.get()
        if files is None:
            found = _find_config_file(None)
            files = (found,) if found is not None else ()
        return init_settings, env_settings, _TomlSource(settings_cls, toml_file=files)


def load_settings(config_file: Path | None = None, **overrides: Any) -> LoomSettings:
    """Build the settings of this process.

    `overrides` are the command-line flags, keyed by field name; a `None` value means
    "flag not given" and is dropped, so it cannot hide the environment or the file.

    Raises:
        SettingsError: the file is missing (when named explicitly) or not valid TOML, or a
            value from any source is invalid, or a key is unknown. Every problem is listed,
            one per line, as ``<source>: <setting>: <message>``.
    """
    return load_service_settings(LoomSettings, config_file, **overrides)


def load_service_settings(
    settings_class: type[_S], config_file: Path | None = None, **overrides: Any
) -> _S:
    """`load_settings` for a service's `LoomSettings` subclass (its `settings.py`); raises
    the same way."""
    path = _find_config_file(config_file)
    file_values = _read_toml(path) if path is not None else {}
    flags = {name: value for name, value in overrides.items() if value is not None}
    token = _CONFIG_FILES.set((path,) if path is not None else ())
    try:
        return settings_class(**flags)
    except ValidationError as exc:
        problems = (_describe(error, flags, file_values, path) for error in exc.errors())
        raise SettingsError("\n".join(problems)) from None
    except PydanticSettingsError as exc:  # an environment value that cannot be parsed
        raise SettingsError(f"environment: {exc}") from exc
    finally:
        _CONFIG_FILES.reset(token)


def _find_config_file(explicit: Path | None) -> Path | None:
    """The file to read, or None. A file named on purpose must exist; the default may not."""
    if explicit is not None:
        named, origin = explicit, "config file"
    elif env_value := os.environ.get(CONFIG_ENV_VAR):
        named, origin = Path(env_value), CONFIG_ENV_VAR
    else:
        return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None
    if not named.is_file():
        raise SettingsError(f"{origin}: {named}: no such file")
    return named


def _read_toml(path: Path) -> dict[str, Any]:
    """Parsed here as well as by the TOML source: a syntax error then names the file, and
    `_describe` knows which keys the file set."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None


def _describe(
    error: Mapping[str, Any],
    flags: Mapping[str, Any],
    file_values: Mapping[str, Any],
    path: Path | None,
) -> str:
    """One line for one validation error, naming the source that supplied the bad value.

    Sources are checked in precedence order, so the one named is the one whose value won.
    """
    loc = error.get("loc") or ("",)
    name = str(loc[0])
    detail = ".".join(str(part) for part in loc[1:])
    # Our validators raise ValueError; pydantic prefixes their text with "Value error, ".
    message = str(error["msg"]).removeprefix("Value error, ")
    setting = f"{name}.{detail}" if detail else name
    if name in flags:
        return f"command line: {setting}: {message}"
    env_name = _env_var_set_for(name)
    if env_name is not None:
        return f"environment: {env_name}: {message}"
    if path is not None and name in file_values:
        return f"{path}: {setting}: {message}"
    return f"{setting}: {message}"


def _env_var_set_for(name: str) -> str | None:
    """The `LOOM_*` variable (any case, as pydantic-settings matches it) that sets `name`."""
    wanted = f"{ENV_PREFIX}{name}".lower()
    return next((key for key in os.environ if key.lower() == wanted), None)
