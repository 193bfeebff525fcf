"""The timer's settings: `LOOM_TIMER_*` from the environment, bad values named."""

from __future__ import annotations

import pytest

from loom_common import SettingsError
from loom_timer import load_timer_settings


def test_timer_settings_come_from_loom_timer_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.chdir(tmp_path)  # no loom.toml of the developer's
    monkeypatch.setenv("LOOM_TIMER_PORT", "9183")
    monkeypatch.setenv("LOOM_TIMER_RESYNC_SECONDS", "5")
    settings = load_timer_settings()
    assert (settings.timer_port, settings.timer_resync_seconds) == (9183, 5.0)
    assert (settings.timer_reap_seconds, settings.timer_queued_after_seconds) == (10.0, 300.0)


def test_a_bad_timer_setting_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOM_TIMER_REAP_SECONDS", "0")
    with pytest.raises(SettingsError, match="LOOM_TIMER_REAP_SECONDS"):
        load_timer_settings()
