"""The route table: every endpoint of the API, one module per area (DESIGN §5)."""

from __future__ import annotations

from loom_rest.api import Endpoint
from loom_rest.routes import admin, auth, executions, graphs, meta, secrets, users

__all__ = ["ENDPOINTS"]

ENDPOINTS: list[Endpoint] = [
    *meta.ENDPOINTS,
    *auth.ENDPOINTS,
    *users.ENDPOINTS,
    *graphs.ENDPOINTS,
    *executions.ENDPOINTS,
    *secrets.ENDPOINTS,
    *admin.ENDPOINTS,
]
