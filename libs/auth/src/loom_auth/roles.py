"""Roles: `admin` ⊃ `editor` ⊃ `viewer` (DESIGN §5).

A role allows everything a lower one does, so a check is one comparison of ranks, and
the Starlette scopes of a role are its own name plus every lower role's.
"""

from __future__ import annotations

from enum import StrEnum

from loom_auth.errors import UnknownRole

__all__ = ["Role", "parse_role", "role_allows", "scopes_for"]


class Role(StrEnum):
    """A user's or API token's role. The value is what the database and the JWT hold."""

    VIEWER = "viewer"
    EDITOR = "editor"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """0 for viewer, 1 for editor, 2 for admin."""
        return _RANKS[self]


_RANKS = {Role.VIEWER: 0, Role.EDITOR: 1, Role.ADMIN: 2}


def parse_role(value: str) -> Role:
    """The `Role` named `value` (exact, lower case). Raises `UnknownRole` otherwise."""
    try:
        return Role(value)
    except ValueError:
        names = ", ".join(role.value for role in Role)  # definition order: lowest first
        raise UnknownRole(f"unknown role {value!r}; use one of {names}") from None


def role_allows(have: Role | str, need: Role | str) -> bool:
    """Whether a holder of `have` may do what needs `need`. Raises `UnknownRole` for a
    name that is not a role (a string from a database row or a token is parsed first)."""
    return _as_role(have).rank >= _as_role(need).rank


def scopes_for(role: Role | str) -> list[str]:
    """Starlette scopes of a role: `authenticated` and the role's name and every lower
    role's, so `requires("editor")` passes for an admin. Raises `UnknownRole`."""
    have = _as_role(role)
    return ["authenticated", *(r.value for r in Role if r.rank <= have.rank)]


def _as_role(value: Role | str) -> Role:
    return value if isinstance(value, Role) else parse_role(value)
