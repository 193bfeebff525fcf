"""loom_runtime: what every service is handed and how it runs (DESIGN §2, ADR 0007).

`Runtime` holds the database, the brokers, the keys and the metrics registry;
`open_runtime` builds one for a service started alone. `health_routes` gives `/healthz`,
`/readyz` and `/metrics`; `run_service` and `serve_app` run a service until SIGTERM.

This lib sits above the others: it may import `loom_common`, `loom_db`,
`loom_messaging` and `loom_auth`; no other lib imports it, and it imports no service.
"""

from loom_runtime.auth import auth_backend
from loom_runtime.group import GroupCommit
from loom_runtime.health import check_database, health_routes, readiness
from loom_runtime.metrics import metrics_of
from loom_runtime.runtime import Runtime, open_runtime
from loom_runtime.serve import hypercorn_config, run_service, serve_app, stop_on_signals

__all__ = [
    "GroupCommit",
    "Runtime",
    "auth_backend",
    "check_database",
    "health_routes",
    "hypercorn_config",
    "metrics_of",
    "open_runtime",
    "readiness",
    "run_service",
    "serve_app",
    "stop_on_signals",
]
