"""Configuration precedence and errors: defaults < loom.toml < LOOM_* < command-line flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from loom_common.errors import SettingsError
from loom_common.settings import LoomSettings, load_service_settings, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No LOOM_* variable of the developer's shell, and no ./loom.toml, leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("LOOM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_apply_without_file_environment_or_flags() -> None:
    settings = load_settings()

    assert settings.database_url == "sqlite+aiosqlite:///./.loom/loom.db"
    assert settings.queue_url == "memory://"
    assert settings.events_url == "memory://"
    assert settings.secret_key is None
    assert settings.log_format == "console"
    assert settings.log_level == "INFO"
    assert settings.broker_prefix == "loom"
    assert settings.worker_slots == (os.cpu_count() or 1)
    assert settings.retention_days == 30
    assert settings.max_log_bytes == 100 * 1024 * 1024
    assert settings.lease_seconds == 30
    assert settings.shutdown_grace == 25.0
    assert settings.data_dir == Path(".loom")


def test_loom_toml_in_working_directory_overrides_defaults(tmp_path: Path) -> None:
    write_toml(tmp_path / "loom.toml", 'worker_slots = 4\nqueue_url = "amqp://mq/"\n')

    settings = load_settings()

    assert settings.worker_slots == 4
    assert settings.queue_url == "amqp://mq/"
    assert settings.events_url == "memory://"


def test_environment_overrides_loom_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(tmp_path / "loom.toml", 'worker_slots = 4\nlog_format = "json"\n')
    monkeypatch.setenv("LOOM_WORKER_SLOTS", "6")

    settings = load_settings()

    assert settings.worker_slots == 6
    assert settings.log_format == "json"  # still from the file


def test_flags_override_environment_and_unset_flags_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(tmp_path / "loom.toml", "worker_slots = 4\nretention_days = 7\n")
    monkeypatch.setenv("LOOM_WORKER_SLOTS", "6")
    monkeypatch.setenv("LOOM_LOG_FORMAT", "json")

    settings = load_settings(worker_slots=8, log_format=None, retention_days=None)

    assert settings.worker_slots == 8
    assert settings.log_format == "json"
    assert settings.retention_days == 7


def test_loom_config_variable_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(tmp_path / "loom.toml", "worker_slots = 4\n")
    elsewhere = write_toml(tmp_path / "prod.toml", "worker_slots = 12\n")
    monkeypatch.setenv("LOOM_CONFIG", str(elsewhere))

    assert load_settings().worker_slots == 12


def test_config_file_argument_beats_loom_config_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_CONFIG", str(write_toml(tmp_path / "env.toml", "worker_slots = 3\n")))
    chosen = write_toml(tmp_path / "chosen.toml", "worker_slots = 5\n")

    assert load_settings(config_file=chosen).worker_slots == 5


def test_bare_constructor_follows_the_same_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(tmp_path / "loom.toml", 'worker_slots = 4\nbroker_prefix = "file"\n')
    monkeypatch.setenv("LOOM_BROKER_PREFIX", "env")

    settings = LoomSettings(worker_slots=2)

    assert (settings.worker_slots, settings.broker_prefix) == (2, "env")


def test_unknown_key_in_loom_toml_is_an_error(tmp_path: Path) -> None:
    write_toml(tmp_path / "loom.toml", "retention_day = 4\n")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert str(caught.value) == "loom.toml: retention_day: Extra inputs are not permitted"


class _ServiceSettings(LoomSettings):
    rest_port: int = 8080


def test_one_loom_toml_serves_every_service(tmp_path: Path) -> None:
    """A service's own keys (its prefix) are left to it; a typo in one is still an error
    for that service, and an unprefixed typo for everyone."""
    write_toml(tmp_path / "loom.toml", "worker_slots = 3\nrest_port = 9000\n")

    assert load_settings().worker_slots == 3
    assert load_service_settings(_ServiceSettings).rest_port == 9000

    write_toml(tmp_path / "loom.toml", "rest_prot = 9000\n")
    with pytest.raises(SettingsError, match="rest_prot: Extra inputs are not permitted"):
        load_service_settings(_ServiceSettings)


def test_bad_value_in_loom_toml_names_file_and_setting(tmp_path: Path) -> None:
    write_toml(tmp_path / "loom.toml", "worker_slots = 0\n")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert str(caught.value) == (
        "loom.toml: worker_slots: Input should be greater than or equal to 1"
    )


def test_bad_value_in_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_LOG_FORMAT", "xml")

    with pytest.raises(SettingsError, match="^environment: LOOM_LOG_FORMAT: Input should be"):
        load_settings()


def test_bad_flag_names_the_command_line(tmp_path: Path) -> None:
    write_toml(tmp_path / "loom.toml", "worker_slots = 2\n")

    with pytest.raises(SettingsError, match="^command line: worker_slots: Input should be"):
        load_settings(worker_slots=-1)


def test_every_problem_is_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(tmp_path / "loom.toml", "lease_seconds = 0\ncolour = true\n")
    monkeypatch.setenv("LOOM_RETENTION_DAYS", "many")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    lines = str(caught.value).splitlines()
    assert "loom.toml: lease_seconds: Input should be greater than or equal to 1" in lines
    assert "loom.toml: colour: Extra inputs are not permitted" in lines
    assert any(line.startswith("environment: LOOM_RETENTION_DAYS: ") for line in lines)


def test_named_config_file_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(config_file=tmp_path / "missing.toml")

    monkeypatch.setenv("LOOM_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(SettingsError, match="^LOOM_CONFIG: .*gone.toml: no such file"):
        load_settings()


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    write_toml(tmp_path / "loom.toml", "worker_slots = = 4\n")

    with pytest.raises(SettingsError, match="^loom.toml: invalid TOML"):
        load_settings()


def test_log_level_is_case_insensitive_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"

    monkeypatch.setenv("LOOM_LOG_LEVEL", "chatty")
    with pytest.raises(
        SettingsError,
        match="^environment: LOOM_LOG_LEVEL: unknown log level 'chatty'; use one of DEBUG, ",
    ):
        load_settings()


def test_secret_key_is_hidden_and_never_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_SECRET_KEY", "s3cret-value")
    settings = load_settings()

    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(settings)

    monkeypatch.setenv("LOOM_SECRET_KEY", "")
    with pytest.raises(SettingsError, match="^environment: LOOM_SECRET_KEY: must not be empty"):
        load_settings()


def test_settings_are_immutable() -> None:
    settings = load_settings()

    with pytest.raises(ValidationError, match="frozen"):
        settings.worker_slots = 1
