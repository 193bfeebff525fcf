"""Where `loom login` keeps its credentials: `credentials.json` in the user's config
directory (`$LOOM_CONFIG_DIR`, else `$XDG_CONFIG_HOME/loom`, else `~/.config/loom`).

The file holds tokens, so it is created with mode 0600 from the start (never readable by
others, not even for a moment) and replaced atomically, so a crash mid-write leaves the
old file whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "Credentials",
    "config_dir",
    "credentials_lock",
    "credentials_path",
    "load_credentials",
    "save_credentials",
]

FILE_NAME = "credentials.json"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What `loom login` stored."""

    server: str
    ws_url: str | None
    access_token: str
    refresh_token: str | None
    username: str | None


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The directory of Loom's user configuration."""
    env = os.environ if environ is None else environ
    if env.get("LOOM_CONFIG_DIR"):
        return Path(env["LOOM_CONFIG_DIR"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "loom"


def credentials_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / FILE_NAME


def load_credentials(path: Path | None = None) -> Credentials | None:
    """The stored credentials; None when there are none (never logged in, or a file that
    does not hold what `loom login` writes)."""
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    server, token = data.get("server"), data.get("access_token")
    if not isinstance(server, str) or not isinstance(token, str):
        return None
    return Credentials(
        server=server,
        ws_url=_text(data.get("ws_url")),
        access_token=token,
        refresh_token=_text(data.get("refresh_token")),
        username=_text(data.get("username")),
    )


def save_credentials(credentials: Credentials, path: Path | None = None) -> Path:
    """Write `credentials` (mode 0600, atomically); returns the file's path. Raises
    `OSError` when the directory cannot be created or written."""
    path = path or credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = json.dumps(asdict(credentials), indent=2) + "\n"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL with mode 0600: the file is born private, whatever the umask allows.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return path


@contextmanager
def credentials_lock(path: Path | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the credentials (a `.lock` file beside them) for a
    refresh: two `loom` commands refreshing at once would present the same refresh token,
    and the server would take the second for a stolen one and end the session. Raises
    `OSError` when the lock file cannot be made."""
    path = path or credentials_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
