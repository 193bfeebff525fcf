"""loom_webhook: the webhook service of DESIGN §6.

`create_app(runtime, settings)` is the Starlette app (`app`); `python -m loom_webhook`
serves it (`serve`). The pure core: `signatures` authenticates a delivery (github,
gitlab, standard, token, none), `deliveries` decodes its body, `hooks` compiles a stored
hook's filters and params; `errors` holds the error tree.
"""

from loom_webhook.deliveries import BodyFormat, body_format, decode_body, is_github_ping
from loom_webhook.errors import MalformedBody, SignatureRejected, UnsupportedMediaType, WebhookError
from loom_webhook.signatures import (
    AUTH_SCHEMES,
    MAX_DELIVERY_ID_LENGTH,
    REPLAY_WINDOW,
    AuthScheme,
    delivery_id,
    event_name,
    github_signature,
    header,
    standard_signature,
    verify,
)

__all__ = [
    "AUTH_SCHEMES",
    "MAX_DELIVERY_ID_LENGTH",
    "REPLAY_WINDOW",
    "AuthScheme",
    "BodyFormat",
    "MalformedBody",
    "SignatureRejected",
    "UnsupportedMediaType",
    "WebhookError",
    "body_format",
    "decode_body",
    "delivery_id",
    "event_name",
    "github_signature",
    "header",
    "is_github_ping",
    "standard_signature",
    "verify",
]
