"""The websocket service's Prometheus metrics (`/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from loom_runtime import metrics_of

__all__ = ["WebsocketMetrics"]


class WebsocketMetrics:
    """Connections open, frames and bytes sent, followers closed for being too slow."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge(
            "loom_websocket_connections",
            "WebSocket connections open, by endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self.frames = Counter(
            "loom_websocket_frames_sent", "Frames sent to clients.", registry=registry
        )
        self.bytes = Counter(
            "loom_websocket_bytes_sent", "Payload bytes sent to clients.", registry=registry
        )
        self.slow_closes = Counter(
            "loom_websocket_slow_closes",
            "Connections closed with 4008 (full past the high-water mark and taking nothing).",
            registry=registry,
        )
        self.drain_waits = Counter(
            "loom_websocket_drain_waits",
            "Times a follower left the broadcast group until its connection drained.",
            registry=registry,
        )
        self.refusals = Counter(
            "loom_websocket_refusals",
            "Connections closed after the handshake, by close code (4401, 4403, 4404, 4400).",
            ["code"],
            registry=registry,
        )

    @classmethod
    def of(cls, registry: CollectorRegistry) -> WebsocketMetrics:
        return metrics_of(registry, cls)

    def sent(self, frames: int, size: int) -> None:
        """`frames` frames of `size` bytes each went out."""
        self.frames.inc(frames)
        self.bytes.inc(frames * size)
