"""loom_rest: the REST API of DESIGN §5 on Starlette, served by Hypercorn.

`create_app(runtime)` builds the app from its collaborators; `python -m loom_rest` (and
`loom serve rest`) builds them from the settings and serves it.
"""

from loom_rest.app import create_app
from loom_rest.runtime import Runtime, ensure_first_admin, open_runtime
from loom_rest.settings import RestSettings, load_rest_settings

__all__ = [
    "RestSettings",
    "Runtime",
    "create_app",
    "ensure_first_admin",
    "load_rest_settings",
    "open_runtime",
]
