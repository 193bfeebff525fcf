"""`amqp://` — the three roles on RabbitMQ, with aio-pika.

Topology (every name carries the prefix `p`)::

    p.executions       durable quorum queue, the work queue; x-delivery-limit, dead-letter
                       exchange p.dlx with the at-least-once strategy
    p.dlx              durable fanout exchange -> p.executions.dead
    p.executions.dead  durable classic queue: the dead letters, oldest first
    p.events           durable topic exchange, routing key = the event key; each subscriber
                       an exclusive auto-delete queue bound with '#'
    p.control          durable fanout exchange; each subscriber an exclusive auto-delete queue

Delivery limit: a quorum queue dead-letters a message once it has been *returned* more
than `x-delivery-limit` times, so the limit is `max_deliveries - 1` and a message is
delivered `max_deliveries` times. RabbitMQ marks such a message with `x-death`
(reason `delivery_limit`); `dead_letters()` reports it as "delivered N times without an
ack". The queue's arguments must match on every declaration, so N is this broker's
`max_deliveries`. Bodies that do not decode, and `Delivery.dead_letter(reason)`, are
published by the consumer to p.dlx with an `x-loom-reason` header (confirmed), then acked.
Checked on RabbitMQ 3.10. From 4.3 on, RabbitMQ counts only `basic.reject` toward the
delivery limit, not a consumer that dies holding a message: revisit this there.

Connection: one robust connection per broker. It reconnects every `reconnect_interval`
and restores the channels with their prefetch, declarations, bindings and consumers, so
a `consume` or `subscribe` block resumes by itself after a broker restart. While it is
disconnected, operations fail at once with `BrokerUnavailable` instead of waiting for the
reconnect: the outbox relay retries on its own, and a worker publishing news must not
stall. A peer that vanishes without closing its TCP connection is noticed by AMQP
heartbeats (aiormq asks for 60 s; `?heartbeat=N` in the URL changes it). Driver
errors become `BrokerUnavailable` in one place, `_translated`.

Order: one publisher channel (with confirms) carries every publish, and each subscriber
has one queue and one channel, so the events of one key arrive in the order published.
"""

from loom_messaging.rabbitmq._broker import SUBSCRIBER_BUFFER, RabbitBroker, delete_prefix

__all__ = ["SUBSCRIBER_BUFFER", "RabbitBroker", "delete_prefix"]
