"""Dependencies flow one way (DESIGN §2, STYLE rule 2), checked here rather than hoped for.

* `loom_common` imports no other Loom package;
* the other libs (`loom_db`, `loom_messaging`, `loom_auth`, ...) import only `loom_common`;
* except `loom_runtime` (ADR 0007), which may import every lib but no service, and which
  no other lib imports;
* a service imports libs, never another service;
* only `loom_cli` may import services.

And every workspace package a member imports is declared in that member's
`[project] dependencies`, or the member's image (`uv sync --package loom-<x>`) would not
have it installed.

Members come from the root pyproject's `[tool.uv.workspace]`, and the kind of a member
from where it lives (`libs/`, `services/`, `cli`), so a new member is checked without
editing this file. Every `import` statement counts, wherever it is in a module (inside a
function, under `if TYPE_CHECKING:`): a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Packages named in DESIGN §2, so a rule still holds before the member exists.
KNOWN_LIBS = frozenset({"loom_common", "loom_db", "loom_messaging", "loom_auth", "loom_runtime"})
RUNTIME = "loom_runtime"  # the lib that assembles the others for services (ADR 0007)
KNOWN_SERVICES = frozenset(
    {"loom_webhook", "loom_timer", "loom_rest", "loom_worker", "loom_websocket"}
)
CLI = "loom_cli"


@dataclass(frozen=True)
class Member:
    path: Path  # relative to the workspace root
    distribution: str
    package: str
    kind: str  # "lib", "service" or "cli"
    dependencies: frozenset[str]  # normalised distribution names


@dataclass(frozen=True)
class Violation:
    file: Path
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message} [rule: {self.rule}]"


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return normalise(match.group(1)) if match else ""


def member_kind(path: Path) -> str | None:
    if path.parts[0] == "libs":
        return "lib"
    if path.parts[0] == "services":
        return "service"
    return "cli" if path == Path("cli") else None


def discover_members(root: Path) -> tuple[list[Member], list[Violation]]:
    workspace = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]
    excluded = {p for pattern in workspace.get("exclude", []) for p in root.glob(pattern)}
    members: list[Member] = []
    problems: list[Violation] = []
    for pattern in workspace["members"]:
        for directory in sorted(root.glob(pattern)):
            pyproject = directory / "pyproject.toml"
            if directory in excluded or not pyproject.is_file():
                continue
            relative = directory.relative_to(root)
            project = tomllib.loads(pyproject.read_text())["project"]
            src = directory / "src"
            packages = sorted(
                p.name for p in src.glob("*") if p.is_dir() and (p / "__init__.py").is_file()
            )
            kind = member_kind(relative)
            if len(packages) != 1 or kind is None:
                problems.append(
                    Violation(
                        relative / "pyproject.toml",
                        0,
                        "member shape (STYLE rule 1)",
                        "a member is libs/<x>, services/<x> or cli, with exactly one package "
                        f"under src/; found {packages or 'none'}",
                    )
                )
                continue
            members.append(
                Member(
                    path=relative,
                    distribution=normalise(project["name"]),
                    package=packages[0],
                    kind=kind,
                    dependencies=frozenset(
                        requirement_name(r) for r in project.get("dependencies", [])
                    ),
                )
            )
    return members, problems


def loom_imports(source: str, filename: str) -> Iterator[tuple[str, int]]:
    """(top-level `loom_*` package, line) for every absolute import anywhere in `source`."""
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top.startswith("loom_"):
                yield top, node.lineno


def broken_rule(
    importer: Member, imported: str, kinds: dict[str, str], members: dict[str, Member]
) -> str | None:
    """The rule `importer` breaks by importing `imported`, or None if it may."""
    exists = "a member imports only Loom packages that workspace members provide"
    kind = kinds.get(imported)
    if kind is None:
        return exists
    if importer.package == "loom_common":
        return "loom_common imports no other Loom package"
    if importer.package == RUNTIME:
        if kind != "lib":
            return "loom_runtime imports libs only, never a service or the cli"
    elif importer.kind == "lib" and imported != "loom_common":
        return "a lib other than loom_common imports only loom_common"
    if importer.kind == "service" and kind != "lib":
        return "a service imports libs only, never another service or the cli"
    if imported not in members:
        return exists
    return None


def check_workspace(root: Path) -> list[Violation]:
    """Every import that breaks the dependency direction or is not declared, in file order."""
    members, violations = discover_members(root)
    kinds = dict.fromkeys(KNOWN_LIBS, "lib") | dict.fromkeys(KNOWN_SERVICES, "service")
    kinds |= {CLI: "cli"} | {m.package: m.kind for m in members}
    by_package = {m.package: m for m in members}
    for member in members:
        for file in sorted((root / member.path / "src").rglob("*.py")):
            relative = file.relative_to(root)
            for imported, line in loom_imports(file.read_text(), str(relative)):
                if imported == member.package:
                    continue
                rule = broken_rule(member, imported, kinds, by_package)
                if rule is not None:
                    violations.append(
                        Violation(relative, line, rule, f"{member.package} imports {imported}")
                    )
                    continue
                distribution = by_package[imported].distribution
                if distribution not in member.dependencies:
                    violations.append(
                        Violation(
                            relative,
                            line,
                            "a member declares every workspace distribution it imports",
                            f"{member.package} imports {imported} but "
                            f"{member.path / 'pyproject.toml'} does not list "
                            f"{distribution!r} in [project] dependencies",
                        )
                    )
    return violations


def test_workspace_imports_follow_dependency_direction() -> None:
    violations = check_workspace(ROOT)

    assert not violations, "\n".join(str(v) for v in violations)


def test_workspace_members_are_discovered() -> None:
    """Guards the check above against passing because it found nothing to check."""
    members, problems = discover_members(ROOT)

    assert not problems, "\n".join(str(p) for p in problems)
    assert {"loom_common", "loom_worker", "loom_cli"} <= {m.package for m in members}


# --- the checker itself, on synthetic workspaces ---------------------------------------


def make_member(root: Path, path: str, distribution: str, dependencies: list[str]) -> Path:
    directory = root / path
    package = directory / "src" / ("loom_" + distribution.removeprefix("loom-"))
    if distribution == "loom":
        package = directory / "src" / "loom_cli"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    deps = ", ".join(f'"{d}"' for d in dependencies)
    (directory / "pyproject.toml").write_text(
        f'[project]\nname = "{distribution}"\nversion = "0"\ndependencies = [{deps}]\n'
    )
    return package


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.uv.workspace]\nmembers = ["libs/*", "services/*", "cli"]\n'
    )
    make_member(tmp_path, "libs/common", "loom-common", ["pydantic>=2"])
    make_member(tmp_path, "libs/db", "loom-db", ["loom-common", "sqlmodel"])
    make_member(tmp_path, "services/graph_processor_worker", "loom-worker", ["loom_common"])
    make_member(tmp_path, "services/rest_service", "loom-rest", ["loom-common", "loom-db"])
    make_member(tmp_path, "cli", "loom", ["loom-common", "loom-worker", "loom-rest"])
    return tmp_path


def write(root: Path, path: str, source: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(source)


def test_checker_reports_common_importing_a_service(workspace: Path) -> None:
    write(workspace, "libs/common/src/loom_common/bad.py", "from loom_worker import engine\n")

    (violation,) = check_workspace(workspace)

    assert violation.file == Path("libs/common/src/loom_common/bad.py")
    assert violation.line == 1
    assert violation.rule == "loom_common imports no other Loom package"
    assert str(violation) == (
        "libs/common/src/loom_common/bad.py:1: loom_common imports loom_worker "
        "[rule: loom_common imports no other Loom package]"
    )


def test_checker_accepts_imports_that_follow_the_rules(workspace: Path) -> None:
    write(workspace, "libs/db/src/loom_db/tables.py", "from loom_common.graph import Graph\n")
    write(workspace, "services/rest_service/src/loom_rest/app.py", "import loom_db.tables\n")
    write(
        workspace,
        "cli/src/loom_cli/up.py",
        "from loom_rest import app\nfrom loom_worker.engine import run\nfrom . import main\n",
    )

    assert check_workspace(workspace) == []


def test_checker_finds_imports_inside_functions(workspace: Path) -> None:
    write(
        workspace,
        "libs/db/src/loom_db/lazy.py",
        '"""Doc."""\n\n\ndef later():\n    import loom_rest.app as app\n    return app\n',
    )

    (violation,) = check_workspace(workspace)

    assert (violation.file.name, violation.line) == ("lazy.py", 5)
    assert violation.rule == "a lib other than loom_common imports only loom_common"


def test_checker_reports_a_service_importing_another_service(workspace: Path) -> None:
    write(
        workspace,
        "services/rest_service/src/loom_rest/app.py",
        "import json\n\nfrom loom_worker.engine import run\n",
    )

    (violation,) = check_workspace(workspace)

    assert (violation.file.name, violation.line) == ("app.py", 3)
    assert violation.rule == "a service imports libs only, never another service or the cli"


def test_checker_reports_an_undeclared_workspace_dependency(workspace: Path) -> None:
    write(workspace, "services/graph_processor_worker/src/loom_worker/db.py", "import loom_db\n")

    (violation,) = check_workspace(workspace)

    assert violation.line == 1
    assert "does not list 'loom-db' in [project] dependencies" in violation.message
    assert "services/graph_processor_worker/pyproject.toml" in violation.message


def test_checker_reports_a_loom_package_no_member_provides(workspace: Path) -> None:
    write(workspace, "libs/db/src/loom_db/x.py", "from loom_utils import helper\n")

    (violation,) = check_workspace(workspace)

    assert violation.rule == "a member imports only Loom packages that workspace members provide"


def test_checker_reports_a_member_of_unexpected_shape(workspace: Path) -> None:
    write(workspace, "services/empty/pyproject.toml", '[project]\nname = "loom-empty"\n')

    (violation,) = check_workspace(workspace)

    assert violation.file == Path("services/empty/pyproject.toml")
    assert violation.rule == "member shape (STYLE rule 1)"


def test_checker_reports_a_lib_of_design_that_is_no_member_yet(workspace: Path) -> None:
    write(workspace, "services/rest_service/src/loom_rest/q.py", "from loom_messaging import Q\n")

    (violation,) = check_workspace(workspace)

    assert violation.message == "loom_rest imports loom_messaging"
    assert violation.rule == "a member imports only Loom packages that workspace members provide"


def test_checker_lets_loom_runtime_import_libs_but_no_lib_import_it(workspace: Path) -> None:
    make_member(workspace, "libs/runtime", "loom-runtime", ["loom-common", "loom-db"])
    write(workspace, "libs/runtime/src/loom_runtime/ok.py", "import loom_db\nimport loom_common\n")
    write(workspace, "libs/db/src/loom_db/bad.py", "import loom_runtime\n")
    write(workspace, "libs/runtime/src/loom_runtime/bad.py", "import loom_rest\n")

    violations = check_workspace(workspace)

    assert [(str(v.file), v.rule) for v in violations] == [
        ("libs/db/src/loom_db/bad.py", "a lib other than loom_common imports only loom_common"),
        (
            "libs/runtime/src/loom_runtime/bad.py",
            "loom_runtime imports libs only, never a service or the cli",
        ),
    ]
