"""Python functions that the example graphs call (`python: loom_examples:summarise`)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("loom_examples")


def summarise(status: int, body: Any) -> dict[str, Any]:
    """Describe a JSON document in one line; what it prints and logs is the node's log."""
    if isinstance(body, dict):
        keys = sorted(body)
        summary = f"HTTP {status}: an object with {len(keys)} keys ({', '.join(keys[:5])})"
    elif isinstance(body, list):
        summary = f"HTTP {status}: a list of {len(body)} items"
    else:
        summary = f"HTTP {status}: {str(body)[:60]!r}"
    print(summary)
    log.warning("summarised a %s", type(body).__name__)
    return {"summary": summary, "status": status}
