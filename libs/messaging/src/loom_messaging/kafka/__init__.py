"""`kafka://host:port[,host:port]` — the three roles on Apache Kafka (tests: Tansu), with
aiokafka.

Topics, created by `start()` when missing (an existing topic is used as it is):

* ``{prefix}.executions`` — the work queue (`partitions`, default 6), key = execution id;
* ``{prefix}.executions.dead`` — dead letters and replay markers (1 partition);
* ``{prefix}.events`` — the event stream (`partitions`), key = execution id;
* ``{prefix}.control`` — broadcasts (`control_partitions`, default 1).

**Producing.** One producer per broker: ``acks="all"``, ``max_request_size`` = the 256 KiB
`log.batch` cap + 64 KiB for key, headers and batch overhead, a small linger.
Idempotence is the `idempotent` setting, off by default (Tansu lacks it). `publish`
returns once the broker has the record; `publish_batch` sends every record, then waits
for all. aiokafka keeps one request in flight per partition, so a key's records keep
their order even through retries.

**The work queue** is consumer group ``{prefix}.workers`` with manual commits. A record
is committed once it and every record before it in its partition are *settled* (acked,
dead-lettered or requeued): the committed offset is the highest contiguous settled offset
+ 1, so acks may come in any order. `ack()` returns at once; a background task commits
within about 50 ms (the acks of that window share one commit), and leaving the block
commits what is settled. A crash before a commit means a redelivery, never a loss.

Kafka has no redelivery counter, so the count travels with the message, in header
``x-loom-deliveries`` (deliveries so far):

* A delivery given back unacked — its consumer leaves the `consume` block, its broker is
  closed, or its partition moves to another consumer in a rebalance (pending acks get a
  grace of a quarter of the session timeout first) — is *requeued*: published again
  (same key, so the same partition, at its end) with the count + 1, confirmed, and only
  then committed past; or, once it has been delivered `max_deliveries` times, sent to
  the dead letters with the reason ``delivered N times without an ack``. Exact.
* A process killed abruptly cannot requeue. So the consumer records "handed out up to
  offset X" as the committed offset of a second group, ``{prefix}.workers.delivered``
  (no member ever joins it), and hands out no record at or past X before that commit is
  done. The marks are pipelined: one commit per fetch of up to 250 records, written in
  the background while the records fetched before are handed out (the next fetch starts
  once fewer than 250 are left), so no round trip stands in the way. The partition's
  next owner reads that mark: a record below it that is read again was handed out by a
  consumer that died before settling it, so it is requeued with the count + 1 (or
  dead-lettered) instead of being delivered as new. Approximate, never short: after a
  crash, the records the dead consumer had fetched but not handed out yet — at most 499
  (2 × 250 − 1) per `consume` block — and those it acked in its last ~50 ms (not
  committed yet) count one delivery too many. RabbitMQ does the same: a quorum queue
  counts every message pushed into a dead consumer's prefetch buffer as delivered,
  whether or not the application had taken it, so the two backends agree on what a
  crash costs (up to the prefetch there, up to 499 records here).

At-least-once holds in every case: nothing is committed before it is settled, and a
requeued message only after its copy is confirmed. The queue keeps no order (a requeued
message goes to the end of its partition). A body that does not decode goes to the dead
letters at once with `decode`'s reason, then is committed past.

**Dead letters** are records of ``{prefix}.executions.dead``: the original body and key,
the reason in header ``x-loom-reason``; a dead letter's id is ``partition:offset``.
`dead_letters()` reads the topic from its beginning to its end offsets with a group-less
consumer (cost: the size of the dead topic, bounded by its retention). `replay(id)`
publishes the body to the work queue (delivery count 1), then appends a marker record
(empty body, header ``x-loom-replayed: <id>``) to the dead topic; listings leave marked
letters out. A crash between the two lists the letter again (a second replay would
deliver it twice; workers deduplicate by execution id).

**Events and control**: each subscription is its own group-less consumer, assigned every
partition of the topic and positioned at its end before `subscribe()`'s ``async with``
returns — every subscriber gets every message published from then on. Per-key order
holds (one key, one partition). Undecodable messages are skipped with a warning.

**Group timing.** `session_timeout_ms` (default 6000, the smallest Kafka accepts by
default) and `heartbeat_interval_ms` (1000) govern how fast a consumer joins and how
fast a dead one is noticed; `request_timeout_ms` (30 s) must exceed the session timeout,
as aiokafka bounds a JoinGroup by it. Tansu takes about half the session timeout to let
a consumer join, so tests that make many consumers pass smaller values (1000 / 200).
A new work group (or one whose commits expired) starts at the earliest offset: workers
deduplicate by execution id.

aiokafka 0.14 internals used, each in one place: the group coordinator's generation and
member id (`_WorkConsumer._stop_and_leave`), the admin client's `_send_request`, and the
fetcher's pending tasks (`_stop`, working around aio-libs/aiokafka#647).
"""

from loom_messaging.kafka._broker import MAX_REQUEST_BYTES, KafkaBroker
from loom_messaging.kafka._common import (
    DELIVERIES_HEADER,
    REASON_HEADER,
    REPLAYED_HEADER,
    bootstrap_servers,
)

__all__ = [
    "DELIVERIES_HEADER",
    "MAX_REQUEST_BYTES",
    "REASON_HEADER",
    "REPLAYED_HEADER",
    "KafkaBroker",
    "bootstrap_servers",
]
