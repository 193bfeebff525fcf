"""Request counts and latency by route template and status, on the registry the service
is given (so `loom up` exposes every service's metrics from one registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from loom_runtime import metrics_of

__all__ = ["RestMetrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RestMetrics:
    """The REST metrics of one registry. Use `RestMetrics.of(registry)`: a registry takes
    each metric name once, and an app may be created twice over one runtime."""

    @classmethod
    def of(cls, registry: CollectorRegistry) -> RestMetrics:
        return metrics_of(registry, cls)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "loom_rest_requests",
            "REST requests answered, by method, route template and status",
            ("method", "route", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "loom_rest_request_duration_seconds",
            "Time to answer a REST request, by method and route template",
            ("method", "route"),
            buckets=_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
