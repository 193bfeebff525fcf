"""`loom up`'s settings: it fills in only what nothing else set (its data directory's
secret key and SQLite database, the WebSocket URL the API announces); loom.toml and
LOOM_* values win over those, and flags over everything."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from loom_cli.up import load_up_settings


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LOOM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_a_fresh_directory_gets_a_private_key_and_its_own_database(tmp_path: Path) -> None:
    data = tmp_path / ".loom"
    data.mkdir()
    # As `loom up` passes them: the flags not given are None.
    flags = {"database_url": None, "queue_url": None, "events_url": None}
    settings = load_up_settings(data, "127.0.0.1", 8080, 9001, **flags)
    key = data / "secret_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert settings.secret_key is not None
    assert settings.secret_key.get_secret_value() == key.read_text().strip()
    assert settings.database_url == f"sqlite+aiosqlite:///{data.resolve() / 'loom.db'}"
    assert settings.rest_public_ws_url == "ws://127.0.0.1:9001"
    assert (settings.rest_port, settings.webhook_port, settings.websocket_port) == (
        8080,
        8080,
        9001,
    )
    again = load_up_settings(data, "127.0.0.1", 8080, 9001)
    assert again.secret_key == settings.secret_key  # the same key on the next start


def test_loom_toml_and_the_environment_win_over_what_loom_up_fills_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / ".loom"
    data.mkdir()
    (tmp_path / "loom.toml").write_text(
        'database_url = "postgresql+psycopg://db.internal/loom"\n'
        'rest_public_ws_url = "wss://loom.example.com"\n'
    )
    monkeypatch.setenv("LOOM_SECRET_KEY", "k" * 40)
    settings = load_up_settings(data, "0.0.0.0", 8080, 8081)
    assert settings.database_url == "postgresql+psycopg://db.internal/loom"
    assert settings.rest_public_ws_url == "wss://loom.example.com"
    assert settings.secret_key is not None and settings.secret_key.get_secret_value() == "k" * 40
    assert not (data / "secret_key").exists()
    flagged = load_up_settings(data, "0.0.0.0", 8080, 8081, database_url="sqlite+aiosqlite:///x.db")
    assert flagged.database_url == "sqlite+aiosqlite:///x.db"
