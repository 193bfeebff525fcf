from __future__ import annotations

import pytest

from loom_auth import Role, UnknownRole, parse_role, role_allows, scopes_for


@pytest.mark.parametrize(
    ("have", "need", "allowed"),
    [
        ("admin", "admin", True),
        ("admin", "editor", True),
        ("admin", "viewer", True),
        ("editor", "admin", False),
        ("editor", "editor", True),
        ("editor", "viewer", True),
        ("viewer", "admin", False),
        ("viewer", "editor", False),
        ("viewer", "viewer", True),
    ],
)
def test_admin_contains_editor_contains_viewer(have: str, need: str, allowed: bool) -> None:
    assert role_allows(have, need) is allowed
    assert role_allows(Role(have), Role(need)) is allowed


def test_parse_role_names_the_valid_roles() -> None:
    assert parse_role("editor") is Role.EDITOR
    with pytest.raises(UnknownRole, match="'root'; use one of viewer, editor, admin"):
        parse_role("root")
    with pytest.raises(UnknownRole):
        parse_role("Admin")  # exact, as stored
    with pytest.raises(UnknownRole):
        role_allows("superuser", "viewer")


def test_scopes_include_every_lower_role() -> None:
    assert scopes_for("viewer") == ["authenticated", "viewer"]
    assert scopes_for(Role.EDITOR) == ["authenticated", "viewer", "editor"]
    assert scopes_for("admin") == ["authenticated", "viewer", "editor", "admin"]
