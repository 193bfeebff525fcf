"""auth routes."""

from __future__ import annotations

from loom_rest.api import Endpoint

ENDPOINTS: list[Endpoint] = []
