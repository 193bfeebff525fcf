"""`run_service`, the body of every `python -m loom_<service>`: its command line comes
before any setting is read, so `--help` works on a machine with no configuration."""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import Field

from loom_common import LoomSettings, SettingsError
from loom_runtime import run_service
from loom_runtime import serve as serve_module


class DemoSettings(LoomSettings):
    """`LOOM_TIMER_*` for a made-up service (a known service prefix, so the shared
    loom.toml rules apply to it as to a real one)."""

    timer_host: str = "127.0.0.1"
    timer_port: int = Field(default=8099, ge=0, le=65535)
    """Where the demo listens."""
    timer_secret_word: str | None = None


def refuse(config: Path | None) -> DemoSettings:
    raise SettingsError("LOOM_SECRET_KEY is not set")


async def never_run(settings: DemoSettings) -> None:
    raise AssertionError("the service must not start")


def run(
    argv: list[str] | None,
    load: Callable[[Path | None], DemoSettings] = refuse,
    service: Callable[[DemoSettings], Coroutine[Any, Any, None]] = never_run,
) -> None:
    run_service("loom-demo", load, service, settings_class=DemoSettings, argv=argv)


def test_help_lists_the_services_settings_without_reading_any(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m loom_demo" in out
    assert "LOOM_* environment variables" in out and "loom.toml" in out
    own, shared = out.split("settings of every Loom service:")
    assert "LOOM_TIMER_PORT  int, default 8099\n      Where the demo listens." in own
    assert "LOOM_TIMER_SECRET_WORD  str, unset by default" in own
    assert "LOOM_DATABASE_URL" not in own
    assert "LOOM_DATABASE_URL" in shared and "LOOM_SECRET_KEY  secret" in shared
    assert "LOOM_LOG_FORMAT  one of console, json, default console" in shared


def test_unknown_argument_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(["--port", "80"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --port 80" in capsys.readouterr().err


def test_a_settings_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run([])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "loom-demo: LOOM_SECRET_KEY is not set\n"


def test_config_file_is_handed_to_the_loader_and_the_service_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logging_configured: list[tuple[str, str]] = []
    monkeypatch.setattr(
        serve_module, "configure_logging", lambda *args: logging_configured.append(args)
    )
    loaded: list[Path | None] = []
    ran: list[DemoSettings] = []

    def load(config: Path | None) -> DemoSettings:
        loaded.append(config)
        return DemoSettings(log_format="json")

    async def service(settings: DemoSettings) -> None:
        ran.append(settings)

    run(["--config", "elsewhere.toml"], load=load, service=service)
    assert loaded == [Path("elsewhere.toml")]
    assert len(ran) == 1 and ran[0].timer_port == 8099
    assert logging_configured == [("json", "INFO")]


def test_another_programs_arguments_are_not_the_services(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loom serve timer --x` runs the same main(): its command line is the CLI's, so the
    service reads none of it (only `python -m loom_<service>` hands its arguments on)."""
    monkeypatch.setattr(sys, "argv", ["loom", "serve", "demo", "--verbose"])
    with pytest.raises(SystemExit) as exited:
        run(None)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "loom-demo: LOOM_SECRET_KEY is not set\n"


def test_python_m_hands_its_arguments_to_the_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main = SimpleNamespace(__spec__=SimpleNamespace(name="loom_demo.__main__"))
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/site-packages/loom_demo/__main__.py", "--verbose"])
    with pytest.raises(SystemExit) as exited:
        run(None)
    assert exited.value.code == 2
    assert "unrecognized arguments: --verbose" in capsys.readouterr().err
