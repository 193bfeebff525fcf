"""loom_messaging: the work queue, event stream and control channel of DESIGN §1.

`open_broker(url, prefix=...)` gives a `Broker` for `memory://`, `amqp://` or `kafka://`;
the backends are imported only when their URL is opened, so `loom up` on `memory://`
needs neither aio-pika nor aiokafka at import time.
"""

from loom_messaging.abc import Broker, Control, DeadLetter, Delivery, EventStream, WorkQueue
from loom_messaging.brokers import open_broker
from loom_messaging.envelope import (
    LOG_BATCH_MAX_BYTES,
    MAX_MESSAGE_BYTES,
    Envelope,
    decode,
    encode,
)
from loom_messaging.errors import (
    BrokerUnavailable,
    InvalidMessage,
    MessagingError,
    UnsupportedURL,
)
from loom_messaging.health import check_broker

__all__ = [
    "LOG_BATCH_MAX_BYTES",
    "MAX_MESSAGE_BYTES",
    "Broker",
    "BrokerUnavailable",
    "Control",
    "DeadLetter",
    "Delivery",
    "Envelope",
    "EventStream",
    "InvalidMessage",
    "MessagingError",
    "UnsupportedURL",
    "WorkQueue",
    "check_broker",
    "decode",
    "encode",
    "open_broker",
]
