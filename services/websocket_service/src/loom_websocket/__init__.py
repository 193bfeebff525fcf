"""loom_websocket: live logs over WebSockets (DESIGN §9).

`LiveLogs(runtime, settings)` serves `/ws/executions/{id}?after=SEQ` and `/ws/events`
over one event-stream subscription per process (`hub.Hub`); `python -m loom_websocket`
runs it alone.
"""

from loom_websocket.server import LiveLogs
from loom_websocket.settings import WebsocketSettings, load_websocket_settings

__all__ = ["LiveLogs", "WebsocketSettings", "load_websocket_settings"]
