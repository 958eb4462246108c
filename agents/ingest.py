"""The ingest loop: batches of raw transaction records into the accounts table."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from faust.types import TP

from agents.batching import ack_all, batch_drain, eager_delivery
from agents.processor import Batch, IngestProcessor, MessageLike, Outputs, key_partition
from agents.resume import seek_before_resume
from agents.topology import (
    ALERTS,
    BY_ACCOUNT,
    TRANSACTIONS,
    accounts,
    alerts_topic,
    by_account_topic,
    dlq_topic,
    ingest_topic,
)
from finflow import cache, metrics
from finflow.app import app, settings
from finflow.sink import DatabaseSink
from models.alerts import Alert
from models.exceptions import ValidationError
from tables.store import send_batches

SOURCE_HEADERS = ("finflow.source.topic", "finflow.source.partition", "finflow.source.offset")


ORIGINAL_KEY = "finflow.original.key"  # a re-keyed record's key as received, if it had one
ERROR_HEADERS = ("finflow.error.reason", "finflow.error.message")
#: Headers a dead letter gets from FinFlow: a record's own header of one of these names (or
#: the re-keying's internal one) is replaced, not repeated.
_DEAD_LETTER_SET = frozenset((*SOURCE_HEADERS, *ERROR_HEADERS, ORIGINAL_KEY))


def _pairs(msg: MessageLike) -> list[tuple[str, bytes]]:
    raw = msg.headers or []
    return list(raw.items() if isinstance(raw, dict) else raw)


def _headers(msg: MessageLike) -> dict[str, bytes]:
    return dict(_pairs(msg))


def _source(msg: MessageLike) -> dict[str, bytes]:
    """Where a record first entered FinFlow (kept through the by-account re-keying)."""
    if msg.topic == BY_ACCOUNT:
        kept = {k: v for k, v in _headers(msg).items() if k in SOURCE_HEADERS}
        if len(kept) == len(SOURCE_HEADERS):
            return kept
    return {
        "finflow.source.topic": msg.topic.encode(),
        "finflow.source.partition": str(msg.partition).encode(),
        "finflow.source.offset": str(msg.offset).encode(),
    }


def dead_letter(msg: MessageLike, error: ValidationError) -> None:
    """Send the original bytes, unchanged, to the dead-letter topic with the reason; the
    record's own headers (trace ids, schema ids: what a reprocessing needs) are kept."""
    pairs = _pairs(msg)
    headers = [(k, v) for k, v in pairs if k not in _DEAD_LETTER_SET]
    headers += _source(msg).items()
    headers += zip(
        ERROR_HEADERS, (error.reason.value.encode(), error.message.encode()), strict=True
    )
    # A re-keyed record carries its original key in a header, absent when it had none.
    key = dict(pairs).get(ORIGINAL_KEY) if msg.topic == BY_ACCOUNT else msg.key
    dlq_topic.send_soon(
        key=key,
        value=msg.value,
        headers=headers,
        key_serializer="raw",
        value_serializer="raw",
    )


def forward(msg: MessageLike, key: bytes, partition: int) -> None:
    """Re-key a record to its account's partition of the by-account topic."""
    headers = {**_headers(msg), **_source(msg)}
    if msg.key is not None:
        headers[ORIGINAL_KEY] = msg.key
    by_account_topic.send_soon(
        key=key,
        value=msg.value,
        partition=partition,
        headers=list(headers.items()),
        key_serializer="raw",
        value_serializer="raw",
    )


processor = IngestProcessor(
    accounts,
    settings,
    Outputs(dead_letter=dead_letter, forward=forward),
    source_topics=(TRANSACTIONS, BY_ACCOUNT),
    partitions=settings.topic_partitions,  # checked against the topic at start (preflight)
    rows=settings.sink_enabled,
)
sink = DatabaseSink(settings)
if settings.sink_enabled:
    app.add_dependency(sink)
seek_before_resume(app)  # before the first rebalance: records are never cleared behind a seek
batch_drain(app.consumer, ingest_topic)  # before the fetcher starts
eager_delivery(app.consumer)  # the changelogs' records, read one by one in table recovery


EXACTLY_ONCE = settings.processing_guarantee == "exactly_once"
#: Batches still being stored while the next one is processed. The database's round trips
#: run on the sink's own thread, so they proceed while this loop's CPU-bound processing of
#: the next batch holds the event loop. Exactly-once: none (each batch's values go through
#: Faust's transactional producer before the next one is processed).
STORING_BEHIND = 0 if EXACTLY_ONCE else 1


@app.task
async def ingest() -> None:
    """The ingest loop: batches of raw records in, each acked only after it is stored.

    Order within a batch: database rows and alerts (acked by the broker), then the table
    values and their changelog records (acked by the broker), then the source records; each
    batch's values and acks after the previous batch's. A crash anywhere replays the unacked
    batches; every step before the table write is idempotent, and records the table already
    reflects are recognised by their offsets.
    """
    within = min(settings.batch_within_ms, settings.sink_max_delay_ms) / 1000
    storing: deque[asyncio.Task[None]] = deque()
    try:
        while not app.should_stop:
            messages = await ingest_topic.take(settings.batch_size, within)
            while storing and (storing[0].done() or (len(storing) > STORING_BEHIND and messages)):
                oldest = storing.popleft()
                await asyncio.wait([oldest])
                if oldest.cancelled() or oldest.exception() is not None:
                    return  # it stopped the worker (see store)
            if not messages:
                continue
            batch = processor.process(messages)  # sees the values of batches still storing
            mark_inbound(batch.result.positions)
            previous = storing[-1] if storing else None
            storing.append(asyncio.create_task(store(messages, batch, previous)))
    finally:
        for task in storing:
            task.cancel()


def mark_inbound(positions: dict[tuple[str, int], int]) -> None:
    """Tell Faust's monitor that these partitions' records are being processed, as its own
    streams do per event: its consumer otherwise logs "Stream has not started processing"
    for every partition with lag once the worker has run for ``stream_processing_timeout``."""
    inbound = app.monitor.stream_inbound_time
    now = time.monotonic()
    for topic, partition in positions:
        inbound[TP(topic, partition)] = now


async def store(messages: list[Any], batch: Batch, previous: asyncio.Task[None] | None) -> None:
    """Write a processed batch everywhere it goes, then ack its source records.

    Any failure stops the worker: nothing of the batch (or of later ones) is acked, so a
    restart replays it.
    """
    try:
        # Rows and alerts both go before the table values; they do not depend on each other
        # nor on the previous batch (idempotent writes).
        before_values = []
        if settings.sink_enabled:
            before_values.append(
                sink.write(
                    batch.txns, batch.snapshots, batch.alerts, batch.rejections, batch.refresh
                )
            )
        if batch.alerts:
            before_values.append(publish_alerts(batch.alerts))
        await asyncio.gather(*before_values)
        if previous is not None:
            await previous  # its values (and acks) first
        if EXACTLY_ONCE:
            processor.commit(batch)  # through Faust's transactional producer
        else:
            await asyncio.gather(
                *(accounts.write_batch_acked(p, items) for p, items in batch.writes.items())
            )
            processor.release(batch)
        await cache.publish(batch.writes)  # queued for a background writer; never blocks
        ack_all(app.consumer, messages)
        metrics.observe_batch(batch.result)
        positions.update(batch.result.positions)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        app.log.exception("ingest failed: %r", exc)
        await app.crash(exc)
        raise


positions: dict[tuple[str, int], int] = {}


async def publish_alerts(alerts: list[Alert]) -> None:
    """Send alerts and wait for the broker's ack, before the batch's table values are written.

    A crash after this replays the batch and re-sends the same ``alert_id``s (de-duplicated
    downstream); a crash before it loses nothing, because nothing of the batch was stored.
    """
    producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    # The key's partition among the topic's own partitions, as Kafka's default partitioner
    # picks it: ``alerts`` is not co-partitioned and may have been created with another count.
    partitions = len(await producer.partitions_for(ALERTS))
    by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
    for a in alerts:
        key = a.account_id.encode()
        partition = key_partition(key, partitions)
        by_partition.setdefault(partition, []).append((key, a.encode()))
        metrics.ALERTS.labels(a.rule).inc()
    if EXACTLY_ONCE:
        for partition, records in by_partition.items():
            for record_key, value in records:
                alerts_topic.send_soon(key=record_key, value=value, partition=partition)
        return
    await asyncio.gather(
        *(send_batches(producer, ALERTS, p, records) for p, records in by_partition.items())
    )


@app.timer(5.0)
async def report_progress() -> None:
    """Consumer lag per partition, recovery progress and RocksDB memory as gauges."""
    assigned = app.consumer.assignment()
    for (topic, partition), position in list(positions.items()):
        tp = TP(topic, partition)
        if tp not in assigned:
            del positions[(topic, partition)]
            metrics.LAG.remove(topic, str(partition))
            continue
        highwater = app.consumer.highwater(tp)
        if highwater is not None:
            metrics.LAG.labels(topic, str(partition)).set(max(0, highwater - position))
    recovery = app.tables.recovery  # type: ignore[attr-defined]
    metrics.RECOVERY_REMAINING.set(recovery.active_remaining_total())
    for kind, size in accounts.memory().items():
        metrics.ROCKSDB_MEMORY.labels(kind).set(size)
